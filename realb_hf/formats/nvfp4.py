"""NVFP4 (W4A4) through torchao's `NVFP4Tensor`: e2m1 values, an e4m3 scale per 16, an fp32 global scale.

Global scales: per expert for weights (torchao's 3-D `per_tensor_scale` of shape (E, 1, 1)), per expert
*group of rows* for activations. The per-group activation scale is what torchao's real grouped kernel
computes (MSLK `calculate_group_max`), so emulation and kernel round identically, and it costs one row
amax plus a scatter-max over E groups. One scale per tensor would be cheaper still but lets one loud
expert group coarsen the others' e4m3 block scales (a small effect, because e4m3 block scales already span a
wide range: docs/design.md); one per row would be finer than any kernel takes. Zero groups get a global scale from
amax 1 (no 0/0), and non-finite rows are left out of their group's amax (see `emulation.py` for what
they yield).

CPU and CUDA emulation are close but not bit-identical (docs/design.md): torchao computes block scales as `amax / 6.0`, which CUDA evaluates as a multiplication by an inexact
reciprocal, flipping a few rounding ties.

torchao is imported lazily (it takes seconds to import).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from .capability import cuda_capability
from .emulation import EmulatedFp4Format

BLOCK_SIZE = 16
# The native grouped kernel's swizzled e4m3 block scales tile 128 rows x 4 scale columns per expert.
_NATIVE_N_MULTIPLE = 128
_NATIVE_K_MULTIPLE = 64


def _global_scale(amax: torch.Tensor) -> torch.Tensor:
    """torchao's `amax / (448 * 6)`, with amax 1 for all-zero (or NaN-amax) slices so no 0/0 appears."""
    from torchao.prototype.mx_formats.nvfp4_tensor import per_tensor_amax_to_scale

    return per_tensor_amax_to_scale(torch.where(amax > 0, amax, torch.ones_like(amax)))


def row_group_ids(offs: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Expert group of each row (`offs` = cumulative row ends); rows past `offs[-1]` get id E."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, rows, right=True)


class Nvfp4Format(EmulatedFp4Format):
    """NVFP4 weights and dynamically quantized NVFP4 activations: the paper's Blackwell format."""

    name = "nvfp4"
    bits = 4
    block_size = BLOCK_SIZE

    def is_native(self, device: torch.device) -> bool:
        """CUDA capability 10.0+ (FP4 tensor cores) and the MSLK package, which torchao's grouped
        NVFP4 kernel needs to quantize activations."""
        return cuda_capability(device) >= (10, 0) and importlib.util.find_spec("mslk") is not None

    def _quantize_weight(self, weight: torch.Tensor) -> Any:
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

        num_experts, n, k = weight.shape
        amax = weight.abs().amax(dim=(1, 2)).float()
        per_expert_scale = _global_scale(amax).view(num_experts, 1, 1)
        native = self.is_native(weight.device) and n % _NATIVE_N_MULTIPLE == 0 and k % _NATIVE_K_MULTIPLE == 0
        return NVFP4Tensor.to_nvfp4(
            weight, block_size=BLOCK_SIZE, per_tensor_scale=per_expert_scale, is_swizzled_scales=native
        )

    def weight_nbytes(self, packed: Any) -> int:
        tensors = (packed.qdata, packed.scale, packed.per_tensor_scale)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _dequantize_weight(self, packed: Any, dtype: torch.dtype) -> torch.Tensor:
        return packed.dequantize(dtype)

    def _fake_quantize_activation(
        self, x: torch.Tensor, offs: torch.Tensor, row_amax: torch.Tensor, finite_rows: torch.Tensor
    ) -> torch.Tensor:
        """Quantize with a per-expert-group global scale, then dequantize to fp32.

        torchao takes a per-slice global scale only on 3-D data (shape (E, 1, 1)), so each row is viewed as
        its own (1, K) slice carrying its group's scale.
        """
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

        num_rows, k = x.shape
        ids = row_group_ids(offs, num_rows).long()
        finite_amax = torch.where(finite_rows, row_amax, torch.zeros_like(row_amax))
        group_amax = finite_amax.new_zeros(offs.shape[0] + 1).scatter_reduce(0, ids, finite_amax, reduce="amax")
        row_scale = _global_scale(group_amax)[ids]
        q = NVFP4Tensor.to_nvfp4(
            x.view(num_rows, 1, k), block_size=BLOCK_SIZE, per_tensor_scale=row_scale.view(-1, 1, 1)
        )
        return q.dequantize(torch.float32).view(num_rows, k)

    def _out_features(self, packed: Any) -> int:
        return packed.shape[1]

    def _is_native_packed(self, packed: Any) -> bool:
        return bool(packed.is_swizzled_scales)

    def _native_grouped_linear(self, x: torch.Tensor, packed: Any, offs: torch.Tensor) -> torch.Tensor:
        """torchao's `aten._grouped_mm` override for NVFP4Tensor (MSLK activation quantization with
        per-group global scales, then `torch.nn.functional.scaled_grouped_mm` on FP4 tensor cores).

        UNTESTED here: no sm100 machine was available. Kept separate from the emulated path on purpose.
        Non-finite rows are NOT isolated here (they enter their group's global scale); the experts module
        routes them to bf16 before they reach this path.
        """
        out = torch._grouped_mm(x.to(torch.bfloat16).contiguous(), packed.transpose(-2, -1), offs=offs)
        return out.to(x.dtype)
