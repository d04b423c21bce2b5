"""The contract every compute precision implements.

An expert group's GEMM is `out[rows of expert e] = x[rows of expert e] @ W[e].T` for the experts of one
precision. Weights always arrive in the (E, N, K) "out x in" layout (the experts module transposes
gpt_oss-style (E, K, N) weights before it asks for a conversion), so each format sees one layout.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from ..kernels.rows import shifted_index


class PrecisionFormat(ABC):
    """One compute precision: how to convert weights to it and how to run a grouped linear in it."""

    name: str
    bits: int

    @abstractmethod
    def is_native(self, device: torch.device) -> bool:
        """True when `device` has kernels that make this format faster than bf16 (not just emulation)."""

    @abstractmethod
    def quantize_weight(self, weight: torch.Tensor, expert_flags: torch.Tensor | None = None) -> Any:
        """Convert (E, N, K) high-precision expert weights to this format's packed form.

        `expert_flags (E,)`: a format may skip the experts flagged 0 (their packed data is then undefined)."""

    @abstractmethod
    def weight_nbytes(self, packed: Any) -> int:
        """Bytes held by a packed weight (data + scales), for memory reports."""

    @abstractmethod
    def grouped_linear(self, x: torch.Tensor, packed: Any, offs: torch.Tensor) -> torch.Tensor:
        """(S, K) rows sorted by expert, `offs` int32 cumulative row ends per expert -> (S, N) in x.dtype.

        Rows of expert e are `x[offs[e-1]:offs[e]]`; S == offs[-1]. Empty groups are allowed.
        """

    supports_padding: bool = False  # gathers and MLPs accept device-side row counts (the device executor needs it)

    def gather_activations(
        self,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        start: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """`hidden[rows]` in the form this format's GEMM consumes: a tuple of tensors with one entry per row
        (so a caller may gather every row once and slice per expert group).

        With `start`/`count` (one-element device tensors, formats with `supports_padding`; start None: 0): row i
        is `hidden[rows[start + i]]` for i < count; the `len(rows)` output rows past `count` are padding.
        """
        return (hidden[rows if start is None else shifted_index(rows, start)],)

    def expert_mlp_on(
        self,
        activations: tuple[torch.Tensor, ...],
        first: Any,
        down: Any,
        offs: torch.Tensor,
        gate: Callable[[torch.Tensor], torch.Tensor],
        fused_swiglu: bool,
        out_dtype: torch.dtype,
        count: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """A whole expert MLP on gathered rows (sorted by expert): first GEMM, `gate`, down GEMM.

        `gate` maps the first projection's output to the down projection's input (bias, SwiGLU or the
        model's own gating). `fused_swiglu` says that `gate` is plain SwiGLU on a concatenated gate|up with
        no bias, which a format may replace by a fused kernel. `count` (device tensor, `offs[-1]`): rows past
        it are padding, which the grouped GEMMs skip and which kernels that know it skip too.
        """
        (x,) = activations
        h = self.grouped_linear(x, first, offs)
        return self.grouped_linear(gate(h), down, offs).to(out_dtype)

    def expert_mlp(
        self,
        hidden: torch.Tensor,
        rows: torch.Tensor,
        first: Any,
        down: Any,
        offs: torch.Tensor,
        gate: Callable[[torch.Tensor], torch.Tensor],
        fused_swiglu: bool = False,
    ) -> torch.Tensor:
        """`expert_mlp_on` of `gather_activations(hidden, rows)`."""
        acts = self.gather_activations(hidden, rows)
        return self.expert_mlp_on(acts, first, down, offs, gate, fused_swiglu, hidden.dtype)

