"""Secret values that never print themselves, and where settings come from.

A :class:`Secret` wraps a credential (API key, token). Its ``repr``/``str``/``format`` give
``****``; the value is only reachable through :meth:`Secret.reveal`, which call sites use at the
last moment (building a client). Pickling is refused so a secret cannot leak into a spill file.

Resolution order of one setting (:func:`resolve_setting`; ``runtime.config`` uses it for every
setting, so README, ``.env.example`` and errors agree):

1. the variable itself (``ALPACA_API_KEY``);
2. its documented alternative names, in order (``APCA_API_KEY_ID``);
3. Google Secret Manager, when ``<NAME>_SECRET`` names a secret (``ALPACA_API_KEY_SECRET=
   alpaca-key``, ``projects/p/secrets/alpaca-key`` or ``.../versions/3``; ``latest`` by default),
   read with the real ``google-cloud-secret-manager`` client and Application Default Credentials
   (Workload Identity on GKE) by :class:`SecretManagerResolver`;
4. the setting's default (``None`` for required ones; the caller then raises an error that names
   every place tried, see :func:`tried_places`).

An empty variable counts as unset. The resolver is created only when a ``*_SECRET`` reference is
actually needed, so a backtest never touches Google.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from core import held_signals
from core.errors import ConfigError, StopRequestedError
from core.secret import Secret

logger = logging.getLogger(__name__)

SECRET_REF_SUFFIX = "_SECRET"


# ---------------------------------------------------------------------------------------------
# Google Secret Manager
# ---------------------------------------------------------------------------------------------


class SecretSource(Protocol):
    """Something that turns a secret reference into its text (Secret Manager in production)."""

    def access(self, ref: str, project: str | None) -> tuple[str, str]:
        """Read one secret version.

        Args:
            ref: the ``*_SECRET`` value: ``name``, ``name/versions/V``,
                ``projects/P/secrets/name`` or ``projects/P/secrets/name/versions/V``.
            project: project for short names (``GOOGLE_CLOUD_PROJECT``); may be ``None``.

        Returns:
            ``(text, resource)``: the payload and the full version resource name read (safe to
            log).

        Raises:
            ConfigError: the secret cannot be read; the message names the resource and why,
                never a value.
        """
        ...


# A secret reference is shown in errors only when every ``/``-separated segment reads like a
# name a person gave: words of at most 15 letters, each optionally ending in up to 8 digits, or
# numbers, joined by '-' or '_' (``alpaca-key``, ``ALPACA_API_KEY_2026``, ``AlpacaKeyProd2024``,
# ``projects/my-project/secrets/x/versions/3``). Anything else (letters and digits
# interleaved, a run of 16+ letters, characters no secret id has: keys of every common shape,
# hex, base64, UUIDs, ``sk-live-...``) is named by its length only. A key put in
# ``ALPACA_API_KEY_SECRET`` by mistake was echoed in full by "not found" (helper-82, helper-84
# F8), then in many shapes by a narrower rule (helper-86 F2). Secret ids:
# https://cloud.google.com/secret-manager/docs/reference/rest/v1/projects.secrets/create
_WORD = re.compile(r"[A-Za-z]{1,15}[0-9]{0,8}|[0-9]{1,8}")
_SEPARATORS = re.compile(r"[-_]")


def _name_like(segment: str) -> bool:
    return len(segment) <= 255 and all(
        _WORD.fullmatch(part) for part in _SEPARATORS.split(segment) if part
    )


def shown_ref(ref: str) -> str:
    """``ref`` (a ``*_SECRET`` value or a resource name) as error messages and logs may show
    it: as given when it reads like a name (see the rule above), else ``<N characters hidden:
    a credential, not a secret name?>`` for the whole of it.

    >>> shown_ref("projects/p/secrets/alpaca-key/versions/latest")
    'projects/p/secrets/alpaca-key/versions/latest'
    >>> shown_ref("PKTESTKEY0123456789X")
    '<20 characters hidden: a credential, not a secret name?>'
    """
    if all(_name_like(seg) for seg in ref.split("/")):
        return ref
    return f"<{len(ref)} characters hidden: a credential, not a secret name?>"


def shown_endpoint(url: str) -> str:
    """``SECRET_MANAGER_ENDPOINT`` as messages show it: whatever comes before the last ``@``
    of it (a user, a password, a token) as ``****``, and a query or fragment as ``?****``.
    Not parsed as a URL: a password holding ``#``, ``/`` or ``?``, or an endpoint without a
    scheme (``user:pw@host``, as ``api_endpoint`` examples are written), is no URL's
    userinfo, and was echoed whole (helper-84 F4, helper-88 F1, F2).

    >>> shown_endpoint("http://user:pw@127.0.0.1:8085")
    'http://****@127.0.0.1:8085'
    >>> shown_endpoint("user:hunt#er2@secretmanager.googleapis.com")
    '****@secretmanager.googleapis.com'
    >>> shown_endpoint("https://host/v1?access_token=ya29.x")
    'https://host/v1?****'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "****@" + rest.rpartition("@")[2]
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    if cut >= 0:
        rest = rest[:cut] + "?****"
    return f"{scheme}{sep}{rest}"


