"""Per-layer, per-forward records of what ReaLB saw and decided, readable while the model serves."""

from __future__ import annotations

import functools
import json
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .layer_record import LayerRecord, make_record
from .policy import Decision, PolicyParams, RoutingStats, decide
from .telemetry_log import DeviceLog, LogSnapshot, to_host


class DeferredRouting(NamedTuple):
    """One layer call's routing, kept to be counted later (decode-sized batches, where nothing else needs the
    counts: counting then costs no launch on the serving path). Assumes the routing is not written in place
    after the layer, which no transformers MoE block does."""

    top_k_index: torch.Tensor
    modality: torch.Tensor | None
    num_experts: int

    @property
    def nbytes(self) -> int:
        return self.top_k_index.nbytes


class LayerCounts(NamedTuple):
    """What one layer call hands telemetry: its routing counts, and the decision when it was made on the host or
    from the config (None: made on the device; `decide` recomputes it from the counts when the record is built)."""

    counts: RoutingStats | torch.Tensor | DeferredRouting  # on the host, (2, E) on the device, or to count later
    decision: Decision | None
    num_tokens: int
    params: PolicyParams
    source: str  # where the modality came from


# (indices, modalities, num_experts) -> (N, 2, num_experts): counts many layer calls' routing at once
CountRouting = Callable[[list, list, int], torch.Tensor]

# Layer calls whose counts wait on the device before they are counted and sent to the host together (no host
# sync; about 85 forwards of a 48-layer model); bounds the device memory they hold when nobody reads telemetry.
MAX_PENDING = 4096
MAX_PENDING_BYTES = 64 << 20  # routing kept alive for deferred counting (decode-sized batches)


@dataclass
class _Shipped:
    """Layer calls whose counts are on their way to the host (one flat int32 copy per group of calls): the records
    are built only when read, so a server that never reads telemetry pays no Python per layer call for them. Until
    then each call holds 8 bytes per expert of host memory (pinned from CUDA), at most `max_records` calls."""

    entries: list[tuple]  # (forward, layer, num_tokens, decision, params, source, chunk, offset, experts)
    chunks: list[tuple[torch.Tensor, Any]]  # per group: (host counts, CUDA event marking the copy done, or None)

    @property
    def held(self) -> list[tuple]:
        return self.entries


