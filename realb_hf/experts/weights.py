"""The weights an experts module computes with, in every precision it runs: one API for the module's own
weights, the persistent low-precision cache, on-the-fly conversion and the side-stream prefetch.

Every format receives weights in the (E, N, K) "out x in" layout; gpt_oss-style (E, K, N) modules are read through
a transposed view. A low-precision copy holds some or all of the module's expert slots (`PackedWeights.slots`);
the grouped GEMM then takes one offset per held slot, so a copy of only the experts with rows costs nothing more.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..formats import get_format
from ..kernels import rows as row_kernels

# Share of the SMs a side-stream conversion may fill: the token dispatch queued beside it keeps the rest, which is
# what lets the two overlap instead of taking turns.
SIDE_STREAM_SM_SHARE = 0.25
_PERSISTENT_LOCK = threading.Lock()


@dataclass(frozen=True)
class PackedWeights:
    """(first, down) projections of the experts in `slots` (local ids, ascending), in format `fmt`."""

    fmt: str
    first: Any
    down: Any
    slots: Sequence[int]  # range(num_experts) for whole-module copies (flagged conversions leave unflagged slots unset)

    def covers(self, experts: Sequence[int]) -> bool:
        if isinstance(self.slots, range) and self.slots.start == 0 and self.slots.step == 1:
            return all(e < self.slots.stop for e in experts)
        return set(experts) <= set(self.slots)

    def offsets(self, rows_per_expert: Sequence[int], device: torch.device) -> torch.Tensor:
        """int32 cumulative row ends of the held slots, from rows per local expert (host ints)."""
        ends, total = [], 0
        for e in self.slots:
            total += rows_per_expert[e]
            ends.append(total)
        return row_kernels.host_to_device(ends, torch.int32, device)


def source_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's (first, down) projection weights as (E, N, K) views (no copies)."""
    first = module.gate_up_proj if module.has_gate else module.up_proj
    down = module.down_proj
    if module.is_transposed:
        return first.transpose(-2, -1), down.transpose(-2, -1)
    return first, down


def own_weights(module: torch.nn.Module, fmt: str) -> PackedWeights:
    first, down = source_weights(module)
    return PackedWeights(fmt, first, down, range(first.shape[0]))


def convert(
    module: torch.nn.Module, fmt: str, experts: Sequence[int] | None = None, flags: torch.Tensor | None = None
) -> PackedWeights:
    """Convert now (transient): the listed local `experts` (ascending), or every slot with those flagged in `flags`
    ((E,) bool on the device) converted and the others skipped where the format can (CUDA)."""
    packer = get_format(fmt)
    first, down = source_weights(module)
    with torch.no_grad():
        if experts is None:
            return PackedWeights(
                fmt,
                packer.quantize_weight(first.detach(), expert_flags=flags),
                packer.quantize_weight(down.detach(), expert_flags=flags),
                range(first.shape[0]),
            )
        experts = list(experts)
        if experts == list(range(experts[0], experts[-1] + 1)):  # rank granularity: a slice, no gather
            first, down = first[experts[0] : experts[-1] + 1], down[experts[0] : experts[-1] + 1]
        else:
            index = row_kernels.host_to_device(experts, torch.long, first.device)
            first, down = first.index_select(0, index), down.index_select(0, index)
        return PackedWeights(
            fmt, packer.quantize_weight(first.detach()), packer.quantize_weight(down.detach()), tuple(experts)
        )


def persistent(module: torch.nn.Module, fmt: str) -> PackedWeights:
    """Every expert in `fmt`, converted once and kept on the module (`realb_weight_cache`); the bytes are reported
    in telemetry's `extra_memory_bytes`."""
    cache = module.realb_weight_cache
    if fmt not in cache:
        with _PERSISTENT_LOCK:  # threads sharing the model convert once
            if fmt not in cache:
                packed = convert(module, fmt)
                packer = get_format(fmt)
                extra = packer.weight_nbytes(packed.first) + packer.weight_nbytes(packed.down)
                module.realb_runtime.telemetry.extra_memory_bytes += extra
                cache[fmt] = packed
    return cache[fmt]


def weights_for(
    module: torch.nn.Module,
    fmt: str,
    *,
    experts: Sequence[int] | None = None,
    flags: torch.Tensor | None = None,
    ready: Prefetch | None = None,
) -> PackedWeights:
    """The module's experts in `fmt`, for rows of the listed local `experts` or of the experts flagged in `flags`.

    High precision: the module's own weights. persistent: the kept copy. on_the_fly: what `ready` converted ahead of
    time if it holds them, else a conversion now (freed with the layer).
    """
    config = module.realb_runtime.settings.config  # the settings this forward decides with
    if fmt == config.high_precision:
        return own_weights(module, fmt)
    if config.weight_cache == "persistent":
        return persistent(module, fmt)
    prepared = ready.get(fmt) if ready is not None else None
    if prepared is not None:
        whole = isinstance(prepared.slots, range)
        if (flags is not None and whole) or (experts is not None and prepared.covers(experts)):
            return prepared
    return convert(module, fmt, experts, flags)


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class Prefetch:
    """One layer's lowered experts converted ahead of the expert GEMMs (`weight_cache="on_the_fly"` under EP).

    CUDA with `side_stream`: queued on a side stream once the decision is known, before the token dispatch is queued
    on the compute stream, so the two run concurrently; `get` makes the compute stream wait for it. The tensors live
    until the layer returns. They are allocated on the side stream and read on the compute stream; reusing their
    memory is safe without `record_stream` because every later conversion first waits for the compute stream, i.e.
    for every read of the earlier layer's tensors. Elsewhere (or `side_stream=False`) converted inline.
    """

    def __init__(self, packed: dict[str, PackedWeights], event: Any = None):
        self._packed = packed
        self._event = event

    @classmethod
    def start(
        cls,
        module: torch.nn.Module,
        requests: dict[str, Sequence[int] | None],
        side_stream: bool,
        flags: torch.Tensor | None = None,
    ) -> Prefetch | None:
        """Convert `requests` (format -> local experts, or None: every slot flagged in `flags`); None when nothing
        is converted per layer (persistent copies, or no request)."""
        if module.realb_runtime.settings.config.weight_cache != "on_the_fly" or not requests:
            return None
        device = module.down_proj.device

        def run() -> dict[str, PackedWeights]:
            return {
                fmt: convert(module, fmt, experts, flags if experts is None else None)
                for fmt, experts in requests.items()
            }

        if not (side_stream and device.type == "cuda"):
            return cls(run())
        stream = _side_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), row_kernels.background(SIDE_STREAM_SM_SHARE):
            packed = run()
        event = torch.cuda.Event()
        event.record(stream)
        return cls(packed, event)

    def get(self, fmt: str) -> PackedWeights | None:
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None
        return self._packed.get(fmt)

    @property
    def converted(self) -> int:
        """Experts converted; -1 when the device chose them (flagged conversions)."""
        if any(isinstance(p.slots, range) for p in self._packed.values()):
            return -1
        return sum(len(p.slots) for p in self._packed.values())
