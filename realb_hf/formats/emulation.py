"""What NVFP4 and MXFP4 share: shape rules, the emulated (dequantize-then-GEMM) path, and its warning.

Without FP4 tensor cores (everything below CUDA capability 10.0, and CPU) there is no FP4 matmul, so
both formats are *emulated*: weights and activations are rounded to the format exactly as the real
kernels would see them, dequantized to the activations' dtype, and multiplied by the bf16 grouped GEMM
(the same transformers `_grouped_mm` as bf16 experts). This reproduces the format's rounding error, for
accuracy studies; it is slower than plain bf16, never a speed-up, and a one-time `EmulationWarning`
says so.

Non-finite activation rows: a row holding inf or NaN is passed through unquantized (so its output is
inf/NaN as it would be in bf16) and is left out of every shared scale, so finite rows in the same batch
or expert group are unaffected. All-zero rows stay exactly zero.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from typing import Any

import torch

from .base import PrecisionFormat
from .bf16 import bf16_grouped_mm


class EmulationWarning(UserWarning):
    """An FP4 format is running emulated: numerically faithful, but slower than bf16."""


_warned: set[str] = set()


def warn_emulation_once(name: str, device: torch.device) -> None:
    """Warn the first time (per process and format) that `name` runs emulated."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"realb_hf: {name} matmuls on {device} are emulated (quantize, dequantize, then a bf16 grouped GEMM). "
        "Emulation is for accuracy studies and is slower than bf16, not faster; real FP4 kernels need CUDA "
        "capability >= 10.0 (Blackwell).",
        EmulationWarning,
        stacklevel=3,
    )


def _reset_emulation_warnings() -> None:
    """Forget which formats already warned (for tests)."""
    _warned.clear()


def torchao_input(t: torch.Tensor) -> torch.Tensor:
    """torchao's MX/NVFP4 quantizers take contiguous bf16 or fp32 only: upcast anything else."""
    if t.dtype not in (torch.bfloat16, torch.float32):
        t = t.float()
    return t.contiguous()


class EmulatedFp4Format(PrecisionFormat):
    """Base of the FP4 formats: K checks, the S == 0 case, and the native-or-emulated choice.

    Subclasses say how to quantize/dequantize; whether a packed weight runs natively is decided once, in
    `quantize_weight`, from the weight's device (the packed layout differs), and read back by
    `_is_native_packed`.
    """

    block_size: int

    def _check_k(self, shape: torch.Size) -> None:
        if len(shape) == 0 or shape[-1] % self.block_size != 0:
            raise ValueError(
                f"{self.name} needs the reduction dim K (the last dim) to be divisible by its block size "
                f"{self.block_size}; got a tensor of shape {tuple(shape)}"
            )

    def quantize_weight(self, weight: torch.Tensor, expert_flags: torch.Tensor | None = None) -> Any:
        if weight.dim() != 3:
            raise ValueError(f"{self.name} expects expert weights of shape (E, N, K); got {tuple(weight.shape)}")
        self._check_k(weight.shape)
        return self._quantize_weight(torchao_input(weight))

    def grouped_linear(self, x: torch.Tensor, packed: Any, offs: torch.Tensor) -> torch.Tensor:
        self._check_k(x.shape)
        if x.shape[0] == 0:
            return x.new_empty((0, self._out_features(packed)))
        if self._is_native_packed(packed):
            return self._native_grouped_linear(x, packed, offs)
        warn_emulation_once(self.name, x.device)
        row_amax = x.abs().amax(dim=-1).float()
        finite_rows = torch.isfinite(row_amax)
        x_fake = self._fake_quantize_activation(torchao_input(x), offs, row_amax, finite_rows)
        x_fake = torch.where(finite_rows.unsqueeze(-1), x_fake, x.float())
        w_fake = self._dequantize_weight(packed, x.dtype)
        return bf16_grouped_mm(x_fake.to(x.dtype), w_fake, offs).to(x.dtype)

    @abstractmethod
    def _quantize_weight(self, weight: torch.Tensor) -> Any:
        """Contiguous bf16/fp32 `(E, N, K)` -> packed weight (native layout if this device runs it)."""

    @abstractmethod
    def _dequantize_weight(self, packed: Any, dtype: torch.dtype) -> torch.Tensor:
        """Packed weight -> `(E, N, K)` in `dtype`."""

    @abstractmethod
    def _fake_quantize_activation(
        self, x: torch.Tensor, offs: torch.Tensor, row_amax: torch.Tensor, finite_rows: torch.Tensor
    ) -> torch.Tensor:
        """`(S, K)` -> the same values after a quantize/dequantize round trip, in fp32.

        `row_amax` (S,) and `finite_rows` (S,) are given so shared scales can skip non-finite rows.
        """

    @abstractmethod
    def _out_features(self, packed: Any) -> int:
        """N of the packed `(E, N, K)` weight."""

    @abstractmethod
    def _is_native_packed(self, packed: Any) -> bool:
        """True when `packed` was built for this format's real FP4 kernel."""

    @abstractmethod
    def _native_grouped_linear(self, x: torch.Tensor, packed: Any, offs: torch.Tensor) -> torch.Tensor:
        """The real FP4 kernel path (CUDA capability >= 10.0)."""
