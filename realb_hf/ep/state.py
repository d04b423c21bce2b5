"""`EpState`: what one rank of a real EP group keeps about its ReaLB layers (`realb_hf.get_runtime(model).ep`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

MAX_APPLIED = 10_000  # per-rank log entries kept (a bounded window, like Telemetry.max_records)


@dataclass
class EpState:
    """Per-rank EP settings, the log of what this rank ran, and the bytes ReaLB's EP path moved."""

    rank: int  # local rank in the EP mesh: the per-rank identity every decision refers to
    size: int
    global_rank: int
    implementation: str  # the token movement asked for ("auto", "all_reduce", "all_to_all")
    group_ranks: tuple[int, ...] = ()  # global ranks of this rank's EP group (they decide together)
    side_stream: bool = True  # convert lowered weights on a side CUDA stream during the dispatch
    fp8_dispatch: bool = True  # all-to-all: send fp8 rows to ranks lowered to fp8
    timeout_s: float | None = None  # collective timeout set by set_collective_timeout (None: the group's default)
    comm: dict[str, int] = field(default_factory=dict)  # bytes moved by ReaLB's EP path, per kind
    max_applied: int = MAX_APPLIED
    _applied: list[dict] = field(default_factory=list, repr=False)
    _pending: list[tuple] = field(default_factory=list, repr=False)  # entries resolved when read

    @property
    def applied(self) -> list[dict]:
        """What this rank ran, per forward and layer (entries of device-side decisions resolved now)."""
        pending, self._pending = self._pending, []
        for resolve, *args in pending:
            self.log(resolve(*args))
        return self._applied

    def log(self, entry: dict) -> None:
        self._applied.append(entry)
        if len(self._applied) > self.max_applied:
            del self._applied[: len(self._applied) - self.max_applied]

    def log_deferred(self, resolve: Callable[..., dict], *args) -> None:
        """`log(resolve(*args))` once `applied` is read: `args` may hold device tensors (no host sync now).
        Beyond the window `applied` keeps, the oldest are dropped unresolved (a server that never reads it)."""
        self._pending.append((resolve, *args))
        if len(self._pending) >= 2 * self.max_applied:
            del self._pending[: -self.max_applied]

    def count(self, kind: str, nbytes: int) -> None:
        self.comm[kind] = self.comm.get(kind, 0) + int(nbytes)

    def reset(self) -> None:
        self._applied.clear()
        self._pending.clear()
        self.comm.clear()
