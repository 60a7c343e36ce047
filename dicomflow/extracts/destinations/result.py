"""What one send to a destination achieved, file by file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SendResult:
    """The files of one send the server confirmed, and those it did not, with the reason.

    Attributes:
        destination: the destination's name.
        sent: file names (relative to the folder sent) the server confirmed.
        failed: file name -> reason (status code and the server's message).
    """

    destination: str
    sent: tuple[str, ...] = ()
    failed: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sent", tuple(self.sent))
        object.__setattr__(self, "failed", dict(self.failed))   # a copy (and picklable, for RQ results)

    @property
    def ok(self) -> bool:
        """Every file confirmed (also true for an empty send)."""
        return not self.failed

    @property
    def partial(self) -> bool:
        """Some files confirmed, some not."""
        return bool(self.sent) and bool(self.failed)

    def as_dict(self) -> dict:
        """JSON-ready: what the bookkeeping and the API show."""
        return {"destination": self.destination, "sent": len(self.sent), "failed": dict(self.failed),
                "ok": self.ok, "partial": self.partial}
