"""MXFP4 (W4A4) through torchao's `MXTensor`: e2m1 values with an e8m0 (power-of-two) scale per 32.

No global scale: each 32-block is self-scaled, so non-finite or zero blocks touch nothing else. Scales
use torchao's default FLOOR rule (OCP MX spec). MXTensor has no 3-D grouped matmul, so the emulated path
dequantizes the 3-D weight itself (see `emulation.py`).

torchao is imported lazily (it takes seconds to import).
"""

from __future__ import annotations

from typing import Any

import torch

from .capability import cuda_capability
from .emulation import EmulatedFp4Format

BLOCK_SIZE = 32


def _to_mx(t: torch.Tensor, native: bool) -> Any:
    from torchao.prototype.mx_formats.config import ScaleCalculationMode
    from torchao.prototype.mx_formats.mx_tensor import MXTensor
    from torchao.quantization.quantize_.common import KernelPreference

    return MXTensor.to_mx(
        t,
        torch.float4_e2m1fn_x2,
        BLOCK_SIZE,
        scaling_mode=ScaleCalculationMode.FLOOR,
        kernel_preference=KernelPreference.AUTO if native else KernelPreference.EMULATED,
    )


class Mxfp4Format(EmulatedFp4Format):
    """MXFP4 weights and dynamically quantized MXFP4 activations (OCP microscaling FP4)."""

    name = "mxfp4"
    bits = 4
    block_size = BLOCK_SIZE

    def is_native(self, device: torch.device) -> bool:
        """CUDA capability 10.0+ (FP4 tensor cores)."""
        return cuda_capability(device) >= (10, 0)

    def _quantize_weight(self, weight: torch.Tensor) -> Any:
        return _to_mx(weight, native=self.is_native(weight.device))

    def weight_nbytes(self, packed: Any) -> int:
        return sum(t.numel() * t.element_size() for t in (packed.qdata, packed.scale))

    def _dequantize_weight(self, packed: Any, dtype: torch.dtype) -> torch.Tensor:
        return packed.dequantize(dtype)

    def _fake_quantize_activation(
        self, x: torch.Tensor, offs: torch.Tensor, row_amax: torch.Tensor, finite_rows: torch.Tensor
    ) -> torch.Tensor:
        return _to_mx(x, native=False).dequantize(torch.float32)

    def _out_features(self, packed: Any) -> int:
        return packed.shape[1]

    def _is_native_packed(self, packed: Any) -> bool:
        from torchao.quantization.quantize_.common import KernelPreference

        return packed.kernel_preference == KernelPreference.AUTO

    def _native_grouped_linear(self, x: torch.Tensor, packed: Any, offs: torch.Tensor) -> torch.Tensor:
        """One real MXFP4 GEMM per non-empty expert group (torchao's `MXTensor` mm override, which calls
        `torch.nn.functional.scaled_mm` with swizzled e8m0 scales).

        UNTESTED here: no sm100 machine was available. Kept separate from the emulated path on purpose.
        """
        out = x.new_zeros((x.shape[0], packed.shape[1]))
        start = 0
        for e, end in enumerate(offs.tolist()):
            if end > start:
                xq = _to_mx(x[start:end].to(torch.bfloat16).contiguous(), native=True)
                out[start:end] = torch.mm(xq, packed[e].t()).to(x.dtype)
            start = end
        return out
