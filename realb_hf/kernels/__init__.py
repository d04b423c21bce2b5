"""The kernel layer: fused GPU kernels (Triton) as registered `realb_kernels::` torch operators, each with the torch
reference it reproduces.

- `rows`: row gathers with rowwise fp8 quantization, fused SwiGLU, and the fp8 rowwise format they reproduce.
- `counts`: routing counts per expert and the dynamic policy's per-expert decision.
- `sort`: the stable counting sort of a layer's rows by (precision group, expert).
- `combine`: the weighted top-k combine.
- `exchange`: the counts an EP all-to-all exchanges, with the finite check.
- `library`: how the operators are registered (schema, reference kernel on every device, Triton kernel on
  CUDA, fake implementation, an opt-in traceable form whose kernels inductor launches), so torch.compile traces
  them and CUDA graphs capture them.

A leaf: nothing here imports the rest of realb_hf, so every layer above may use it. The references run on every
device and define what the kernels compute; the GPU and interpreter tests hold the two equal.
"""

from . import combine, counts, exchange, grouped_mm, rows, sort  # noqa: F401  (every operator registered)
from .library import traceable_names, use_traceable

use_traceable(traceable_names())  # REALB_TRACEABLE_KERNELS; a bad value fails at import, naming what is allowed