def _locked(method):
    """Hold the telemetry's lock: threads sharing one model hand in and read records concurrently."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Telemetry:
    """Records of one model; `enabled=False` keeps decisions running but stores and counts nothing.

    Layers whose decision did not need the routing counts on the host hand in their counts as a device tensor
    (decided on the device) or, when nothing needed them at all (policy off/static/all_low, or a batch under the
    threshold), the routing itself. Every `MAX_PENDING` calls they are counted on the device in a few launches
    and copied to the host without a sync; records are built when read. So telemetry adds no host sync and, on
    decode-sized batches, no launch and almost no Python to the serving path.
    """

    enabled: bool = True
    count_routing: CountRouting | None = field(default=None, repr=False)  # needed for `DeferredRouting` counts
    device_log: DeviceLog | None = field(default=None, repr=False)  # what compiled forwards wrote (telemetry_log)
    max_records: int | None = 100_000  # oldest records are dropped beyond this (long-running servers)
    forwards: int = 0
    dropped: int = 0
    extra_memory_bytes: int = 0  # persistent low-precision weight copies
    # called with this telemetry at the start of `reset()`, before anything is cleared (exporters count what is
    # there, so their counters stay exact whoever resets)
    reset_hooks: list[Callable[[Telemetry], None]] = field(default_factory=list, repr=False, compare=False)
    _records: deque[LayerRecord] = field(default_factory=deque, repr=False)  # a ring of at most max_records
    _pending: list[tuple] = field(default_factory=list, repr=False)
    _pending_bytes: int = field(default=0, repr=False)
    _shipped: deque[_Shipped | LogSnapshot] = field(default_factory=deque, repr=False)
    _shipped_most: int = field(default=0, repr=False)  # calls `_shipped` holds at most (exact but for snapshots)
    _uncounted: deque[LogSnapshot] = field(default_factory=deque, repr=False)  # snapshots not yet counted
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self) -> dict:  # copies and pickles get a lock of their own
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    @_locked
    def records(self) -> list[LayerRecord]:
        """The kept records, oldest first (a copy: adding a record stays O(1) however many are kept)."""
        self._flush()
        return list(self._records)

    @_locked
    def next_forward(self) -> None:
        self._take_log()
        self.forwards += 1

    def _take_log(self) -> None:
        """Queue what compiled forwards wrote into the device log since it was last taken (no sync)."""
        snapshot = self.device_log.take(self.forwards) if self.device_log is not None else None
        if snapshot is not None:
            self._ship()  # calls handed in earlier stay ahead of it
            self._shipped.append(snapshot)
            self._uncounted.append(snapshot)
            self._shipped_most += snapshot.at_most
            self._trim()

    def _count_snapshots(self, wait: bool) -> None:
        """Count the device log snapshots not counted yet, oldest first (their order matters): all of them if
        `wait`, else those whose copies are done. Each is counted once, so this costs O(1) per forward."""
        while self._uncounted and (wait or self._uncounted[0].done):
            snapshot = self._uncounted.popleft()
            before = snapshot.at_most
            snapshot.count()
            self._shipped_most -= before - snapshot.at_most

    @_locked
    def add(self, record: LayerRecord) -> None:
        if not self.enabled:
            return
        self._flush()
        self._append(record)

    def receive(self, layer: str, counts: LayerCounts) -> None:
        """One layer call's `LayerCounts`: a record now (counts on the host) or deferred (counted when read)."""
        if not self.enabled:
            return
        held, decision, num_tokens, params, source = counts
        if type(held) is RoutingStats:
            self.add(make_record(self.forwards, layer, held, decision, params, source))
            return
        with self._lock:
            self._defer(layer, held, num_tokens, decision, params, source)

    def host_stats(self, counts: LayerCounts) -> RoutingStats:
        """`counts` as host `RoutingStats` now (one host sync unless they are there already)."""
        held = counts.counts
        if type(held) is RoutingStats:
            return held
        if type(held) is DeferredRouting:
            held = self._count([held.top_k_index], [held.modality], held.num_experts)[0]
        tokens, vision = held.tolist()
        return RoutingStats(tuple(tokens), tuple(vision), counts.num_tokens)

    def _count(self, indices: list, modalities: list, num_experts: int) -> torch.Tensor:
        if self.count_routing is None:
            raise ValueError(
                "this Telemetry was built without count_routing, so it cannot count deferred routing; "
                "use the one a ReaLB model owns (realb_hf.get_telemetry(model))"
            )
        return self.count_routing(indices, modalities, num_experts)

    @_locked
    def add_deferred(
        self,
        layer: str,
        counts: Any,
        num_tokens: int,
        decision: Decision | None,
        params: PolicyParams,
        modality_source: str,
    ) -> None:
        """Like `add`, from `counts` = (2, experts) tokens / vision tokens still on the device, or the
        `DeferredRouting` to count later. `decision` None: it was made on the device
        (`policy.lowered_experts_on_device`); `decide` recomputes it when the record is built."""
        if not self.enabled:
            return
        self._defer(layer, counts, num_tokens, decision, params, modality_source)

    def _defer(self, layer: str, counts: Any, num_tokens: int, decision, params, modality_source: str) -> None:
        held = counts.nbytes if type(counts) is DeferredRouting else 0
        if len(self._pending) >= MAX_PENDING or self._pending_bytes + held > MAX_PENDING_BYTES:
            self._ship()
        self._pending.append((self.forwards, layer, counts, num_tokens, decision, params, modality_source))
        self._pending_bytes += held

    def _ship(self) -> None:
        """Count the pending calls' deferred routing and start copying all their counts to the host (no sync)."""
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        if not pending:
            return
        # one chunk per group: deferred routing counted together per (experts, top-k, device), device counts
        # concatenated per device; no per-call tensor op, so shipping 4096 decode calls costs a few launches
        groups: dict[tuple, list[int]] = {}
        for i, entry in enumerate(pending):
            c = entry[2]
            if type(c) is DeferredRouting:
                key = (c.num_experts, c.top_k_index.shape[-1], c.top_k_index.device)
            else:
                key = (c.shape[-1], 0, c.device)
            groups.setdefault(key, []).append(i)
        chunks, entries = [], [None] * len(pending)
        for chunk, ((experts, top_k, _), members) in enumerate(groups.items()):
            held = [pending[i][2] for i in members]
            if top_k:
                counts = self._count([r.top_k_index for r in held], [r.modality for r in held], experts)
            else:
                counts = torch.stack(held)
            chunks.append(to_host(counts))
            for j, i in enumerate(members):
                forward, layer, _, num_tokens, decision, params, source = pending[i]
                entries[i] = (forward, layer, num_tokens, decision, params, source, chunk, 2 * experts * j, experts)
        self._shipped.append(_Shipped(entries, chunks))
        self._shipped_most += len(entries)
        self._trim()

    def _flush(self) -> None:
        """Build the records of every call handed in so far (waits for their counts: one host sync)."""
        self._take_log()
        self._ship()
        self._count_snapshots(wait=True)
        shipped, self._shipped, self._shipped_most = self._shipped, deque(), 0
        for batch in shipped:
            if type(batch) is LogSnapshot:
                for call in batch.calls:
                    self._append(make_record(*call))
                self.dropped += batch.unknown
                continue
            values = []
            for host, event in batch.chunks:
                if event is not None:
                    event.synchronize()
                values.append(host.tolist())
            for forward, layer, num_tokens, decision, params, source, chunk, offset, experts in batch.entries:
                flat = values[chunk]
                tokens, vision = flat[offset : offset + experts], flat[offset + experts : offset + 2 * experts]
                stats = RoutingStats(tuple(tokens), tuple(vision), num_tokens)
                if decision is None:
                    decision = decide(stats, params)
                self._append(make_record(forward, layer, stats, decision, params, source))

    def _window(self) -> int | None:
        """`max_records`, checked where it is used (it is a field anyone may set)."""
        n = self.max_records
        if n is not None and (type(n) is not int or n < 0):
            raise ValueError(f"Telemetry.max_records must be None (keep every record) or a whole number >= 0, got {n!r}")
        return n

    def _trim(self) -> None:
        """Drop the oldest records and shipped calls beyond `max_records` (before building their records). Device
        log snapshots count once their copies are done (never waiting): until then they are kept."""
        window = self._window()
        if window is None or len(self._records) + self._shipped_most <= window:
            return
        self._count_snapshots(wait=False)
        in_flight = sum(s.at_most for s in self._uncounted)  # a few snapshots: copies still on their way
        excess = len(self._records) + self._shipped_most - in_flight - window
        drop = max(0, min(excess, len(self._records)))
        for _ in range(drop):
            self._records.popleft()
        self.dropped += drop
        excess -= drop
        while excess > 0 and self._shipped:
            oldest = self._shipped[0]
            if type(oldest) is LogSnapshot and not oldest.counted:
                break
            drop = min(excess, len(oldest.held))
            del oldest.held[:drop]
            if not oldest.held:
                self._shipped.popleft()
            self.dropped += drop
            self._shipped_most -= drop
            excess -= drop

    def _append(self, record: LayerRecord) -> None:
        ring = self._records
        if ring.maxlen != self.max_records:  # made before max_records was set: keep the newest that fit
            before = len(ring)
            ring = self._records = deque(ring, maxlen=self._window())
            self.dropped += before - len(ring)
        if ring.maxlen is not None and len(ring) == ring.maxlen:
            self.dropped += 1  # the append below pushes the oldest record out
        ring.append(record)

    def reset(self) -> None:
        """Forget every record and restart the forward count; `reset_hooks` read what is there first."""
        for hook in list(self.reset_hooks):
            hook(self)
        with self._lock:
            self._take_log()
            self._count_snapshots(wait=True)  # the log's generations move past the calls dropped here
            self._clear()

    def _clear(self) -> None:
        self._records.clear()
        self._pending.clear()
        self._shipped.clear()
        self._shipped_most = 0
        self._uncounted.clear()
        self._pending_bytes = 0
        self.forwards = 0
        self.dropped = 0

    @_locked
    def last_forward(self) -> list[LayerRecord]:
        """Records of the most recent forward that reached an MoE layer."""
        self._flush()
        if not self._records:
            return []
        last = self._records[-1].forward
        found = []
        for record in reversed(self._records):  # the newest forward sits at the end: stop at the first older one
            if record.forward != last:
                break
            found.append(record)
        return found[::-1]

    def summary(self, records: Iterable[LayerRecord] | None = None) -> dict[str, Any]:
        """Means over records: the numbers a model card or a dashboard shows."""
        recs = list(self.records if records is None else records)
        n = len(recs)

        def mean(attr: str) -> float:
            """Mean over the records; 1.0 (balanced, no speed-up) when there are none."""
            return sum(getattr(r, attr) for r in recs) / n if n else 1.0

        pairs = sum(sum(r.tokens_per_rank) for r in recs)
        lowered_pairs = sum(r.lowered_fraction * sum(r.tokens_per_rank) for r in recs)
        return {
            "records": n,
            "forwards": self.forwards,
            "layers_lowered": sum(1 for r in recs if r.lowered_experts),
            "lowered_token_fraction": lowered_pairs / pairs if pairs else 0.0,
            "balancedness_tokens": mean("balancedness_tokens"),
            "balancedness_cost_before": mean("balancedness_cost_before"),
            "balancedness_cost_after": mean("balancedness_cost_after"),
            "predicted_speedup": mean("predicted_speedup"),
            "extra_memory_bytes": self.extra_memory_bytes,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "dropped_records": self.dropped,
            "records": [asdict(r) for r in self.records],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialize everything; also write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @staticmethod
    def records_from_json(text: str) -> list[LayerRecord]:
        return [LayerRecord(**r) for r in json.loads(text)["records"]]
