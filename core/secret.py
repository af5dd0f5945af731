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
