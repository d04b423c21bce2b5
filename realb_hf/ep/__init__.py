"""Real expert parallelism: ReaLB under transformers' `DistributedConfig(ep_size=N)`.

setup (layout checks, install, knobs) · groups (process groups, timeouts, errors) · all_reduce / all_to_all (the
token movements, one shared base) · tp_rows (the TP row split) · report (per-rank logs, gathered reports) ·
checkpoint (saving for transformers' EP loader). See docs/distributed.md.
"""

from .all_reduce import RealbAllReduceEP
from .all_to_all import RealbAllToAllEP
from .auto import RealbAutoEP
from .checkpoint import save_for_expert_parallel
from .groups import ENV_TIMEOUT, RealbCollectiveError, init_distributed, set_collective_timeout
from .report import gather_report, rank_report
from .setup import (
    REALB_IMPLEMENTATIONS,
    configure_ep,
    install_expert_parallel,
    prepare_expert_parallel,
    register_ep_implementations,
)
from .state import EpState

__all__ = [
    "ENV_TIMEOUT",
    "REALB_IMPLEMENTATIONS",
    "EpState",
    "RealbAllReduceEP",
    "RealbAllToAllEP",
    "RealbAutoEP",
    "RealbCollectiveError",
    "configure_ep",
    "gather_report",
    "init_distributed",
    "install_expert_parallel",
    "prepare_expert_parallel",
    "rank_report",
    "register_ep_implementations",
    "save_for_expert_parallel",
    "set_collective_timeout",
]
