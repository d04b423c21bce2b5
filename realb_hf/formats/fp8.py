"""fp8 (e4m3) with rowwise scales: the format Hopper can run faster than bf16.

Scales: one fp32 scale per activation row and one per (expert, output row) of the weight, both
`amax / 448` over the reduction dim K: the layout `torch._scaled_grouped_mm` takes on sm90 with fast accumulation
(docs/benchmarks.md has its speed against the bf16 grouped GEMM).

Non-finite rows (activations or weights): quantization never raises.
- A row holding inf gets an inf scale; its finite entries quantize to 0 and its inf entries to NaN, so
  the row's output is NaN.
- A row holding NaN gets a NaN scale and NaN entries, so its output is NaN.
- An all-zero row gets a tiny positive scale (amax is clamped to 1e-12 first), so it quantizes to exact
  zeros with no 0/0 NaN.
Scales are per row, so a non-finite row never changes any other row's quantization. (The experts module
routes rows holding non-finite values to bf16 anyway; this only guarantees "no crash, zeros stay zero,
finite rows unaffected".)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import rows as row_kernels
from ..kernels.grouped_mm import SCALED_GROUPED_MM
from ..kernels.rows import AMAX_EPS, FP8_DTYPE, FP8_MAX, INV_FP8_MAX, quantize_rowwise
from .base import PrecisionFormat, shifted_index
from .capability import cuda_capability

# the format's definition lives with the kernels that reproduce it bit for bit
__all__ = [
    "AMAX_EPS",
    "FP8_DTYPE",
    "FP8_MAX",
    "INV_FP8_MAX",
    "Fp8Format",
    "Fp8Weight",
    "quantize_rowwise",
    "scaled_grouped_mm_reference",
]


@dataclass(frozen=True)
class Fp8Weight:
    """Expert weights in fp8: `data (E, N, K)` contiguous e4m3 and `scale (E, N)` fp32, one per output row.

    Contiguous (E, N, K) so that `data.transpose(-2, -1)` is the column-major operand that
    `torch._scaled_grouped_mm` wants.
    """

    data: torch.Tensor
    scale: torch.Tensor


def scaled_grouped_mm_reference(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: Fp8Weight, offs: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Exact emulation of the rowwise-scaled fp8 grouped GEMM: the numerical reference of the GPU path
    (`kernels.grouped_mm`; docs/design.md, "Error bounds per format")."""
    return SCALED_GROUPED_MM(xq, x_scale, weight.data, weight.scale, offs, out_dtype)


