"""A value that never shows itself in a repr, str, log line or exception; and signed links,
which are secrets for as long as they work."""

from __future__ import annotations

import re

# A URL whose query signs it (S3 SigV4 or V2): anyone holding it reads the object until it
# expires. A service's error may echo an input's link, cut short or not, so any query carrying a
# signature's fields goes, wherever in the text it appears.
_SIGNED_QUERY = re.compile(r"\?[^\s\"'<>]*(?:X-Amz-|AWSAccessKeyId=|Signature=)[^\s\"'<>]*", re.IGNORECASE)
SIGNED_QUERY_SHOWN = "?<signed query removed>"


def redact_links(text: str) -> str:
    """`text` with the query of every signed link replaced: the object's address stays readable."""
    return _SIGNED_QUERY.sub(SIGNED_QUERY_SHOWN, text) if "?" in text else text


class Secret:
    """Holds an API key; only `reveal()` gives it back, and only the HTTP layer calls it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def fingerprint(self) -> str:
        """A short stable tag for keying shared limits per key without storing the key."""
        import hashlib

        return hashlib.sha256(self._value.encode()).hexdigest()[:16]

    def shown_as(self, label: str) -> bool:
        """Whether a label the service puts on this key in its ledger names it: the short digest
        above, or a masked form (`sk-...cdef`) whose visible ends are the key's."""
        label = label.strip()
        if not self._value or not label:
            return False
        if label in (self._value, self.fingerprint()):
            return True
        for mask in ("...", "…", "***", "*"):
            if mask in label:
                head, _, tail = label.partition(mask)
                tail = tail.lstrip("*.…")
                shown = len(head) + len(tail)
                return 4 <= shown < len(self._value) and self._value.startswith(head) and self._value.endswith(tail)
        return False

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not pickled: pass settings by environment")
