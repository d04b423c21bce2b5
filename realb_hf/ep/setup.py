"""ReaLB under transformers' `DistributedConfig(ep_size=N)`: layout checks before the weights load, the ReaLB token
movements installed after, and the EP knobs of a loaded model.

Loading: `from_pretrained(..., quantization_config=RealbConfig(...), distributed_config=DistributedConfig(
tp_size=N, ep_size=N))` (or `fsdp_size=N, ep_size=N`) under torchrun. The ReaLB token movements are registered in
transformers' `EPImplementationInterface` as `realb_auto`, `realb_all_reduce` and `realb_all_to_all`.
"""

from __future__ import annotations

import json

import torch.distributed as dist
from transformers.distributed.expert_parallel import EPImplementationInterface
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from ..experts import Placement, RealbExperts, is_fused_experts
from .all_reduce import RealbAllReduceEP
from .all_to_all import RealbAllToAllEP
from .auto import RealbAutoEP
from .groups import set_collective_timeout, timeout_from_env
from .state import EpState

# transformers' token-movement names -> the ReaLB variant installed on ReaLB experts modules
REALB_IMPLEMENTATIONS = {
    "auto": "realb_auto",
    "all_reduce": "realb_all_reduce",
    "all_to_all": "realb_all_to_all",
}


def _distributed_config(model):
    return getattr(model.config, "distributed_config", None)


def _plan_covers(plan: dict[str, str], names: set[str], styles: set[str] | None = None) -> bool:
    """Whether a rule of `plan` (of one of `styles`; by default any style that splits something) covers `names`."""
    return any(
        (key == n or key.startswith(n + ".")) and (style in styles if styles is not None else style != "replicate")
        for key, style in plan.items()
        for n in names
    )


def _effective_plan(model, dc, kind: str) -> dict[str, str]:
    """The model's tp/ep plan with the DistributedConfig's override merged as transformers merges it."""
    override = getattr(dc, f"{kind}_plan", None)
    if kind == "tp" and isinstance(override, dict) and not override:
        return {}
    plan = dict(getattr(model, f"{kind}_plan", None) or {})
    if isinstance(override, dict):
        plan |= override
    return plan


def prepare_expert_parallel(model, config) -> None:
    """Check the distributed layout against ReaLB and resolve `config.ep_size`; raises before any weight loads.

    - `DistributedConfig.ep_size > 1`: `RealbConfig.ep_size` left at 1 becomes the EP size; any other value must
      equal it. The EP size must divide every converted experts module's number of experts. The token movement
      must be `auto`, `all_reduce`, `all_to_all` or a `realb_*` name, through an `ep_dispatch_experts` rule.
    - `tp_size > 1` without EP, with the experts in the TP plan (every rank holds a slice of every expert): ReaLB
      has no EP rank to balance, so this is refused; use `ep_size=tp_size`, or "replicate" rules for the experts.
    - A model whose experts were already split by EP (e.g. `apply_realb` after loading) is refused.
    """
    experts = {name: m for name, m in model.named_modules() if name.endswith("experts") and is_fused_experts(m)}
    skip = config.modules_to_not_convert or []
    experts = {n: m for n, m in experts.items() if not any(fragment in n for fragment in skip)}
    if any(getattr(m, "_is_expert_parallel", False) for m in experts.values()):
        raise ValueError(
            "these experts are already split by expert parallelism; apply ReaLB while loading instead: "
            "from_pretrained(..., quantization_config=RealbConfig(...), distributed_config=DistributedConfig(...))"
        )
    dc = _distributed_config(model)
    names = {replace_layer_number_by_wildcard(n) for n in experts}
    if dc is None or dc.ep_size <= 1:
        if dc is not None and dc.tp_size > 1 and _plan_covers(_effective_plan(model, dc, "tp"), names):
            raise ValueError(
                f"ReaLB balances expert-parallel ranks, but DistributedConfig(tp_size={dc.tp_size}) without ep_size "
                "shards every expert across all ranks (TP-only MoE sharding): every rank holds a slice of every "
                f"expert, so there is no overloaded rank to lower. Use DistributedConfig(tp_size={dc.tp_size}, "
                f"ep_size={dc.tp_size}) for expert parallelism, or set the experts' tp_plan rules to 'replicate' (experts "
                "whole on every rank: ReaLB then plans for RealbConfig.ep_size virtual ranks on each)."
            )
        return
    ep_size = dc.ep_size
    implementation = dc.ep_implementation
    if implementation not in REALB_IMPLEMENTATIONS and implementation not in REALB_IMPLEMENTATIONS.values():
        raise ValueError(
            f"ReaLB runs with DistributedConfig(ep_implementation=...) in {sorted(REALB_IMPLEMENTATIONS)} (or their "
            f"ReaLB names {sorted(REALB_IMPLEMENTATIONS.values())}), got {implementation!r}: other token movements "
            "(e.g. deepgemm_megamoe, which moves tokens inside its kernel) give ReaLB no place to run each rank's "
            "experts at its own precision"
        )
    if getattr(model.config, "_experts_implementation", None) == "deepgemm_megamoe":
        raise ValueError(
            'ReaLB does not run with experts_implementation="deepgemm_megamoe" (its kernel moves the tokens)'
        )
    if not _plan_covers(_effective_plan(model, dc, "ep"), names, {"ep_dispatch_experts"}):
        raise ValueError(
            f"DistributedConfig(ep_size={ep_size}) needs an 'ep_dispatch_experts' rule for the experts modules "
            f"({sorted(names)[:2]}...) in ep_plan; without it the tokens never reach the rank holding their expert"
        )
    for name, module in experts.items():
        if module.num_experts % ep_size:
            raise ValueError(
                f"DistributedConfig(ep_size={ep_size}) must divide the number of experts of {name} "
                f"({module.num_experts}); choose an ep_size among the divisors of {module.num_experts}"
            )
    if config.ep_size == 1:
        config.ep_size = ep_size  # planned for the real EP world; saved with the model
        config.post_init()
    elif config.ep_size != ep_size:
        raise ValueError(
            f"RealbConfig.ep_size={config.ep_size} does not match DistributedConfig(ep_size={ep_size}): ReaLB decides "
            f"per real EP rank. Leave RealbConfig.ep_size at 1 (it is then set from the EP world) or set it to "
            f"{ep_size}; a saved model reloaded on another EP size takes quantization_config=RealbConfig(ep_size="
            f"{ep_size}) (or ep_size=1) at reload"
        )
    check_same_config(config)
    register_ep_implementations()


