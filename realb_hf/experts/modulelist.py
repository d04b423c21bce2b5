"""ReaLB for MoE blocks that hold their experts as a per-expert `nn.ModuleList` (remote-code DeepSeek-V2/V3 layout).

DeepSeek-VL2 and Kimi-VL-A3B load with `trust_remote_code=True`; their MoE block (`DeepseekV2MoE` /
`DeepseekV3MoE`) holds `experts`, an `nn.ModuleList` of MLPs with `gate_proj`/`up_proj`/`down_proj` (no bias)
and `act_fn` (SiLU), next to a `gate` returning `(topk_idx, topk_weight, aux_loss)`, and at inference calls
`self.moe_infer(x, topk_ids, topk_weight)`, a Python loop over the experts. There is no fused experts module
to swap, so ReaLB adapts the list itself:

- The `experts` ModuleList's class becomes `RealbModuleListExperts`, a `RealbExperts` that exposes the layout
  RealbExperts expects of a fused module (`gate_up_proj` (E, 2I, H) with gate rows first, `down_proj` (E, H, I),
  `num_experts`, `act_fn`, plain SwiGLU). Its children (the per-expert MLPs) stay, so module names and
  `state_dict` keys and shapes are those of the stock model, and checkpoints save and reload unchanged.
- The block's `moe_infer` (an instance attribute shadowing the class method) calls `block.experts(x, ids, w)`:
  RealbExperts' forward decides per layer and batch (`policy.decide`, virtual EP with contiguous expert blocks),
  records telemetry and, when nothing is lowered, runs the stock forward, which here is the block's own
  `moe_infer`: the bf16 path equals the remote code bit for bit. When something is lowered, RealbExperts' mixed
  forward runs every precision (bf16 included) as one grouped GEMM over the stacked weights, through
  `formats.get_format(name).expert_mlp`, so every format works. No mixed-precision logic is duplicated here.

Memory: the weights are stacked once, after loading (`realb_stack`, from the quantizer's post-load hook): one
(E, 2I, H) and one (E, H, I) tensor per block receive the experts' weights, and every expert's Linear weight
becomes a view into them (its Parameter object stays; only `.data` moves). At rest the model holds each weight
once, as the stock model does; the stacking holds one extra layer's experts while it copies that layer. Before
`save_pretrained` writes the model, the quantizer gives every expert its own storage again (`realb_unstack`,
again one layer at a time), because transformers would otherwise clone every view of a shared storage at once
(all expert weights twice during the save); the next lowered forward stacks again. Moving or casting the model
(`model.to(...)`) converts every weight on its own: the list stacks again right after, on the new device. Any
other replacement of the weights is noticed by the next lowered forward (the first and last experts' weights no
longer point into the stacked tensors), which stacks again. Offloaded experts (meta weights) are not supported.

Not supported: the remote code's own expert parallelism (`config.ep_size > 1` leaves `None` in the list),
biased or non-gated experts, and real EP through transformers' `DistributedConfig` (transformers has no EP plan
for remote code); `RealbConfig.ep_size` plans virtual EP ranks as for every other family.
"""

from __future__ import annotations

import types
from collections.abc import Iterator

import torch
from torch import nn
from transformers.integrations.moe import _default_apply_gate

from ..runtime import RealbRuntime
from .module import RealbExperts

REMOTE_CODE_FAMILIES = ("deepseek_vl_v2", "kimi_vl")  # tested through tiny re-implementations (tests/remote_code)
_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_SKIP_HINT = " (leave such a block alone with RealbConfig(modules_to_not_convert=[...]))"


def is_modulelist_moe(module: nn.Module) -> bool:
    """A DeepSeek-V2/V3 remote-code MoE block: an `experts` ModuleList, a `gate` and a `moe_infer` method."""
    return (
        isinstance(getattr(module, "experts", None), nn.ModuleList)
        and isinstance(getattr(module, "gate", None), nn.Module)
        and callable(getattr(type(module), "moe_infer", None))
    )


