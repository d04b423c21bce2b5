"""bf16: the unlowered precision, computed exactly like stock transformers.

Experts that stay in bf16 must give the same bits as a model without realb_hf, so the grouped GEMM is
transformers' own `_grouped_mm` dispatcher (torch grouped mm where available, its loop fallback
elsewhere) fed with the same `(E, K, N)` transposed view that `_grouped_linear` builds.
"""

from __future__ import annotations

import torch

from ..kernels import rows as row_kernels
from .base import PrecisionFormat


def bf16_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`x (S, K)` rows grouped by `offs`, `weight (E, N, K)` -> `(S, N)` via transformers' `_grouped_mm`.

    Runs in `weight.dtype` (transformers casts `x` to it). Imported lazily: importing transformers'
    MoE integration is slow and `import realb_hf` should not pay for it.
    """
    from transformers.integrations.moe import _grouped_mm

    return _grouped_mm(x, weight.transpose(-2, -1), offs=offs)


class Bf16Format(PrecisionFormat):
    """Keep the model's own weights and GEMM: the high-precision side of every ReaLB decision."""

    name = "bf16"
    bits = 16
    supports_padding = True

    def is_native(self, device: torch.device) -> bool:
        """Always: every device runs the model's own dtype."""
        return True

    def quantize_weight(self, weight: torch.Tensor, expert_flags: torch.Tensor | None = None) -> torch.Tensor:
        """The weight itself (no copy): bf16 experts cost no extra memory."""
        return weight

    def weight_nbytes(self, packed: torch.Tensor) -> int:
        """Bytes of the original weight (shared with the model, not an extra copy)."""
        return packed.numel() * packed.element_size()

    def grouped_linear(self, x: torch.Tensor, packed: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_empty((0, packed.shape[1]))
        return bf16_grouped_mm(x, packed, offs).to(x.dtype)

    def gather_activations(self, hidden, rows, start=None, count=None):
        """With a device-side `count` on CUDA: one Triton pass that copies only the real rows."""
        if count is not None and row_kernels.available(hidden.device):
            return (row_kernels.gather_quant_rows(hidden, rows, start, count, quantize=False)[0],)
        return super().gather_activations(hidden, rows, start, count)

    def expert_mlp_on(self, activations, first, down, offs, gate, fused_swiglu, out_dtype, count=None):
        """The model's own GEMMs; with a device-side `count` on CUDA, SwiGLU as one Triton pass over the real rows
        (rounded as eager `silu(gate) * up` rounds)."""
        (x,) = activations
        if count is None or not (fused_swiglu and row_kernels.available(x.device)):
            return super().expert_mlp_on(activations, first, down, offs, gate, fused_swiglu, out_dtype, count)
        h = self.grouped_linear(x, first, offs)
        act, _ = row_kernels.swiglu_rows(h, count, quantize=False)
        return self.grouped_linear(act, down, offs).to(out_dtype)
