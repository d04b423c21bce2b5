"""Process groups, collective timeouts and the errors of ReaLB's EP collectives.

A rank that dies or stalls must make the others fail fast, naming what failed, instead of hanging for
transformers' default two hours: `init_distributed` creates the process group with a timeout,
`set_collective_timeout` changes it on a loaded model (env `REALB_EP_TIMEOUT_S` at load), and every collective of
the ReaLB EP path raises `RealbCollectiveError` naming the collective, the layer and the rank.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

ENV_TIMEOUT = "REALB_EP_TIMEOUT_S"
SECTION_PREFIX = "realb::"  # profiler labels of a layer's stages (`realb_hf.bench.profiling` reads them)


class RealbCollectiveError(RuntimeError):
    """A collective of ReaLB's EP path failed or timed out (another rank died, stalled or diverged)."""


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment with a collective timeout: (rank, world, device).

    Call it before `from_pretrained(..., distributed_config=...)`: transformers then reuses this process group.
    NCCL on CUDA (device bound to LOCAL_RANK), gloo on CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout_s = check_timeout(timeout_s)
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


def check_timeout(seconds: float, what: str = "timeout_s") -> float:
    """A collective timeout in seconds: a finite number > 0; ValueError naming `what` otherwise."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(seconds, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a number of seconds > 0 (e.g. 600), got {seconds!r}")
    return value


def timeout_from_env() -> float | None:
    """`REALB_EP_TIMEOUT_S` when set (None otherwise), checked when read."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None or raw.strip() == "":
        return None
    return check_timeout(raw.strip(), f"the environment variable {ENV_TIMEOUT}")


def model_groups(model: torch.nn.Module) -> list:
    """Every process group the model's collectives use: world, and each mesh dimension larger than one rank."""
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


def set_collective_timeout(model: torch.nn.Module, seconds: float) -> None:
    """Timeout of every process group the model's collectives use (world, TP, EP, FSDP): a rank that dies or
    stalls makes the others raise after `seconds` instead of hanging (gloo raises in the collective; NCCL's
    watchdog aborts the communicator and the process, naming the collective)."""
    seconds = check_timeout(seconds)
    try:
        from torch.distributed.distributed_c10d import _set_pg_timeout
    except ImportError as error:  # a private torch helper (torch >= 2.3); say so instead of failing silently
        raise RuntimeError(
            "this torch cannot change a process group's timeout after creation; pass it to "
            "realb_hf.ep.init_distributed(timeout_s=...) before loading instead"
        ) from error
    for group in model_groups(model):
        _set_pg_timeout(timedelta(seconds=seconds), group)
    runtime = getattr(model, "realb", None)
    if runtime is not None and runtime.ep is not None:
        runtime.ep.timeout_s = float(seconds)


def section(name: str) -> contextlib.AbstractContextManager:
    """A profiler label for one stage of a layer; free when no profiler runs."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(SECTION_PREFIX + name)
    return contextlib.nullcontext()


@contextlib.contextmanager
def collective(what: str, module: torch.nn.Module) -> Iterator[None]:
    """Turn a failed collective of `module`'s layer into a `RealbCollectiveError` that names it."""
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
            f"realb_hf.ep.set_collective_timeout(model, seconds), {ENV_TIMEOUT}, or init_distributed)"
        ) from error


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    """`tensor` of every rank of `group`, concatenated into `output` (one collective)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(output, tensor, group=group)
