"""What a search asks: date ranges written as text, and the search script's argument."""

from __future__ import annotations

from collections.abc import Mapping

import msgpack

from dicomflow.redisstore import model


def parse_date_range(text: str) -> tuple[int, int]:
    """``2013``, ``201303``, ``20130308``, or ``FROM-TO`` of those (either side may be empty) -> YYYYMMDD bounds.

    Raises:
        ValueError: the text is none of these.
    """
    def bound(part: str, upper: bool) -> int:
        part = part.strip()
        if not part:
            return 99991231 if upper else 0
        if not part.isdigit() or len(part) not in (4, 6, 8):
            raise ValueError(f"expected YYYY, YYYYMM or YYYYMMDD, not {part!r}")
        pad = {4: ("0000", "1231"), 6: ("00", "31"), 8: ("", "")}[len(part)]
        return int(part + (pad[1] if upper else pad[0]))
    lo, sep, hi = text.partition("-")
    if not sep:
        return bound(lo, False), bound(lo, True)
    return bound(lo, False), bound(hi, True)


def encode_query(eq: Mapping[str, str] | None, ranges: Mapping[str, tuple[int, int]] | None) -> bytes:
    """The search script's argument: equalities on indexed fields and YYYYMMDD ranges, as MessagePack.

    Raises:
        ValueError: a field has no such index.
    """
    for name in (eq or {}):
        if name not in model.INDEXED:
            raise ValueError(f"{name!r} is not indexed; search by one of {', '.join(model.INDEXED)}")
    for name in (ranges or {}):
        if name not in model.RANGED:
            raise ValueError(f"{name!r} has no range index; ranges on {', '.join(model.RANGED)}")
    return msgpack.packb({"eq": [[k, str(v)] for k, v in (eq or {}).items()],
                          "ranges": [[k, int(lo), int(hi)] for k, (lo, hi) in (ranges or {}).items()]})
