"""Real expert parallelism: ReaLB under transformers' `DistributedConfig(ep_size=N)`, and the weight conversion
hidden in the token dispatch.

Loading: `from_pretrained(..., quantization_config=RealbConfig(...), distributed_config=DistributedConfig(
tp_size=N, ep_size=N))` (or `fsdp_size=N, ep_size=N`) under torchrun. Before any weight loads,
`prepare_expert_parallel` checks the layout (EP size vs `RealbConfig.ep_size` and the number of experts,
TP-only expert sharding, token movement) and sets `RealbConfig.ep_size` from the EP world when it was left at 1.
After loading, `install_expert_parallel` gives every ReaLB experts module the ReaLB variant of the token
movement the config asked for (`auto`, `all_reduce`, `all_to_all`); they are registered in transformers'
`EPImplementationInterface` as `realb_auto`, `realb_all_reduce` and `realb_all_to_all` and can be named there.

How every rank reaches the same decision from routing it already has:
- all-reduce mode: every rank holds the whole batch and the *global* expert ids (the implementation receives
  them before it remaps them to local ids and sentinels), so the global per-expert token and vision counts are
  a local bincount. ReaLB adds no communication.
- all-to-all mode: each rank holds a slice (or its own batch). transformers already exchanges per-expert counts
  once per layer (an all-to-all of this rank's counts for each destination, read back to the host to size the
  token exchange). ReaLB replaces that exchange by one all-gather of (tokens per expert, vision tokens per
  expert, rows, non-finite flag) from every rank: still one small collective and the same one host sync per
  layer, now carrying the global counts, from which every rank derives both the split sizes and the decision.

Then each rank runs its local experts at the precision the decision gives them. With
`weight_cache="on_the_fly"`, the lowered local experts' weights are converted on a side CUDA stream started
*before* the token dispatch and waited on just before the expert GEMMs (`WeightPrefetch`; inline on CPU). In
all-to-all mode, tokens bound for a rank lowered to fp8 are quantized (rowwise) in the pass that groups them
and travel as fp8 + one fp32 scale per row (about half the bytes); the receiving rank feeds them to its fp8
GEMM as they are.

Also here: collective timeouts (`set_collective_timeout`, env `REALB_EP_TIMEOUT_S`), errors that name the
collective that failed (`RealbCollectiveError`), process-group setup for launchers (`init_distributed`) and
the telemetry of all ranks gathered on one (`gather_report`). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from transformers.distributed.expert_parallel import (
    AllReduceEP,
    AllToAllEP,
    EPImplementation,
    EPImplementationInterface,
    _AllToAllState,
)
from transformers.distributed.parallel_utils import replace_layer_number_by_wildcard

from .experts import RealbExperts, is_fused_experts
from .formats.fp8 import quantize_rowwise
from .kernels import rows as row_kernels
from .kernels.combine import weighted_combine
from .kernels.counts import counts_and_flags
from .modality import TEXT
from .policy import (
    RoutingStats,
    decide,
    decide_without_routing,
    decides_on_device,
    needs_routing,
)

ENV_TIMEOUT = "REALB_EP_TIMEOUT_S"
# transformers' token-movement names -> the ReaLB variant installed on ReaLB experts modules
REALB_IMPLEMENTATIONS = {
    "auto": "realb_auto",
    "all_reduce": "realb_all_reduce",
    "all_to_all": "realb_all_to_all",
}
_FP8_ROW_EXTRA = 4  # bytes of the fp32 scale sent after each fp8 row
_MAX_APPLIED = 10_000  # per-rank log entries kept (a bounded window, like Telemetry.max_records)
# Share of the SMs the side-stream weight conversion may fill, so the dispatch beside it keeps most of the GPU
# (measured on 4x H200: with the whole GPU the side stream was slower than converting inline).
SIDE_STREAM_SM_SHARE = 0.25


class RealbCollectiveError(RuntimeError):
    """A collective of ReaLB's EP path failed or timed out (another rank died, stalled or diverged)."""


@dataclass(frozen=True)
class EpPlacement:
    """Which global experts one experts module holds on this rank: `[first, first + num_local)`."""

    rank: int
    size: int
    num_local: int

    @property
    def first(self) -> int:
        return self.rank * self.num_local

    @property
    def num_global(self) -> int:
        return self.num_local * self.size


