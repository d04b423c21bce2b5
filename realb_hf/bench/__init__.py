"""Workloads and benchmarks for ReaLB.

- `workload`: synthetic vision-skewed routing (`WorkloadSpec`, `generate`, `workload_for_skew`, `rank_load`).
- `trace`: record a real model's routing in one call (`record_trace`) and replay it (`Trace`, `replay_routing`).
- `layer`: one MoE experts layer of a real model under virtual EP (`run_layer_bench`).
- `model`: end-to-end prefill of a whole model (`run_model_bench`).
- `report`: environment record, markdown, JSON/plot files.
- `hot_rank`, `decode_overhead`: one EP rank's experts forward, stock vs ReaLB (a straggler's prefill; a decode
  batch where nothing is lowered).
- `generation`: `generate` decode steps, stock vs ReaLB, static and dynamic cache, split into GPU and host time.
- `compiled`: the compiled rows (`--compile`) and the nothing-lowered configuration the benchmarks share.
- `ep_layer`, `ep_prefill`: real expert parallelism under torchrun (one layer timed; end-to-end prefill). Their
  equality with one process is checked by the repository's harness, `tests/ep_check.py`.

Command line: `python -m realb_hf.bench {layer,model,trace-info} --help`, `python -m realb_hf.bench.<script> --help`.
"""

from .trace import Trace, TraceRecorder, record_trace, replay_routing
from .workload import RankLoad, Workload, WorkloadSpec, generate, rank_load, workload_for_skew

__all__ = [
    "RankLoad",
    "Trace",
    "TraceRecorder",
    "Workload",
    "WorkloadSpec",
    "generate",
    "rank_load",
    "record_trace",
    "replay_routing",
    "workload_for_skew",
]
