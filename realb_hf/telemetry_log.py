"""The device log that compiled forwards write their layers' routing counts into.

Under torch.compile a telemetry hand-off per MoE layer would be a host operator, and each one splits the CUDA graph
that `mode="reduce-overhead"` (and static-cache generate) records. Instead every converted experts module owns a
small int32 buffer, `realb_log`, that compiled code overwrites in place: a few device ops, recorded in the graph
like any other. Once per forward, at the start of the next one (or when telemetry is read), the host copies all
logs to pinned memory without a sync; records are built from those copies when read.

Row of one log (int32): [generation, settings serial, source code, kind, num_tokens, pairs per expert (E),
vision pairs per expert (E)].

Invariants:
- a layer call adds 1 to `generation`, and a layer runs at most once per forward: a copy whose generation differs
  from the one last read was written by the forward it was copied after; logs start at zero (nothing written);
- the serial names the `Settings` the call decided with and `kind` where its decision came from, so a record is
  rebuilt exactly as eager code builds it (`KIND_CONFIG`: from the config alone; `KIND_COUNTS`: from the counts);
- logs are module buffers: they move with `.to()`, stay out of checkpoints (non-persistent), and dynamo treats them
  as static inputs, so CUDA graphs that write them are replayed, not skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .modality import SOURCE_IMAGE_MASK, SOURCE_NONE, SOURCE_TOKEN_IDS, SOURCE_TYPE_IDS
from .policy import Decision, PolicyParams, RoutingStats, decide, decide_without_routing

BUFFER = "realb_log"
HEADER = 5  # generation, serial, source, kind, num_tokens
KIND_COUNTS, KIND_CONFIG = 1, 2
SOURCES = (SOURCE_NONE, SOURCE_TOKEN_IDS, SOURCE_TYPE_IDS, SOURCE_IMAGE_MASK)

# (serial, device) -> the policy parameters a logged call decided with, or None when they are no longer known
ParamsOf = Callable[[int, torch.device], PolicyParams | None]
# (forward, layer, stats, decision, params, modality source): one layer call, ready for `make_record`
LoggedCall = tuple[int, str, RoutingStats, Decision, PolicyParams, str]


def attach_log(module: torch.nn.Module, num_experts: int) -> None:
    """Give `module` a zeroed log for `num_experts` global experts, on the device of its weights."""
    first = next(module.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    module.register_buffer(BUFFER, torch.zeros(HEADER + 2 * num_experts, dtype=torch.int32, device=device),
                           persistent=False)  # fmt: skip


def write_log(log: torch.Tensor, counts: torch.Tensor, num_tokens: int, serial: int, source: str, kind: int) -> None:
    """Overwrite `log (HEADER + 2E,)` with one layer call: `counts (2, E)` and the header. Plain tensor ops on the
    log's device (fills, not a tensor built from a list, which would be a host copy inside a CUDA graph)."""
    log[0:1].add_(1)
    for i, value in enumerate((serial, SOURCES.index(source), kind, num_tokens), start=1):
        log[i : i + 1].fill_(value)
    log[HEADER:].copy_(counts.reshape(-1))


@dataclass
class LogSnapshot:
    """The logs as a forward left them, copying to the host: `layers` holds (name, device, offset, experts) into
    the flat copy of that device (`copies[device]`, with the CUDA event marking it done, or None).

    Read in two steps, both in the order snapshots were taken: `count` compares generations only (which layers
    this forward wrote: cheap, so trimming never builds a record), `calls` decodes the rows still held."""

    forward: int
    layers: list[tuple[str, torch.device, int, int]]
    copies: dict[torch.device, tuple[torch.Tensor, Any]]
    reader: LogReader
    unknown: int = 0  # calls whose settings were no longer known when decoded (not rebuilt)
    _written: list[int] | None = None  # indices into `layers` of the rows this forward wrote, once counted

    @property
    def done(self) -> bool:
        return all(event is None or event.query() for _, event in self.copies.values())

    def count(self) -> list[int]:
        """The rows this forward wrote (waits for the copy the first time: one host sync unless done)."""
        if self._written is None:
            self._written = self.reader.count(self)
        return self._written

    @property
    def counted(self) -> bool:
        return self._written is not None

    @property
    def held(self) -> list[int]:
        """The written rows not yet dropped: all of them once counted, none before."""
        return self._written if self._written is not None else []

    @property
    def at_most(self) -> int:
        """How many calls it can hold: exact once counted, one per log before."""
        return len(self._written) if self._written is not None else len(self.layers)

    @property
    def calls(self) -> list[LoggedCall]:
        """The layer calls of the rows held (counts them first if need be)."""
        return self.reader.decode(self, self.count())


