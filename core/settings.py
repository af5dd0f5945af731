"""Typed settings declared once, on the component configs themselves.

A component's frozen config dataclass declares each field that comes from the environment with
:func:`setting`: the variable's name, its meaning and its bounds sit beside the field and its
default, so the default exists exactly once. ``runtime.config`` derives the table of settings (for
``.env.example``, the README and the unknown-variable check) from these fields and builds each
config with :func:`build`, which parses every value by the field's type:

=========================  ================================================================
field type                 environment text
=========================  ================================================================
``bool``                   ``true/false``, ``1/0``, ``yes/no``, ``on/off``
``int``, ``float``         a number; ``minimum``/``gt`` bounds named in the error
``str``                    as is
``Literal["a", "b"]``      one of the choices, case-insensitive (stored lower-case)
``pathlib.Path``           a path
``tuple[str, ...]``        a comma list (blanks dropped)
``Mapping[str, Any]``      a JSON object
``Secret``                 a :class:`~core.secret.Secret` (never logged)
``datetime``               an ISO date or datetime; naive means UTC (kept naive with
                           ``local_time``); stored aware UTC
``X | None``               unset -> the default (``None``)
=========================  ================================================================

Bottom layer: imports nothing of ours but :mod:`core.errors` and :mod:`core.secret`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from core.errors import ConfigError
from core.secret import Secret

MAX_SECONDS = 1e9  # the longest duration a ``*_S`` setting takes, seconds
_META_KEY = "setting"


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """What :func:`setting` attaches to a config field.

    Attributes:
        env: the environment variable (``"PUBSUB_QCHECK_S"``).
        help: one line for ``.env.example``: meaning and unit.
        minimum: numbers: smallest allowed value (inclusive).
        gt: numbers: the value must be greater than this.
        secret: the value is a credential (never logged; may come from Secret Manager).
        alternatives: other variable names read when ``env`` is unset, in order.
        default_text: how the default is shown when it is computed elsewhere
            (``None``: derived from the field's default).
        local_time: datetimes: a value without an offset is kept naive, for the config to
            place in its own zone (``BACKTEST_START`` in ``CSV_TIMEZONE``).
    """

    env: str
    help: str
    minimum: float | None = None
    gt: float | None = None
    secret: bool = False
    alternatives: tuple[str, ...] = ()
    default_text: str | None = None
    local_time: bool = False


def setting(
    default: Any = dataclasses.MISSING,
    *,
    env: str,
    help: str,
    minimum: float | None = None,
    gt: float | None = None,
    secret: bool = False,
    alternatives: tuple[str, ...] = (),
    default_text: str | None = None,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    local_time: bool = False,
) -> Any:
    """A dataclass field read from the environment variable ``env`` (see the module docstring).

    Returns:
        a :func:`dataclasses.field` carrying a :class:`SettingSpec` in its metadata.
    """
    spec = SettingSpec(
        env, help, minimum, gt, secret, tuple(alternatives), default_text, local_time
    )
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata={_META_KEY: spec})
    return dataclasses.field(default=default, metadata={_META_KEY: spec})


@dataclass(frozen=True, slots=True)
class DeclaredSetting:
    """One environment variable as the table of settings lists it."""

    name: str
    default: str | None
    help: str
    secret: bool = False
    alternatives: tuple[str, ...] = ()


def spec_of(f: dataclasses.Field[Any]) -> SettingSpec | None:
    """The :class:`SettingSpec` of a config field, or ``None`` when it is not a setting."""
    spec = f.metadata.get(_META_KEY)
    return spec if isinstance(spec, SettingSpec) else None


def declared(cls: type) -> list[DeclaredSetting]:
    """The settings a config class declares, in field order, with their defaults as text."""
    out = []
    for f in dataclasses.fields(cls):
        spec = spec_of(f)
        if spec is None:
            continue
        if spec.default_text is not None:
            text: str | None = spec.default_text
        elif f.default is not dataclasses.MISSING:
            text = format_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            text = format_default(f.default_factory())
        else:
            text = None
        out.append(DeclaredSetting(spec.env, text, spec.help, spec.secret, spec.alternatives))
    return out


def format_default(value: Any) -> str | None:
    """A default as it would be written in the environment (``None`` = unset)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or None
    if isinstance(value, Mapping):
        return json.dumps(dict(value)) if value else "{}"
    return str(value)


def parse(name: str, text: str, tp: Any, spec: SettingSpec | None = None) -> Any:
    """Parse the environment text of variable ``name`` as type ``tp``.

    Raises:
        ConfigError: naming ``name``, the value (never a secret's) and what was expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return parse(name, text, args[0], spec)
        if set(args) == {str, int}:  # a column: position or name
            return int(text) if text.strip().isdigit() else text
        raise TypeError(f"{name}: unsupported setting type {tp!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        low = text.strip().lower()
        if low not in choices:
            raise ConfigError(f"{name}={text!r}: expected one of {', '.join(map(str, choices))}")
        return low
    if tp is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={text!r}: expected true or false")
    if tp in (int, float):
        kind = "a whole number" if tp is int else "a number"
        stripped = text.strip()
        # Python's int() and float() also take "1_024" and other scripts' digits ("١٢٨");
        # a setting is written in ASCII digits, as every other reader of the .env file
        # (shells, Kubernetes, DuckDB) reads it
        if not stripped.isascii() or "_" in stripped:
            raise ConfigError(f"{name}={text!r}: expected {kind} in ASCII digits")
        try:
            value = tp(stripped)
        except (ValueError, OverflowError) as e:
            raise ConfigError(f"{name}={text!r}: expected {kind}") from e
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={text!r}: expected a finite number")
        if spec is not None and spec.gt is not None and not value > spec.gt:
            raise ConfigError(f"{name}={value}: expected {kind} > {spec.gt:g}")
        if spec is not None and spec.minimum is not None and value < spec.minimum:
            raise ConfigError(f"{name}={value}: expected {kind} >= {spec.minimum:g}")
        if name.endswith("_S") and value > MAX_SECONDS:
            # a duration in seconds: beyond the waits' own limit (threading.TIMEOUT_MAX, about
            # 9.2e9 s) a run failed at its end with an OverflowError (a fresh-context attack:
            # SHUTDOWN_TIMEOUT_S=1e10 lost the report, FMEL_FLUSH_INTERVAL_S=1e10 the writer)
            raise ConfigError(
                f"{name}={stripped}: expected at most {MAX_SECONDS:g} seconds (about 31 years)"
            )
        return value
    if tp is str:
        return text
    if tp is Path:
        return Path(text)
    if tp is datetime:
        try:
            parsed = datetime.fromisoformat(text.strip())
        except ValueError as e:
            raise ConfigError(
                f"{name}={text!r}: expected an ISO date or datetime, e.g. 2010-01-31"
            ) from e
        if parsed.tzinfo is None:
            return parsed if spec is not None and spec.local_time else parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    if tp is Secret:
        return Secret(text, source=f"env:{name}")
    if origin is tuple:
        parts = [part.strip() for part in text.split(",")]
        while parts and not parts[-1]:
            parts.pop()  # a trailing comma (a list written one item a line ends so)
        while parts and not parts[0]:
            parts.pop(0)
        if "" in parts:  # GOOG,,SP500: a deleted item, or a missing one? Not guessed.
            raise ConfigError(f"{name}={text!r}: expected a comma list without empty items")
        return tuple(parts)
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        return parse_json_object(name, text)
    raise TypeError(f"{name}: unsupported setting type {tp!r}")


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (:func:`unique_keys`); ``key`` is that key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`json.loads` for objects whose keys are all different:
    RFC 8259 section 4 leaves duplicate names undefined and Python keeps the last, which changes
    a value silently (a copied line shrank a search; a bar's field).

    Raises:
        DuplicateKeyError: the first key given twice.
    """
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(key)
        out[key] = value
    return out


def parse_json_object(name: str, text: str) -> dict[str, Any]:
    """The JSON object of setting ``name``: keys unique in every object, every string valid
    Unicode (no lone surrogate such as ``"\\ud800"``).

    Raises:
        ConfigError: naming ``name``: invalid JSON, not an object, a key given twice, a number
            of more than 4,300 digits, nesting too deep for Python, a lone surrogate.
    """
    try:
        parsed = json.loads(text, object_pairs_hook=unique_keys)
        # strings must be encodable: a lone surrogate failed writing the study page later
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except DuplicateKeyError as e:
        raise ConfigError(f"{name}: key {e.key!r} is given twice in one JSON object") from e
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{name}: expected a JSON object, got invalid JSON ({e.msg} at position {e.pos})"
        ) from e
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{name}: a string is not valid Unicode ({e.reason}: a lone surrogate escape such "
            "as \\ud800)"
        ) from e
    except RecursionError as e:
        raise ConfigError(f"{name}: JSON nested too deeply") from e
    except ValueError as e:  # int() of more than 4,300 digits (sys.set_int_max_str_digits)
        raise ConfigError(f"{name}: invalid JSON number ({str(e)[:120]})") from e
    if not isinstance(parsed, dict):
        raise ConfigError(f"{name}: expected a JSON object, got {type(parsed).__name__}")
    return parsed


def build(
    cls: type[Any],
    lookup: Callable[[str], tuple[str, str] | None],
    **given: Any,
) -> Any:
    """Build config ``cls`` from the environment.

    Args:
        cls: a dataclass whose environment fields are declared with :func:`setting`.
        lookup: ``name -> (text, source)`` or ``None`` when unset (the caller owns where values
            come from: the variable, its alternatives, Secret Manager).
        given: values for fields that are not read here (computed by the caller); they also
            override settings.

    Returns:
        ``cls(**values)``; unset settings keep the field default.

    Raises:
        ConfigError: an invalid value (names the variable), or one raised by ``cls`` itself.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        spec = spec_of(f)
        if spec is None:
            continue
        found = lookup(spec.env)
        if found is None:
            continue
        text, source = found
        value = parse(spec.env, text, hints[f.name], spec)
        if isinstance(value, Secret):
            value = Secret(text, source=source)
        values[f.name] = value
    values.update(given)
    return cls(**values)
