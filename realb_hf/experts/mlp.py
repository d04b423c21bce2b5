"""The expert MLP every executor runs: first projection, the model's gating, down projection, per precision group.

Reads only the attributes transformers' fused experts modules define (`has_gate`, `has_bias`, `act_fn`,
`_apply_gate`, biases, `post_expert_norm`), so the math is the model's own; formats supply the GEMMs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.activations import SiLUActivation
from transformers.integrations.moe import _default_apply_gate

from ..formats import get_format
from .weights import PackedWeights


def plain_swiglu(module: torch.nn.Module) -> bool:
    """silu(gate) * up on a concatenated gate|up without bias: what fused SwiGLU kernels compute."""
    return (
        getattr(module, "realb_fuse_swiglu", True)
        and module.has_gate
        and module.is_concatenated
        and not module.has_bias
        and type(module)._apply_gate is _default_apply_gate
        and isinstance(getattr(module, "act_fn", None), (torch.nn.SiLU, SiLUActivation))
    )


def gate_fn(module: torch.nn.Module, ids: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """First projection's output -> down projection's input for rows of experts `ids` (bias, then gating).
    `ids` may be None for modules without biases."""

    def gate(h: torch.Tensor) -> torch.Tensor:
        if module.has_bias:
            h = h + (module.gate_up_proj_bias if module.has_gate else module.up_proj_bias)[ids]
        return module._apply_gate(h) if module.has_gate else module.act_fn(h)

    return gate


def group_mlp(
    module: torch.nn.Module,
    activations: tuple[torch.Tensor, ...],
    packed: PackedWeights,
    offs: torch.Tensor,
    ids: torch.Tensor | None,
    out_dtype: torch.dtype,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """One precision group's rows (sorted by expert, in the form `packed.fmt` gathers them) through both
    projections, with the down projection's bias. `count` (device int): rows past it are padding."""
    fmt = get_format(packed.fmt)
    fused = plain_swiglu(module)
    y = fmt.expert_mlp_on(activations, packed.first, packed.down, offs, gate_fn(module, ids), fused, out_dtype, count)
    if module.has_bias:
        y = y + module.down_proj_bias[ids]
    return y