def secret_resource(ref: str, project: str | None) -> str:
    """Normalise a ``*_SECRET`` reference to ``projects/P/secrets/S/versions/V``.

    Accepted: ``S``, ``S/versions/V``, ``projects/P/secrets/S``,
    ``projects/P/secrets/S/versions/V`` and the ``projects/P/locations/L/secrets/S[...]`` forms of
    regional secrets. ``V`` defaults to ``latest``.

    Raises:
        ConfigError: a short name without a project, or an unrecognised shape.
    """
    ref = ref.strip()
    shown = repr(shown_ref(ref))
    parts = ref.split("/")
    if parts[0] == "projects":
        if len(parts) in (4, 6) and parts[2] == "secrets":
            base = parts[:4]
            tail = parts[4:]
        elif len(parts) in (6, 8) and parts[2] == "locations" and parts[4] == "secrets":
            base = parts[:6]
            tail = parts[6:]
        else:
            raise ConfigError(
                f"secret reference {shown}: expected projects/<p>/secrets/<name>[/versions/<v>]"
            )
    else:
        if len(parts) not in (1, 3) or (len(parts) == 3 and parts[1] != "versions"):
            raise ConfigError(
                f"secret reference {shown}: expected <name>[/versions/<v>] or "
                "projects/<p>/secrets/<name>[/versions/<v>]"
            )
        if not project:
            raise ConfigError(
                f"secret reference {shown} is a short name: set "
                "GOOGLE_CLOUD_PROJECT (or PROJECT_ID), or give "
                "projects/<project>/secrets/<name>"
            )
        base = ["projects", project, "secrets", parts[0]]
        tail = parts[1:]
    if tail and tail[0] != "versions":
        raise ConfigError(f"secret reference {shown}: expected .../versions/<v> after the name")
    version = tail[1] if tail else "latest"
    if not all(base) or not version:
        raise ConfigError(f"secret reference {shown}: empty path segment")
    return "/".join([*base, "versions", version])