# The RealbConfig fields that decide which experts run in which precision (and so which layers take part in
# ReaLB's collectives). weight_cache only changes where low-precision copies live, not the result.
PRECISION_FIELDS = (
    "policy", "high_precision", "low_precision", "granularity", "ep_size", "modality_threshold", "batch_threshold",
    "imbalance_threshold", "low_cost_ratio", "conversion_cost", "rank_precisions", "modules_to_not_convert",
)  # fmt: skip


def check_same_config(config) -> None:
    """Every rank must plan with the same settings, or ranks run different precisions (all-reduce) or disagree on
    the token exchange (all-to-all). One object all-gather at load; ValueError on every rank naming the fields."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    settings = config.to_dict()
    mine = {name: json.dumps(settings[name], sort_keys=True) for name in PRECISION_FIELDS}
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    differ = [name for name in PRECISION_FIELDS if len({ranks[name] for ranks in every}) > 1]
    if differ:
        detail = "; ".join(
            f"{name}: " + ", ".join(f"rank {r} {ranks[name]}" for r, ranks in enumerate(every)) for name in differ
        )
        raise ValueError(
            f"the ranks were loaded with different RealbConfig settings ({detail}); every rank must pass the same "
            "quantization_config, or they run different precisions and their collectives disagree"
        )


def register_ep_implementations() -> None:
    """Register ReaLB's token movements in transformers' `EPImplementationInterface` (idempotent)."""
    for name, cls in (
        ("realb_auto", RealbAutoEP),
        ("realb_all_reduce", RealbAllReduceEP),
        ("realb_all_to_all", RealbAllToAllEP),
    ):
        if EPImplementationInterface._global_mapping.get(name) is not cls:
            EPImplementationInterface.register(name, cls)


def install_expert_parallel(model, runtime) -> EpState | None:
    """Give every ReaLB experts module under EP the ReaLB variant of its token movement; None without real EP.

    transformers applies EP (sharding dim 0, `num_experts` -> local count, an `ep_forward` around an
    `EPImplementation`) after the quantizer's pre-load hook, so the swap happens here, after loading: the
    module's `ep_forward` is rebuilt by transformers' own `ep_dispatch_experts` style around the ReaLB class.
    """
    modules = [m for m in model.modules() if isinstance(m, RealbExperts) and getattr(m, "_is_expert_parallel", False)]
    if not modules:
        return None
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    dc = _distributed_config(model)
    mesh_manager = getattr(model, "_mesh_manager", None)
    if dc is None or mesh_manager is None:
        raise ValueError("experts are split by expert parallelism but the model has no distributed_config/mesh")
    register_ep_implementations()
    ep_mesh, tp_mesh = mesh_manager.get_mesh("ep"), mesh_manager.get_mesh("tp")
    requested = dc.ep_implementation
    realb_name = REALB_IMPLEMENTATIONS.get(requested, requested)
    state = EpState(
        rank=ep_mesh.get_local_rank(),
        size=ep_mesh.size(),
        global_rank=dist.get_rank(),
        implementation=requested,
        group_ranks=tuple(dist.get_process_group_ranks(ep_mesh.get_group())),
    )
    if runtime.config.ep_size != state.size:
        raise ValueError(f"RealbConfig.ep_size={runtime.config.ep_size} but the EP mesh has {state.size} ranks")
    style = ALL_PARALLEL_STYLES["ep_dispatch_experts"]
    for module in modules:
        if "forward" not in module.__dict__:
            raise ValueError(
                f"{module.realb_name} is split by EP but has no token dispatch ('ep_dispatch_experts' rule missing)"
            )
        del module.__dict__["forward"]  # transformers' ep_forward; rebuilt below around the ReaLB implementation
        module.realb_placement = Placement(state.rank * module.num_experts, module.num_experts,
                                           module.num_experts * state.size)  # fmt: skip
        style.install_forward(module, ep_mesh=ep_mesh, tp_mesh=tp_mesh, ep_implementation=realb_name)
    runtime.ep = state
    timeout = timeout_from_env()
    if timeout is not None:
        set_collective_timeout(model, timeout)
    return state


def configure_ep(
    model, *, side_stream: bool | None = None, fp8_dispatch: bool | None = None, timeout_s: float | None = None
) -> EpState:
    """Change the EP knobs of a loaded model (all ranks must make the same change)."""
    state = _state_of(model)
    if side_stream is not None:
        state.side_stream = bool(side_stream)
    if fp8_dispatch is not None:
        state.fp8_dispatch = bool(fp8_dispatch)
    if timeout_s is not None:
        set_collective_timeout(model, timeout_s)
    return state


def _state_of(model) -> EpState:
    runtime = getattr(model, "realb", None)
    if runtime is None or runtime.ep is None:
        raise ValueError("this model does not run ReaLB under real expert parallelism")
    return runtime.ep
