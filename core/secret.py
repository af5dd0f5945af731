"""A credential that never prints itself.

Its ``repr``/``str``/``format`` give ``****``; the value is only reachable through
:meth:`Secret.reveal`, which call sites use at the last moment (building a client). Pickling is
refused so a secret cannot leak into a spill file. Where secrets come from (environment, Secret
Manager) is :mod:`runtime.secrets`.
"""

from __future__ import annotations

from typing import Any, NoReturn

MASK = "****"


class Secret:
    """An opaque credential.

    Args:
        value: the secret text. Empty strings are allowed (an unset optional secret is ``None``,
            not ``Secret("")``).
        source: where it came from, e.g. ``"env:ALPACA_API_KEY"`` or
            ``"secretmanager:projects/p/secrets/s/versions/latest"``; safe to log.
    """

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str = "unknown") -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """Return the secret text. Call only where a client needs it; never log the result."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK}, source={self.source!r})"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled")

    def __deepcopy__(self, memo: dict[int, Any]) -> Secret:
        return self


def check_token(name: str, secret: Secret) -> None:
    """Refuse a credential that cannot go into an HTTP header or a websocket auth message as
    it is: anything but printable ASCII without spaces (RFC 9110 section 5.5 allows no line
    break in a field value; Alpaca's key ids and secrets are letters and digits). Without this
    check ``requests`` raised ``InvalidHeader`` at the first call with the key in its message
    (a fresh-context attack: a Secret Manager payload ending in a blank line).

    Raises:
        ConfigError: naming ``name``, the key's source and the first bad character's kind and
            position, never the value.
    """
    from core.errors import ConfigError

    value = secret.reveal()
    for i, ch in enumerate(value):
        if "!" <= ch <= "~":
            continue
        if ch in "\r\n":
            what = "a line break"
        elif ch in " \t":
            what = "a space or tab"
        elif ch == "\ufeff":
            what = "a byte-order mark"
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            what = "a control character"
        else:
            what = "a non-ASCII character"
        where = "at the end" if i == len(value) - 1 else f"at character {i + 1} of {len(value)}"
        raise ConfigError(
            f"{name} (from {secret.source}): the key has {what} {where}; expected printable "
            "ASCII without spaces (a file or payload ending in a blank line? Secret Manager "
            "keeps the payload as given, less one trailing newline)"
        )
