"""Field validators of the message catalogue (messages.py): each error one short sentence.

Every integer field is bounded (:class:`int_range`, :data:`COUNT`) and every
enumerated string checked (:class:`one_of`); specs/PROTOCOL.md §7.9 lists
the bounds.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from .limits import MAX_WIRE_INT


@attrs.frozen
class one_of:
    """An attrs validator (like ``in_``) whose error is one short sentence.

    attrs' ``in_`` raises a ValueError whose text is the repr of its four
    arguments (the Attribute object included): ~400 characters that reached
    the peer as a bye reason (issue 9, item 5). ``options`` is named as in
    ``in_`` so tools that read validators see the allowed values.
    """

    options: tuple[str, ...]
    #: the spec section listing the options, named instead of them when the
    #: list is too long for a bye reason (§9.2 keeps reasons short).
    where: str = ""

    def __call__(self, _inst: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value not in self.options:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
            allowed = ", ".join(self.options)
            if self.where and len(allowed) > 100:
                allowed = f"the {len(self.options)} listed in specs/PROTOCOL.md {self.where}"
            raise ValueError(f"{attribute.name} must be one of {allowed}, got {shown}")


@attrs.frozen
class int_range:
    """An attrs validator: an integer within ``lo..hi``, with a one-line error.

    Every integer field is bounded (issue 10, item 1): the releaser stores
    them in SQLite, whose INTEGER is signed 64-bit, and one u64 past 2**63 in
    ``update_progress`` used to make the batched write of every device fail.
    The bounds are listed in specs/PROTOCOL.md §7.6 and §7.9.
    """

    lo: int
    hi: int

    def __call__(self, _inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
        if not self.lo <= value <= self.hi:
            shown = str(value) if len(str(value)) <= 24 else str(value)[:24] + "..."
            raise ValueError(f"{attribute.name} must be in {self.lo}..{self.hi}, got {shown}")


@attrs.frozen
class float_range:
    """An attrs validator: a finite float (or int) within ``lo..hi``, with a one-line error."""

    lo: float
    hi: float

    def __call__(self, _inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
        if not isinstance(value, int | float) or not self.lo <= value <= self.hi:
            shown = repr(value) if len(repr(value)) <= 24 else repr(value)[:24] + "..."
            raise ValueError(f"{attribute.name} must be in {self.lo:g}..{self.hi:g}, got {shown}")


#: The range of most integer fields: non-negative and within SQLite's INTEGER.
COUNT: Final = int_range(0, MAX_WIRE_INT)