@dataclass
class EpState:
    """Per-rank EP state of one model (`realb_hf.get_runtime(model).ep`)."""

    rank: int  # local rank in the EP mesh: the per-rank identity every decision refers to
    size: int
    global_rank: int
    implementation: str  # the token movement asked for ("auto", "all_reduce", "all_to_all")
    group_ranks: tuple[int, ...] = ()  # global ranks of this rank's EP group (they decide together)
    side_stream: bool = True  # convert lowered weights on a side CUDA stream during the dispatch
    fp8_dispatch: bool = True  # all-to-all: send fp8 rows to ranks lowered to fp8
    timeout_s: float | None = None  # collective timeout set by set_collective_timeout (None: the group's default)
    comm: dict[str, int] = field(default_factory=dict)  # bytes moved by ReaLB's EP path, per kind
    _applied: list[dict] = field(default_factory=list, repr=False)
    _pending: list[tuple] = field(default_factory=list, repr=False)  # decided on the device, resolved on read

    @property
    def applied(self) -> list[dict]:
        """What this rank ran, per forward and layer (entries of device-side decisions resolved now)."""
        pending, self._pending = self._pending, []
        for resolve in pending:
            self.log(resolve[0](*resolve[1:]))
        return self._applied

    def log(self, entry: dict) -> None:
        self._applied.append(entry)
        if len(self._applied) > _MAX_APPLIED:
            del self._applied[: len(self._applied) - _MAX_APPLIED]

    def log_deferred(self, resolve, *args) -> None:
        """`log(resolve(*args))` once `applied` is read: `args` may hold device tensors (no host sync now).
        Beyond the window `applied` keeps, the oldest are dropped unresolved (a server that never reads it)."""
        self._pending.append((resolve, *args))
        if len(self._pending) >= 2 * _MAX_APPLIED:
            del self._pending[:-_MAX_APPLIED]

    def count(self, kind: str, nbytes: int) -> None:
        self.comm[kind] = self.comm.get(kind, 0) + int(nbytes)

    def reset(self) -> None:
        self._applied.clear()
        self._pending.clear()
        self.comm.clear()


# ---- before weight loading ---------------------------------------------------------------------------


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
    register_ep_implementations()


# ---- after weight loading ----------------------------------------------------------------------------


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
        module.realb_ep = EpPlacement(state.rank, state.size, module.num_experts)
        style.install_forward(module, ep_mesh=ep_mesh, tp_mesh=tp_mesh, ep_implementation=realb_name)
    runtime.ep = state
    timeout = os.environ.get(ENV_TIMEOUT)
    if timeout:
        set_collective_timeout(model, float(timeout))
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