@dataclass
class LogReader:
    """Turns snapshots into layer calls. Generations are compared with the last snapshot counted, so snapshots are
    counted in the order they were taken. Calls whose settings are no longer known are counted in the snapshot's
    `unknown` instead of being rebuilt."""

    params_of: ParamsOf
    generations: dict[str, int] = field(default_factory=dict)

    def count(self, snapshot: LogSnapshot) -> list[int]:
        for _, event in snapshot.copies.values():
            if event is not None:
                event.synchronize()
        rows: dict[torch.device, list[int]] = {}
        for i, (_, device, _, _) in enumerate(snapshot.layers):
            rows.setdefault(device, []).append(i)
        generation = {}
        for device, members in rows.items():  # one gather per device: generations sit at each log's offset
            at = torch.tensor([snapshot.layers[i][2] for i in members])
            generation.update(zip(members, snapshot.copies[device][0][at].tolist(), strict=True))
        written = []
        for i, (layer, _, _, _) in enumerate(snapshot.layers):
            if self.generations.get(layer, 0) != generation[i]:  # logs start at 0: never written stays unseen
                self.generations[layer] = generation[i]
                written.append(i)
        return written

    def decode(self, snapshot: LogSnapshot, rows: list[int]) -> list[LoggedCall]:
        calls = []
        for i in rows:
            layer, device, offset, experts = snapshot.layers[i]
            row = snapshot.copies[device][0][offset : offset + HEADER + 2 * experts].tolist()
            _, serial, source, kind, num_tokens = row[:HEADER]
            params = self.params_of(serial, device)
            if params is None:
                snapshot.unknown += 1
                continue
            body = row[HEADER:]
            stats = RoutingStats(tuple(body[:experts]), tuple(body[experts:]), num_tokens)
            decision = decide_without_routing(params, experts) if kind == KIND_CONFIG else decide(stats, params)
            calls.append((snapshot.forward, layer, stats, decision, params, SOURCES[source]))
        return calls


class DeviceLog:
    """The logs of one model's experts modules, and whether a compiled forward may have written them since they
    were last copied (`mark_written`), so that eager-only use never pays for a copy. Holds the modules themselves:
    a deep copy of the model then gets a log of its own modules."""

    def __init__(self, params_of: ParamsOf) -> None:
        self.reader = LogReader(params_of)
        self._modules: list[tuple[str, torch.nn.Module]] = []
        self._written = False

    def add(self, name: str, module: torch.nn.Module) -> None:
        self._modules.append((name, module))

    def mark_written(self) -> None:
        self._written = True

    def take(self, forward: int) -> LogSnapshot | None:
        """Start copying every log to the host (no sync) if a compiled forward wrote since the last take."""
        if not self._written:
            return None
        self._written = False
        parts: dict[torch.device, list[torch.Tensor]] = {}
        sizes: dict[torch.device, int] = {}
        layers = []
        for name, module in self._modules:
            log = getattr(module, BUFFER, None)
            if log is None:
                continue
            offset = sizes.get(log.device, 0)
            layers.append((name, log.device, offset, (log.numel() - HEADER) // 2))
            parts.setdefault(log.device, []).append(log)
            sizes[log.device] = offset + log.numel()
        copies = {device: to_host(torch.cat(logs)) for device, logs in parts.items()}  # cat: a fresh tensor
        return LogSnapshot(forward, layers, copies, self.reader) if layers else None


def to_host(counts: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """`counts` as one flat int32 host tensor; from CUDA an asynchronous copy into pinned memory, with the event
    that marks it done."""
    flat = counts.reshape(-1).to(torch.int32)
    if flat.device.type != "cuda":
        return flat, None
    host = torch.empty(flat.shape, dtype=torch.int32, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(flat.device))
    return host, event