def _scaled_mm_loop(
    xq: torch.Tensor, x_scale: torch.Tensor, weight: Fp8Weight, offs: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """sm89 (Ada) path: one rowwise `torch._scaled_mm` per non-empty expert group.

    UNTESTED here (no sm89 machine was available); `torch._scaled_grouped_mm` needs sm90+, this is the
    per-expert equivalent with the same operands and scales.
    """
    out = torch.zeros(xq.shape[0], weight.data.shape[1], dtype=out_dtype, device=xq.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = torch._scaled_mm(
                xq[start:end],
                weight.data[e].t(),
                scale_a=x_scale[start:end, None].contiguous(),
                scale_b=weight.scale[e][None, :].contiguous(),
                out_dtype=out_dtype,
                use_fast_accum=True,
            )
        start = end
    return out


class Fp8Format(PrecisionFormat):
    """Rowwise-scaled e4m3 weights and activations (W8A8), the speed tier on Hopper and Ada."""

    name = "fp8"
    bits = 8
    supports_padding = True

    def is_native(self, device: torch.device) -> bool:
        """fp8 tensor cores: CUDA capability 8.9 (Ada) and up."""
        return cuda_capability(device) >= (8, 9)

    def quantize_weight(self, weight: torch.Tensor, expert_flags: torch.Tensor | None = None) -> Fp8Weight:
        """bf16 -> fp8 conversion; on CUDA one bandwidth-bound Triton pass (bit-identical to the reference).

        `expert_flags (E,)` (device): on CUDA only flagged experts are converted, the others are left unwritten
        (callers route no rows to them), so the conversion can be queued before the host knows which."""
        if row_kernels.available(weight.device):
            data, scale = row_kernels.gather_quant_rows(weight, expert_flags=expert_flags)
        else:
            data, scale = quantize_rowwise(weight)
        return Fp8Weight(data=data.contiguous(), scale=scale)

    def weight_nbytes(self, packed: Fp8Weight) -> int:
        return packed.data.numel() * packed.data.element_size() + packed.scale.numel() * packed.scale.element_size()

    def grouped_linear(self, x: torch.Tensor, packed: Fp8Weight, offs: torch.Tensor) -> torch.Tensor:
        """Quantize `x` rowwise (dynamic, every call), then the fp8 grouped GEMM for this device.

        sm90+: `torch._scaled_grouped_mm` with fast accumulation.
        sm89: a per-expert `torch._scaled_mm` loop. Elsewhere: `scaled_grouped_mm_reference`.
        Every path produces bf16 (the only output `torch._scaled_grouped_mm` supports), then casts to
        `x.dtype`, so fp32 or fp16 activations get bf16-rounded results on every device alike.
        """
        if x.shape[0] == 0:
            return x.new_empty((0, packed.data.shape[1]))
        xq, x_scale = row_kernels.gather_quant_rows(x) if row_kernels.available(x.device) else quantize_rowwise(x)
        return _fp8_grouped_mm(xq, x_scale, packed, offs).to(x.dtype)

    def gather_activations(self, hidden, rows, start=None, count=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather + rowwise quantize in one pass (Triton on CUDA): (data e4m3, scale fp32)."""
        if row_kernels.available(hidden.device):
            return row_kernels.gather_quant_rows(hidden, rows, start, count)
        return quantize_rowwise(hidden[rows if start is None else shifted_index(rows, start)])

    def expert_mlp_on(self, activations, first, down, offs, gate, fused_swiglu, out_dtype, count=None):
        """The expert MLP on rows already in fp8 (quantized here, or received so over the EP all-to-all).

        On sm90 with Triton and plain SwiGLU: fp8 GEMM, SwiGLU fused with the quantization of its output, fp8
        GEMM. Otherwise the model's `gate` in `out_dtype` and a dynamically quantized second GEMM.
        """
        xq, x_scale = activations
        if xq.shape[0] == 0:
            return torch.empty(0, down.data.shape[1], dtype=out_dtype, device=xq.device)
        h = _fp8_grouped_mm(xq, x_scale, first, offs)
        if fused_swiglu and row_kernels.available(h.device) and cuda_capability(h.device) >= (9, 0):
            hq, h_scale = row_kernels.swiglu_quant_rows(h, count)
            return _fp8_grouped_mm(hq, h_scale, down, offs).to(out_dtype)
        return self.grouped_linear(gate(h.to(out_dtype)), down, offs).to(out_dtype)


def _fp8_grouped_mm(xq: torch.Tensor, x_scale: torch.Tensor, packed: Fp8Weight, offs: torch.Tensor) -> torch.Tensor:
    """The rowwise-scaled fp8 grouped GEMM for this device, bf16 out.

    sm90+: `torch._scaled_grouped_mm` with fast accumulation.
    sm89: a per-expert `torch._scaled_mm` loop. Elsewhere: `scaled_grouped_mm_reference`.
    """
    capability = cuda_capability(xq.device)
    if capability >= (9, 0):
        return torch._scaled_grouped_mm(
            xq,
            packed.data.transpose(-2, -1),
            scale_a=x_scale,
            scale_b=packed.scale,
            offs=offs,
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
    if capability >= (8, 9):
        return _scaled_mm_loop(xq, x_scale, packed, offs, torch.bfloat16)
    return scaled_grouped_mm_reference(xq, x_scale, packed, offs, torch.bfloat16)