# ---- process groups, timeouts, errors ------------------------------------------------------------------


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment with a collective timeout: (rank, world, device).

    Call it before `from_pretrained(..., distributed_config=...)`: transformers then reuses this process group
    (its own default timeout is 2 hours, so a dead rank would stall the others that long). NCCL on CUDA
    (device bound to LOCAL_RANK), gloo on CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
        backend = backend or ("nccl" if use_cuda else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _model_groups(model) -> list:
    groups = [dist.group.WORLD]
    mesh_manager = getattr(model, "_mesh_manager", None)
    if mesh_manager is not None:
        for dim in ("pp", "dp_replicate", "fsdp", "tp", "efsdp", "ep"):
            with contextlib.suppress(Exception):
                mesh = mesh_manager.get_mesh(dim)
                if mesh.size() > 1:
                    groups.append(mesh.get_group())
    unique = []
    for group in groups:
        if all(group is not g for g in unique):
            unique.append(group)
    return unique


def set_collective_timeout(model, seconds: float) -> None:
    """Timeout of every process group the model's collectives use (world, TP, EP, FSDP): a rank that dies or
    stalls makes the others raise after `seconds` instead of hanging (gloo raises in the collective; NCCL's
    watchdog aborts the communicator and the process, naming the collective)."""
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout
    except ImportError as error:  # a private torch helper (torch >= 2.3); say so instead of failing silently
        raise RuntimeError(
            "this torch cannot change a process group's timeout after creation; pass it to "
            "realb_hf.distributed.init_distributed(timeout_s=...) before loading instead"
        ) from error
    for group in _model_groups(model):
        _set_pg_timeout(timedelta(seconds=seconds), group)
    runtime = getattr(model, "realb", None)
    if runtime is not None and runtime.ep is not None:
        runtime.ep.timeout_s = float(seconds)


SECTION_PREFIX = "realb::"  # profiler labels of a layer's stages (`realb_hf.bench.profiling` reads them)


def _section(name: str):
    """A profiler label for one stage of a layer; free when no profiler runs."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(SECTION_PREFIX + name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _collective(what: str, module: RealbExperts):
    try:
        yield
    except RealbCollectiveError:
        raise
    except RuntimeError as error:  # DistBackendError (gloo timeouts, closed connections) is a RuntimeError
        state = module.realb_runtime.ep
        timeout = f"{state.timeout_s:g} s" if state and state.timeout_s else "the process group's default"
        where = f"EP rank {state.rank} of {state.size}" if state else "EP"
        raise RealbCollectiveError(
            f"ReaLB EP collective '{what}' in {module.realb_name} ({where}) failed: {error}. Another rank of the "
            f"EP group probably died, stalled or ran a different layer; collective timeout: {timeout} (set it with "
            f"realb_hf.distributed.set_collective_timeout(model, seconds), {ENV_TIMEOUT}, or init_distributed)"
        ) from error


def _all_gather(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(output, tensor, group=group)


# ---- side-stream weight conversion ---------------------------------------------------------------------

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class WeightPrefetch:
    """This rank's lowered experts of one layer, converted ahead of the expert GEMMs (`weight_cache="on_the_fly"`).

    CUDA with `side_stream`: the conversion is queued on a side stream when the decision is known, before the
    token dispatch is queued on the compute stream, so the two run concurrently; `get` (called just before the
    expert GEMMs) makes the compute stream wait for it. The converted tensors live until the layer returns:
    never more than one layer's converted weights. They are allocated on the side stream and read on the
    compute stream; reuse of their memory is safe without `record_stream` because every later conversion first
    waits for the compute stream (`wait_stream`), i.e. for every read of the earlier layer's tensors.
    CPU (or `side_stream=False`): converted inline when created.
    """

    def __init__(
        self,
        module: RealbExperts,
        plan: dict[str, list[int] | None],
        side_stream: bool,
        flags: torch.Tensor | None = None,
    ):
        """`plan`: format -> local experts to convert; None: every expert flagged in `flags` (device-side)."""
        self._packed: dict[str, tuple] = {}
        self._event = None
        if not plan:
            return
        device = module.down_proj.device
        if side_stream and device.type == "cuda":
            stream = _side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), row_kernels.background(SIDE_STREAM_SM_SHARE):
                self._convert(module, plan, flags)
            self._event = torch.cuda.Event()
            self._event.record(stream)
        else:
            self._convert(module, plan, flags)

    def _convert(self, module: RealbExperts, plan: dict[str, list[int] | None], flags: torch.Tensor | None) -> None:
        for fmt_name, experts in plan.items():
            if experts is None:
                self._packed[fmt_name] = (*module.realb_convert_flagged(fmt_name, flags), None)
            else:
                self._packed[fmt_name] = (*module.realb_convert(fmt_name, experts), experts)

    def get(self, fmt_name: str):
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = None
        return self._packed.get(fmt_name)

    @property
    def converted(self) -> int:
        """Experts converted; -1 when the device chose them (the flags are read only when a report asks)."""
        if any(p[2] is None for p in self._packed.values()):
            return -1
        return sum(len(p[2]) for p in self._packed.values())


def _prefetch_flagged(module: RealbExperts, low: str, low_flags: torch.Tensor, state: EpState):
    """on_the_fly: every local expert flagged in `low_flags` (device) converted to `low`, without knowing which."""
    if module.realb_runtime.config.weight_cache != "on_the_fly":
        return None
    return WeightPrefetch(module, {low: None}, state.side_stream, low_flags)


def _prefetch(module: RealbExperts, precisions: tuple[str, ...], counts: list[int], high: str, state: EpState):
    if module.realb_runtime.config.weight_cache != "on_the_fly":
        return None
    plan: dict[str, list[int]] = {}
    for e, (precision, rows) in enumerate(zip(precisions, counts)):
        if precision != high and rows:
            plan.setdefault(precision, []).append(e)
    return WeightPrefetch(module, plan, state.side_stream) if plan else None


# ---- the ReaLB token movements -----------------------------------------------------------------------------


def _decide_global(counts: list[list[int]], num_tokens: int, params):
    """The decision from global counts; its telemetry record is written later, off the critical path."""
    stats = RoutingStats(tuple(counts[0]), tuple(counts[1]), num_tokens)
    return stats, decide(stats, params)


def _local(decision, placement: EpPlacement) -> tuple[str, ...]:
    return decision.expert_precision[placement.first : placement.first + placement.num_local]


class RealbAllReduceEP(AllReduceEP):
    """transformers' `AllReduceEP` (every rank holds the whole batch; masked local experts; all-reduce), with this
    rank's experts at the precision ReaLB chose. The decision comes from the global ids the implementation
    receives, so it costs no communication."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts = experts

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        from transformers.distributed.parallel_utils import _AllReduceBackward, _AllReduceForward

        module = self.experts
        runtime, placement, state = module.realb_runtime, module.realb_ep, module.realb_runtime.ep
        params = runtime.params(hidden_states.device)
        modality = runtime.modality.for_rows(hidden_states.shape[0], module.realb_pool)
        source = runtime.modality.source if modality is not None else "none"
        num_tokens = hidden_states.shape[0]
        local = slice(placement.first, placement.first + placement.num_local)
        low_flags = stats = decision = None
        sync_free = module._realb_sync_free_ok(hidden_states, params.high, params.low)
        reads_routing = needs_routing(params, num_tokens)
        if sync_free and reads_routing and decides_on_device(params):
            counts_device, global_flags = counts_and_flags(
                top_k_index, modality, placement.num_global, params.device_rule(), TEXT
            )
        else:
            counts_device = module.realb_routing_counts(top_k_index, modality, placement.num_global)
        if sync_free and (decides_on_device(params) or not reads_routing):
            # No host sync: decided on the device (or from the config alone); telemetry and the per-rank log
            # recompute the decision from the counts when they are read.
            if reads_routing:
                low_flags = global_flags[local]
            else:
                decision = decide_without_routing(params, placement.num_global)
                precisions = _local(decision, placement)
                if set(precisions) <= {params.high, params.low} and not decision.all_high(params.high):
                    low_flags = module._realb_low_flags(precisions, params.high, hidden_states.device)
            ready = _prefetch_flagged(module, params.low, low_flags, state) if low_flags is not None else None
        if low_flags is None and decision is None:
            counts = counts_device.tolist()
            stats, decision = _decide_global(counts, num_tokens, params)
        if low_flags is None:
            precisions = _local(decision, placement)
            ready = None
            if not decision.all_high(params.high):
                local_counts = counts_device[0, local].tolist() if stats is None else stats.expert_tokens[local]
                ready = _prefetch(module, precisions, local_counts, params.high, state)

        ep_group = self.ep_mesh.get_group()
        hidden_states = _AllReduceBackward.apply(hidden_states, ep_group)
        top_k_weights = _AllReduceBackward.apply(top_k_weights, ep_group)
        off_rank = (top_k_index // placement.num_local) != placement.rank
        local_index = torch.where(off_rank, placement.num_local, top_k_index % placement.num_local)
        weights = top_k_weights.masked_fill(off_rank, 0.0)
        if low_flags is not None:
            output = module._realb_sync_free(
                hidden_states, local_index, weights, low_flags, params.high, params.low, ready
            )
        else:
            output = module.realb_run_local(hidden_states, local_index, weights, precisions, params.high, ready)
        with _collective("all_reduce of the expert outputs", module):
            output = _AllReduceForward.apply(output, ep_group)
        if stats is not None:
            module.realb_record(stats, decision, params, source)
            _log(state, runtime, module, decision, precisions, sum(stats.expert_tokens[local]), False, ready)
        else:
            runtime.telemetry.add_deferred(module.realb_name, counts_device, num_tokens, decision, params, source)
            converted = ready.converted if ready is not None else 0
            state.log_deferred(
                _entry_from_counts, runtime.telemetry.forwards, module, counts_device, num_tokens, params, placement,
                converted,
            )
        return output


class RealbAllToAllEP(AllToAllEP):
    """transformers' `AllToAllEP` (tokens sent to the rank holding their expert and back), with:
    - the count exchange carrying the global routing counts (one all-gather instead of one all-to-all),
    - this rank's experts at the precision ReaLB chose, their conversion started before the token exchange,
    - fp8 rows (rowwise scales) sent to ranks lowered to fp8, used there without re-quantization."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts = experts

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        module = self.experts
        runtime, placement, state = module.realb_runtime, module.realb_ep, module.realb_runtime.ep
        device, num_tokens = hidden_states.device, hidden_states.size(0)
        params = runtime.params(device)
        modality = runtime.modality.for_rows(num_tokens, module.realb_pool)
        source = runtime.modality.source if modality is not None else "none"
        no_grad = not _grad_flows(hidden_states, top_k_weights)
        if self.tp_mesh.size() > 1:
            # Replicate -> Shard(0) is a local chunk (no communication), exactly as AllToAllEP slices the batch.
            tensors = [hidden_states, top_k_index, top_k_weights] + ([modality] if modality is not None else [])
            tensors = [_tp_rows(t, self.tp_mesh, with_grad=not no_grad) for t in tensors]
            hidden_states, top_k_index, top_k_weights = tensors[:3]
            modality = tensors[3] if modality is not None else None
        ep_group, ep_size = self.ep_mesh.get_group(), self.ep_mesh.size()
        num_local, num_global = placement.num_local, placement.num_global
        top_k = top_k_index.size(-1)
        check_finite = state.fp8_dispatch and no_grad

        # 1. The count exchange: every rank's (tokens, vision tokens) per global expert, rows, non-finite flag.
        with _section("count_exchange"):
            counts = module.realb_routing_counts(top_k_index, modality, num_global).reshape(-1)
            nonfinite = (~torch.isfinite(hidden_states)).any().reshape(1) if check_finite else counts.new_zeros(1)
            # (a host scalar through `new_tensor` would be a pageable copy: a stream stall before the exchange)
            rows_here = torch.full((1,), hidden_states.size(0), dtype=counts.dtype, device=device)
            mine = torch.cat([counts, rows_here, nonfinite.to(counts.dtype)])
            gathered = torch.empty(ep_size * mine.numel(), dtype=mine.dtype, device=device)
            with _collective("all_gather of the routing counts", module):
                _all_gather(gathered, mine, ep_group)
                table = gathered.view(ep_size, -1).cpu()  # the layer's one host sync, as in AllToAllEP
        state.count("count_exchange", gathered.numel() * gathered.element_size())
        with _section("decide"):
            totals = table.sum(0).tolist()
            stats, decision = _decide_global(
                [totals[:num_global], totals[num_global : 2 * num_global]], totals[2 * num_global], params
            )
            any_nonfinite = totals[2 * num_global + 1] > 0
            precisions = _local(decision, placement)
            lo, hi = placement.first, placement.first + num_local
            recv_table = table[:, lo:hi]  # rows each source sends to each of this rank's experts
            local_counts = recv_table.sum(0).tolist()
            # queued before the dispatch: flagged experts (all slots, for the sync-free path) or those with rows
            if set(precisions) == {params.high, params.low} and module._realb_sync_free_ok(
                hidden_states, params.high, params.low
            ):
                flags = module._realb_low_flags(precisions, params.high, device)
                ready = _prefetch_flagged(module, params.low, flags, state)
            else:
                ready = _prefetch(module, precisions, local_counts, params.high, state)

        # 2. The dispatch: (token, expert) pairs sorted by expert are grouped by destination rank.
        with _section("dispatch"):
            send_sizes = table[placement.rank, :num_global].view(ep_size, num_local).sum(1).tolist()
            recv_sizes = recv_table.sum(1).tolist()
            fp8_ranks = [p == "fp8" for p in decision.rank_precision]
            use_fp8 = state.fp8_dispatch and no_grad and not any_nonfinite and any(fp8_ranks)
            expert_ids = top_k_index.reshape(-1)
            order = torch.argsort(expert_ids, stable=True)
            rows = order // top_k
            fp8_in = None
            if use_fp8:
                recv_tokens, fp8_in = self._exchange_mixed(
                    hidden_states, rows, send_sizes, recv_sizes, fp8_ranks, placement.rank, ep_group, module, state
                )
            else:
                recv_tokens = self._exchange_high(hidden_states[rows], send_sizes, recv_sizes, ep_group, module, state)
            # the counts from the device copy of the table: copying the host one would wait for the dispatch
            recv_counts = gathered.view(ep_size, -1)[:, lo:hi].reshape(-1)
            recv_ids = torch.arange(num_local, device=device).repeat(ep_size)
            recv_ids = recv_ids.repeat_interleave(recv_counts, output_size=sum(recv_sizes))

        # 3. This rank's experts, at the decided precision (top-1, unit weights: routing weights apply on the sender).
        with _section("experts"):
            hidden_dim = hidden_states.size(-1)
            if sum(recv_sizes) == 0:
                expert_output = hidden_states.new_zeros(0, hidden_dim)
            elif fp8_in is not None:
                expert_output = module.realb_run_local_fp8(
                    *fp8_in, recv_ids, hidden_states.dtype, ready, counts_host=local_counts
                )
            else:
                ones = torch.ones(recv_ids.shape[0], 1, dtype=recv_tokens.dtype, device=device)
                expert_output = module.realb_run_local(
                    recv_tokens, recv_ids.unsqueeze(-1), ones, precisions, params.high, ready
                )

        # 4. The combine: reverse all-to-all, un-permute + weighted top-k sum, TP all-gather (`_combine_tokens`).
        result_state = _AllToAllState(top_k_weights, order, send_sizes, recv_sizes, num_tokens)
        state.count("combine", expert_output.numel() * expert_output.element_size())
        with _section("combine"), _collective("all_to_all of the expert outputs (combine)", module):
            output = self._combine_tokens(expert_output, result_state)
        module.realb_record(stats, decision, params, source)
        _log(state, runtime, module, decision, precisions, sum(recv_sizes), fp8_in is not None, ready)
        return output

    def _combine_tokens(self, expert_output, state):
        """transformers' combine, with the un-permute, the routing weights and the top-k sum in one pass
        (`kernels.combine.weighted_combine`, which rounds as the stock combine does) when no gradient flows."""
        if _grad_flows(expert_output, state.top_k_weights):
            return super()._combine_tokens(expert_output, state)
        recv_out = torch.empty(
            sum(state.send_sizes), expert_output.size(-1), dtype=expert_output.dtype, device=expert_output.device
        )
        dist.all_to_all_single(
            recv_out, expert_output.contiguous(), state.send_sizes, state.recv_sizes, group=self.ep_mesh.get_group()
        )
        position = row_kernels.inverse_permutation(state.order).view(state.top_k_weights.shape)
        output = weighted_combine(recv_out, position, state.top_k_weights)
        return output if self.tp_mesh.size() == 1 else _tp_gather_rows(output, state.num_tokens, self.tp_mesh)

    def _exchange_high(self, send_tokens, send_sizes, recv_sizes, ep_group, module, state):
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        from transformers.distributed.parallel_utils import _WaitTensor

        state.count("dispatch_high", send_tokens.numel() * send_tokens.element_size())
        with _collective("all_to_all of the tokens (dispatch)", module):
            recv = all_to_all_single_autograd(send_tokens, recv_sizes, send_sizes, ep_group)
            return _WaitTensor.apply(recv)

    def _exchange_mixed(self, hidden, rows, send_sizes, recv_sizes, fp8_ranks, me, ep_group, module, state):
        """One byte all-to-all: rows for fp8 ranks as e4m3 + fp32 scale, the others in the model dtype."""
        hidden_dim, dtype = hidden.size(-1), hidden.dtype
        high_row = hidden_dim * hidden.element_size()
        # padded to whole 4-byte words, so that every piece of the send buffer starts aligned for any model dtype
        fp8_row = -(-(hidden_dim + _FP8_ROW_EXTRA) // 4) * 4
        send_bytes = [size * (fp8_row if low else high_row) for size, low in zip(send_sizes, fp8_ranks)]
        # every piece written in place into the one send buffer (no concatenation pass)
        send = torch.empty(sum(send_bytes), dtype=torch.uint8, device=hidden.device)
        start = offset = 0
        for size, low, nbytes in zip(send_sizes, fp8_ranks, send_bytes):
            chunk, piece = rows[start : start + size], send[offset : offset + nbytes]
            start, offset = start + size, offset + nbytes
            if low:
                # the grouping gather and the rowwise quantization in one pass (Triton on CUDA)
                if row_kernels.available(hidden.device):
                    xq, scale = row_kernels.gather_quant_rows(hidden, chunk)
                else:
                    xq, scale = quantize_rowwise(hidden[chunk])
                piece = piece.view(size, fp8_row)
                piece[:, :hidden_dim].copy_(xq.view(torch.uint8))
                piece[:, hidden_dim : hidden_dim + _FP8_ROW_EXTRA].copy_(scale.view(torch.uint8).view(-1, _FP8_ROW_EXTRA))
            else:
                torch.index_select(hidden, 0, chunk, out=piece.view(dtype).view(size, hidden_dim))
            state.count("dispatch_fp8" if low else "dispatch_high", nbytes)
        row = fp8_row if fp8_ranks[me] else high_row
        recv_bytes = [size * row for size in recv_sizes]
        recv = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=hidden.device)
        with _collective("all_to_all of the tokens (fp8 dispatch)", module):
            dist.all_to_all_single(recv, send, recv_bytes, send_bytes, group=ep_group)
        if not fp8_ranks[me]:
            return recv.view(dtype).view(-1, hidden_dim), None
        recv = recv.view(-1, fp8_row)
        xq_bytes = recv[:, :hidden_dim]  # e4m3 bytes; the experts gather them by expert, then view them as fp8
        scale = recv[:, hidden_dim : hidden_dim + _FP8_ROW_EXTRA].contiguous().view(torch.float32).view(-1)
        return None, (xq_bytes, scale)


class RealbAutoEP(EPImplementation):
    """transformers' `AutoEP` choice with the ReaLB variants: all-reduce at inference when the EP group shares
    one batch, all-to-all otherwise."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.all_to_all = RealbAllToAllEP(experts, ep_mesh, tp_mesh)
        self.all_reduce = RealbAllReduceEP(experts, ep_mesh, tp_mesh) if self.shares_batch else None

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        if self.all_reduce is not None and not (torch.is_grad_enabled() and hidden_states.requires_grad):
            return self.all_reduce(hidden_states, top_k_index, top_k_weights)
        return self.all_to_all(hidden_states, top_k_index, top_k_weights)


def _grad_flows(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# The TP row split of all-to-all EP, as DTensor does it (`torch.chunk`; ranks past the last chunk hold no rows).
# At inference it is done directly: DTensor's redistribute cost ~1 ms of host time per layer call in a profile
# (docs/benchmarks.md 3c), and in an all-to-all layer the GPU waits for the host at the count exchange, so that
# time adds to every layer.


def _tp_rows(t: torch.Tensor, tp_mesh, with_grad: bool) -> torch.Tensor:
    """This TP rank's rows of a batch its TP group shares (Replicate -> Shard(0), a local slice)."""
    if with_grad:  # DTensor's redistribute all-gathers the row gradients in backward
        from torch.distributed.tensor import DTensor, Replicate, Shard

        replicated = DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False)
        return replicated.redistribute(tp_mesh, [Shard(0)]).to_local()
    chunks, rank = torch.chunk(t, tp_mesh.size()), tp_mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else t[:0]


def _tp_gather_rows(output: torch.Tensor, num_tokens: int, tp_mesh) -> torch.Tensor:
    """The TP group's row slices back into the whole batch on every rank (Shard(0) -> Replicate)."""
    hidden_dim = output.size(-1)
    if num_tokens % tp_mesh.size() == 0:  # even slices: one all-gather straight into the output
        full = output.new_empty(num_tokens, hidden_dim)
        _all_gather(full, output.contiguous(), tp_mesh.get_group())
        return full
    from torch.distributed.tensor import DTensor, Shard

    shape, stride = (num_tokens, hidden_dim), (hidden_dim, 1)
    return DTensor.from_local(output.contiguous(), tp_mesh, [Shard(0)], shape=shape, stride=stride).full_tensor()


def _entry(forward, module, decision, precisions, rows, fp8_dispatch, converted, high) -> dict:
    """One per-rank log entry; `converted` -1 (a flagged conversion) counts this rank's lowered experts."""
    kinds = set(precisions)
    if converted < 0:
        converted = sum(p != high for p in precisions)
    return {
        "forward": forward,
        "layer": module.realb_name,
        "precision": kinds.pop() if len(kinds) == 1 else "mixed",
        "rows": int(rows),
        "fp8_dispatch": bool(fp8_dispatch),
        "converted_experts": int(converted),
        "reason": decision.reason,
    }


def _log(state, runtime, module, decision, precisions, rows, fp8_dispatch, ready) -> None:
    converted = ready.converted if ready is not None else 0
    high = runtime.config.high_precision
    state.log(_entry(runtime.telemetry.forwards, module, decision, precisions, rows, fp8_dispatch, converted, high))


def _entry_from_counts(forward, module, counts, num_tokens, params, placement, converted) -> dict:
    """The log entry of a layer decided on the device, from its counts (read back now)."""
    tokens, vision = counts.tolist()
    _, decision = _decide_global([tokens, vision], num_tokens, params)
    local = slice(placement.first, placement.first + placement.num_local)
    precisions = _local(decision, placement)
    return _entry(forward, module, decision, precisions, sum(tokens[local]), False, converted, params.high)


# ---- checkpoints --------------------------------------------------------------------------------------------

# Checkpoint layouts transformers 5.23 converts with `Transpose(check_dims=True)`: the check compares the
# checkpoint tensor with the parameter's *global* shape, so under EP (where the tensor is already this rank's
# dim-0 shard) a checkpoint saved in the model's own layout (what `save_pretrained` writes) is transposed by
# mistake and loading fails with a size mismatch. Hub checkpoints use the source layout and load fine.
_SOURCE_LAYOUT_TRANSPOSED = {"qwen3_vl_moe": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")}


def save_for_expert_parallel(model, path) -> None:
    """`save_pretrained`, with expert tensors in the layout transformers' EP loader reads correctly.

    Only Qwen3-VL-MoE needs it (its experts are stored (E, in, out) on the Hub; see the note above); other
    families are saved unchanged. The result loads with and without EP.
    """
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    model.save_pretrained(path)
    suffixes = _SOURCE_LAYOUT_TRANSPOSED.get(getattr(model.config, "model_type", ""), ())
    if not suffixes:
        return
    for file in sorted(Path(path).glob("*.safetensors")):
        tensors = load_file(file)
        changed = False
        for key, tensor in tensors.items():
            if key.endswith(suffixes) and tensor.dim() == 3:
                tensors[key] = tensor.transpose(1, 2).contiguous()
                changed = True
        if changed:
            save_file(tensors, file, metadata={"format": "pt"})


# ---- reports ---------------------------------------------------------------------------------------------


def rank_report(model) -> dict[str, Any]:
    """This rank's ReaLB state: telemetry (identical on every rank), what it ran, bytes moved, extra memory."""
    runtime = getattr(model, "realb", None)
    if runtime is None:
        raise ValueError("this model does not run ReaLB")
    state = runtime.ep
    return {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "ep_rank": state.rank if state else 0,
        "ep_size": state.size if state else 1,
        "implementation": state.implementation if state else None,
        "extra_memory_bytes": runtime.telemetry.extra_memory_bytes,
        "telemetry": runtime.telemetry.to_dict(),
        "applied": list(state.applied) if state else [],
        "comm_bytes": dict(state.comm) if state else {},
        "ep_state": {k: v for k, v in asdict(state).items() if not k.startswith("_") and k != "comm"} if state else None,
    }


def gather_report(model, dst: int = 0) -> dict[str, Any] | None:
    """Every rank's `rank_report`, gathered on global rank `dst` into one report (None on the other ranks).

    `decisions_agree` says whether the ranks of every EP group recorded the same decisions (they must: they decide
    from the same global counts; different EP groups serve different batches); `per_rank_extra_memory_bytes` lists
    the persistent low-precision copies each rank keeps.
    """
    mine = rank_report(model)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        reports = [mine]
    else:
        reports = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object(mine, reports, dst=dst)
        if dist.get_rank() != dst:
            return None
    groups: dict[tuple, list] = {}
    for r in reports:
        key = tuple((r["ep_state"] or {}).get("group_ranks", ())) or (r["rank"],)
        groups.setdefault(key, []).append(r["telemetry"]["records"])
    return {
        "world_size": len(reports),
        "ep_size": mine["ep_size"],
        "implementation": mine["implementation"],
        "ep_groups": [list(g) for g in groups],
        "decisions_agree": all(all(recs == group[0] for recs in group) for group in groups.values()),
        "summary": reports[0]["telemetry"]["summary"],
        "per_rank_extra_memory_bytes": [r["extra_memory_bytes"] for r in reports],
        "per_rank_comm_bytes": [r["comm_bytes"] for r in reports],
        "ranks": reports,
    }