class SecretManagerResolver:
    """Reads secrets with the real ``google-cloud-secret-manager`` client.

    The client is created on first use: with no ``client`` given, it is
    ``SecretManagerServiceClient()`` on Application Default Credentials (Workload Identity on
    GKE, ``gcloud auth application-default login`` on a laptop). ``endpoint`` overrides the API
    endpoint: an ``http://`` one (a local test server) uses the REST transport with anonymous
    credentials, an ``https://`` one (a private endpoint) the REST transport with ADC.

    Values are cached per resource for the life of the resolver; one trailing newline (left by
    ``echo ... | gcloud secrets versions add --data-file=-``) is removed. A payload whose
    ``data_crc32c`` does not match is refused.

    Thread context: safe to call from any thread (a lock guards the client and the cache).

    Args:
        client: a ready ``SecretManagerServiceClient`` (tests, custom transports).
        endpoint: API endpoint override (``SECRET_MANAGER_ENDPOINT``).
        timeout_s: timeout of one request, seconds.
        deadline_s: total time spent retrying UNAVAILABLE / RESOURCE_EXHAUSTED, seconds. A
            read that has no whole answer after ``deadline_s + timeout_s`` is given up on
            (ConfigError), however slowly bytes still arrive.

    Error messages name the resource, with any segment shaped like a credential hidden
    (:func:`shown_ref`): a key put in ``*_SECRET`` by mistake is not echoed.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        endpoint: str | None = None,
        timeout_s: float = 10.0,
        deadline_s: float = 30.0,
    ) -> None:
        self._client = client
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        self._deadline_s = deadline_s
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stuck = False  # a read outlived its limit (_call): no further read

    def _at(self) -> str:
        """For error messages: the endpoint override, when there is one."""
        if not self._endpoint:
            return ""
        return f" at SECRET_MANAGER_ENDPOINT={shown_endpoint(self._endpoint)}"

    def _get_client(self) -> Any:
        if self._client is not None:
            return self._client
        from google.api_core.client_options import ClientOptions
        from google.auth.exceptions import DefaultCredentialsError
        from google.cloud import secretmanager

        try:
            if self._endpoint and self._endpoint.startswith("http://"):
                from google.auth.credentials import AnonymousCredentials

                self._client = secretmanager.SecretManagerServiceClient(
                    transport="rest",
                    credentials=AnonymousCredentials(),
                    client_options=ClientOptions(api_endpoint=self._endpoint),
                )
            elif self._endpoint:
                self._client = secretmanager.SecretManagerServiceClient(
                    transport="rest", client_options=ClientOptions(api_endpoint=self._endpoint)
                )
            else:
                self._client = secretmanager.SecretManagerServiceClient()
        except DefaultCredentialsError as e:
            raise ConfigError(
                "Secret Manager: no Application Default Credentials (on GKE bind "
                "the pod's ServiceAccount with Workload Identity; locally run "
                "`gcloud auth application-default login`)"
            ) from e
        except Exception as e:  # e.g. an endpoint that is not a URL (raised: named)
            raise ConfigError(
                f"Secret Manager: cannot make a client ({type(e).__name__}){self._at()}"
            ) from e
        return self._client

    def _call(self, request: Callable[[], Any], failing: str, doing: str) -> Any:
        """``request()`` (a read with the client's own retries, making the client, finding the
        project of Application Default Credentials) within ``deadline_s + timeout_s`` seconds
        in all. The client's deadline only applies between attempts, and a request's timeout
        between two bytes: an endpoint that trickles its answer held the start for minutes, or
        for good (helper-84 F5). The request runs on a daemon thread; past the limit it is left
        behind (the caller exits 2) and this resolver refuses further reads. A stop signal held
        since start-up (:func:`core.held_signals.pending`) ends the wait at once, or keeps the
        request from starting (helper-86 F5, F8).

        Args:
            failing: what could not be done, for the error (``"cannot read <ref>"``).
            doing: what was under way, for the stop's message (``"reading <ref> from Secret
                Manager"``).

        Raises:
            What the request raises; ConfigError (no answer in time); StopRequestedError.
        """
        if held_signals.pending():
            raise StopRequestedError(f"stopped (a signal) before {doing}")
        if self._stuck:
            raise ConfigError(f"Secret Manager: an earlier request did not end{self._at()}")
        box: list[Any] = []

        def run() -> None:
            try:
                box.append((True, request()))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box.append((False, e))

        worker = threading.Thread(target=run, name="secretmanager-read", daemon=True)
        limit = self._deadline_s + self._timeout_s
        end = time.monotonic() + limit
        worker.start()
        while not box and (left := end - time.monotonic()) > 0:
            worker.join(min(0.2, left))
            if not box and held_signals.pending():
                # a SIGTERM held since start-up (core.held_signals): it would otherwise wait
                # for this request's retries, up to the whole limit, before being handled
                self._stuck = True
                raise StopRequestedError(f"stopped (a signal) while {doing}")
        if not box:
            self._stuck = True
            raise ConfigError(
                f"Secret Manager: {failing}: no whole answer within {limit:g} s "
                f"(deadline {self._deadline_s:g} s + one request's {self._timeout_s:g} s)"
                f"{self._at()}"
            )
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def access(self, ref: str, project: str | None) -> tuple[str, str]:
        """See :meth:`SecretSource.access`."""
        import requests
        from google.api_core import exceptions as gexc
        from google.api_core import retry as gretry

        if not project and not ref.startswith("projects/"):
            # google.auth.default() may probe the GCE metadata server: seconds off GCP
            project = self._call(
                _adc_project,
                "cannot find the project of Application Default Credentials",
                "finding the project of Application Default Credentials",
            )
        resource = secret_resource(ref, project)
        shown = shown_ref(resource)
        with self._lock:
            if resource in self._cache:
                return self._cache[resource], resource
            client = self._call(
                self._get_client, "cannot make a client", "making a Secret Manager client"
            )
            # The REST transport (an http:// or https:// endpoint) raises requests' own
            # errors for a refused or silent connection, not ServiceUnavailable: retried the
            # same (a fresh-context attack: a refused endpoint ended in a raw traceback, exit
            # 1, after 2 s)
            unreachable = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
            retry = gretry.Retry(
                initial=0.2,
                maximum=5.0,
                multiplier=2.0,
                timeout=self._deadline_s,
                predicate=gretry.if_exception_type(
                    gexc.ServiceUnavailable, gexc.ResourceExhausted, *unreachable
                ),
            )
            try:
                response = self._call(
                    lambda: client.access_secret_version(
                        name=resource, retry=retry, timeout=self._timeout_s
                    ),
                    f"cannot read {shown}",
                    f"reading {shown} from Secret Manager",
                )
            except gexc.NotFound as e:
                raise ConfigError(
                    f"Secret Manager: {shown} not found (does the secret and "
                    "that version exist, is the version enabled?)"
                ) from e
            except (gexc.PermissionDenied, gexc.Forbidden) as e:  # gRPC / REST mapping
                raise ConfigError(
                    f"Secret Manager: permission denied on {shown} (grant "
                    "roles/secretmanager.secretAccessor to the runner's service "
                    "account)"
                ) from e
            except gexc.GoogleAPICallError as e:
                raise ConfigError(
                    f"Secret Manager: cannot read {shown}: {type(e).__name__} {e.code}"
                ) from e
            except gexc.RetryError as e:
                raise ConfigError(
                    f"Secret Manager: cannot read {shown}: still unavailable "
                    f"after {self._deadline_s:g} s of retries{self._at()}"
                ) from e
            except unreachable as e:
                raise ConfigError(
                    f"Secret Manager: cannot read {shown}: unreachable "
                    f"({type(e).__name__}){self._at()}"
                ) from e
            except (ConfigError, StopRequestedError):
                raise
            except Exception as e:  # not Secret Manager's answer at all (raised: named)
                # an endpoint that is another service (an HTML page, a redirect loop) or not
                # a URL: the client's parser or transport fails (helper-84: raw tracebacks)
                raise ConfigError(
                    f"Secret Manager: cannot read {shown}: the answer was not Secret "
                    f"Manager's ({type(e).__name__}){self._at()}"
                ) from e
            data: bytes = response.payload.data
            crc = response.payload.data_crc32c
            if crc is not None and crc != 0:
                import google_crc32c

                if int(google_crc32c.value(data)) != int(crc):
                    raise ConfigError(
                        f"Secret Manager: {shown}: payload checksum mismatch (corrupted in transit)"
                    )
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ConfigError(f"Secret Manager: {shown} is not UTF-8 text") from e
            if text.endswith("\n"):
                text = text[:-2] if text.endswith("\r\n") else text[:-1]
            if not text.strip():
                # an empty variable counts as unset; an empty secret is a mistake, not a key
                # (helper-86 F3: accepted, failing later as Alpaca's 401)
                raise ConfigError(f"Secret Manager: {shown} is empty")
            name = response.name or resource
            self._cache[resource] = text
            logger.info("read %s from Secret Manager", shown_ref(name))
            return text, name


def _adc_project() -> str | None:
    """The project of Application Default Credentials, when they name one (GKE metadata)."""
    try:
        import google.auth

        return google.auth.default()[1]
    except Exception:  # noqa: BLE001 - no ADC simply means no project to fall back to
        return None


# ---------------------------------------------------------------------------------------------
# The resolution chain
# ---------------------------------------------------------------------------------------------


def secret_ref_var(name: str) -> str:
    """The variable naming a Secret Manager secret for setting ``name``."""
    return name + SECRET_REF_SUFFIX


def resolve_setting(
    name: str,
    env: Mapping[str, str],
    *,
    alternatives: Sequence[str] = (),
    source: SecretSource | None = None,
    project: str | None = None,
) -> tuple[str, str] | None:
    """Find one setting along the chain (variable, alternatives, Secret Manager).

    Defaults are the caller's business (they differ per setting); ``None`` means "not found".

    Args:
        name: the setting's variable, e.g. ``ALPACA_API_KEY``.
        env: the environment mapping.
        alternatives: documented alternative names, tried in order.
        source: what reads ``<name>_SECRET`` references; ``None`` = refuse them.
        project: project of short secret names.

    Returns:
        ``(value, origin)`` with origin ``env:<VAR>`` or ``secretmanager:<resource>``, or
        ``None`` when no place had it. Variable values are stripped of surrounding whitespace.

    Raises:
        ConfigError: a ``*_SECRET`` reference exists but cannot be read.
    """
    for key in (name, *alternatives):
        value = env.get(key)
        if value is not None and value.strip() != "":
            return value.strip(), f"env:{key}"
    ref = env.get(secret_ref_var(name))
    if ref is not None and ref.strip() != "":
        if source is None:
            raise ConfigError(
                f"{secret_ref_var(name)} is set but no Secret Manager client is available"
            )
        try:
            text, resource = source.access(ref.strip(), project)
        except ConfigError as e:
            raise ConfigError(
                f"{name}: tried {tried_places(name, alternatives)}; {secret_ref_var(name)}: {e}"
            ) from e
        return text, f"secretmanager:{shown_ref(resource)}"
    return None


def tried_places(name: str, alternatives: Sequence[str] = ()) -> str:
    """Every place :func:`resolve_setting` looks, for error messages.

    >>> tried_places("ALPACA_API_KEY", ("APCA_API_KEY_ID",))
    'ALPACA_API_KEY, APCA_API_KEY_ID, Secret Manager via ALPACA_API_KEY_SECRET'
    """
    return ", ".join((name, *alternatives, f"Secret Manager via {secret_ref_var(name)}"))


def secrets_in(obj: object, _depth: int = 0) -> list[Secret]:
    """Every :class:`Secret` held by a (nested) config dataclass, mapping or sequence; for the
    log redactor (:meth:`runtime.logs.LogSetup.add_secrets`)."""
    import dataclasses

    if isinstance(obj, Secret):
        return [obj]
    if _depth > 6:
        return []
    found: list[Secret] = []
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            found += secrets_in(getattr(obj, f.name), _depth + 1)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            found += secrets_in(v, _depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found += secrets_in(v, _depth + 1)
    return found