def find_modulelist_moe(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name of the `experts` list, its block) for every per-expert ModuleList MoE block of `model`."""
    for name, module in model.named_modules():
        if is_modulelist_moe(module):
            yield (f"{name}.experts" if name else "experts"), module


def check_modulelist_layout(name: str, experts: nn.ModuleList) -> tuple[int, int]:
    """(hidden, intermediate) of a list of gated, bias-free expert MLPs with equal shapes; ValueError otherwise.

    Only shapes are read, so this runs on the meta device before any weight loads.
    """
    if len(experts) == 0 or any(e is None for e in experts):
        raise ValueError(
            f"{name} holds no experts or None entries (the remote code's own expert parallelism, config.ep_size > 1): "
            "load the model with ep_size=1 in its config and plan ranks with RealbConfig(ep_size=N)"
        )
    first = experts[0]
    if not all(isinstance(getattr(first, p, None), nn.Linear) for p in _PROJECTIONS):
        raise ValueError(f"{name}: ReaLB expects experts with gate_proj, up_proj and down_proj nn.Linear{_SKIP_HINT}")
    inter, hidden = first.gate_proj.weight.shape
    expected = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for e, mlp in enumerate(experts):
        for proj, shape in expected.items():
            layer = getattr(mlp, proj, None)
            if not isinstance(layer, nn.Linear) or layer.bias is not None or tuple(layer.weight.shape) != shape:
                raise ValueError(
                    f"{name}.{e}.{proj}: ReaLB expects bias-free nn.Linear experts of one shape "
                    f"(gate/up {(inter, hidden)}, down {(hidden, inter)}){_SKIP_HINT}"
                )
        if not hasattr(mlp, "act_fn"):
            raise ValueError(f"{name}.{e}: ReaLB expects act_fn(gate_proj(x)) * up_proj(x) experts, found no act_fn")
    return hidden, inter


def layout_stand_in(name: str, experts: nn.ModuleList) -> types.SimpleNamespace:
    """Meta tensors with the stacked shapes, for checks that read a fused module's layout before weights load."""
    hidden, inter = check_modulelist_layout(name, experts)
    n = len(experts)
    return types.SimpleNamespace(
        has_gate=True,
        is_transposed=False,
        gate_up_proj=torch.empty(n, 2 * inter, hidden, device="meta"),
        down_proj=torch.empty(n, hidden, inter, device="meta"),
    )


@torch.no_grad()
def _moe_infer_through_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weight: torch.Tensor):
    """The block's `moe_infer` under ReaLB: same signature, through `RealbModuleListExperts.forward`."""
    return self.experts(x, topk_ids, topk_weight)


class _StockModuleListExperts(nn.ModuleList):
    """The experts' stock forward: the block's own `moe_infer` (the remote code's per-expert loop)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return self._realb_stock_moe_infer(hidden_states, top_k_index, top_k_weights)


class RealbModuleListExperts(RealbExperts, _StockModuleListExperts):
    """A per-expert ModuleList run by RealbExperts: the list's children stay; the stacked weights back them."""

    # The fused-experts layout RealbExperts reads: concatenated [gate; up] rows, SwiGLU, no bias, no post norm.
    has_gate = True
    has_bias = False
    is_transposed = False
    is_concatenated = True
    has_post_expert_norm = False
    _is_expert_parallel = False
    _apply_gate = _default_apply_gate

    _realb_stacked: tuple[torch.Tensor, torch.Tensor] | None = None
    _realb_stacked_at: list[tuple[int, str, int]] | None = None
    _realb_stock_moe_infer = None

    @property
    def num_experts(self) -> int:
        return len(self)

    @property
    def act_fn(self):
        return self[0].act_fn

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self._realb_stacked_weights()[0]

    @property
    def down_proj(self) -> torch.Tensor:
        return self._realb_stacked_weights()[1]

    def realb_patch_block(self, block: nn.Module) -> None:
        """Route `block.moe_infer` through this list; its own `moe_infer` stays the stock path."""
        self._realb_stock_moe_infer = types.MethodType(type(block).moe_infer, block)
        block.moe_infer = types.MethodType(_moe_infer_through_experts, block)

    # ---- stacked weights ---------------------------------------------------------------------------

    def _realb_probe(self) -> list[tuple[int, str, int]]:
        """(expert, projection, data_ptr) of the first and last experts' weights: where they live right now."""
        return [(e, p, getattr(self[e], p).weight.data_ptr()) for e in (0, len(self) - 1) for p in _PROJECTIONS]

    def realb_is_stacked(self) -> bool:
        """True while the experts' weights are views of the stacked tensors (checked on the first and last expert:
        six pointer comparisons, cheap enough for every lowered forward)."""
        if self._realb_stacked is None:
            return False
        return self[0].gate_proj.weight.device == self._realb_stacked[0].device and (
            self._realb_probe() == self._realb_stacked_at
        )

    def _realb_stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.realb_is_stacked():
            self.realb_stack()
        return self._realb_stacked

    @torch.no_grad()
    def realb_stack(self) -> None:
        """Copy the experts' weights into one (E, 2I, H) and one (E, H, I) tensor; each Linear weight becomes a view."""
        first = self[0].gate_proj.weight
        if first.device.type == "meta":
            raise ValueError(
                f"{self.realb_name}: the experts' weights are not loaded (meta device, e.g. disk offload); ReaLB needs "
                "them in memory to run per-expert ModuleList experts as one grouped GEMM"
            )
        if any(getattr(m, p).weight.dtype != first.dtype or getattr(m, p).weight.device != first.device
               for m in self for p in _PROJECTIONS):  # fmt: skip
            raise ValueError(f"{self.realb_name}: all experts' weights must share one dtype and device")
        self._realb_stacked = None
        inter, hidden = first.shape
        n = len(self)
        gate_up = torch.empty(n, 2 * inter, hidden, dtype=first.dtype, device=first.device)
        down = torch.empty(n, hidden, inter, dtype=first.dtype, device=first.device)
        for e, mlp in enumerate(self):
            for weight, view in (
                (mlp.gate_proj.weight, gate_up[e, :inter]),
                (mlp.up_proj.weight, gate_up[e, inter:]),
                (mlp.down_proj.weight, down[e]),
            ):
                view.copy_(weight)
                weight.data = view  # the Parameter object stays; its old storage is freed here
        self._realb_stacked = (gate_up, down)
        self._realb_stacked_at = self._realb_probe()
        self.realb_free_cache()

    def _apply(self, fn, recurse=True):
        """`model.to(...)` and friends convert every expert weight on its own: stack again right after, on the new
        device, so no stale stacked copy stays referenced on the old one (a layer or two of experts extra meanwhile).
        A conversion that changed nothing (e.g. `.to()` the device the model is on) keeps the stacks as they are."""
        stacked = self.realb_is_stacked()
        out = super()._apply(fn, recurse)
        if stacked and not self.realb_is_stacked():
            self._realb_stacked = None  # the old stacks go with this reference
            if self[0].gate_proj.weight.device.type != "meta":
                self.realb_stack()
        return out

    @torch.no_grad()
    def realb_unstack(self) -> None:
        """Give every expert weight its own storage again (the stacked storage is freed with its last view)."""
        if self._realb_stacked is None:
            return
        self._realb_stacked = None
        for mlp in self:
            for proj in _PROJECTIONS:
                weight = getattr(mlp, proj).weight
                weight.data = weight.data.clone()
        self.realb_free_cache()


def patch_modulelist_moe(block: nn.Module, runtime: RealbRuntime, name: str, pool: str | None = None) -> None:
    """Make `block` (see `is_modulelist_moe`) run ReaLB; weights may still be on the meta device."""
    block.experts.__class__ = RealbModuleListExperts
    block.experts.realb_attach(runtime, name, pool)
    block.experts.realb_patch_block(block)


def _lists(model: nn.Module) -> list[RealbModuleListExperts]:
    return [m for m in model.modules() if isinstance(m, RealbModuleListExperts)]


def stack_modulelist_experts(model: nn.Module) -> int:
    """After weights load: stack every ReaLB ModuleList's experts (one layer at a time); how many were stacked."""
    lists = _lists(model)
    for experts in lists:
        experts.realb_stack()
    return len(lists)


def unstack_modulelist_experts(model: nn.Module) -> None:
    """Before saving: own storage per expert weight again, so transformers need not clone shared views at once."""
    for experts in _lists(model):
        experts.realb_unstack()
