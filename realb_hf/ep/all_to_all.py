"""ReaLB's all-to-all token movement, in transformers' `AllToAllEP` shape: `_dispatch_tokens`, the experts,
`_combine_tokens`; transformers' own `__call__` strings them together.

- The count exchange carries the global routing counts: one all-gather of (pairs per expert, vision pairs per
  expert, rows, a flag for rows that do not fit fp8) from every rank replaces transformers' all-to-all of counts.
  Still one small collective and the layer's one host sync, now with everything the decision and the split sizes
  need; the vector is built in one launch (`kernels.exchange.exchange_counts`), the finite check only where a rank
  can be lowered to fp8.
- This rank's lowered experts start converting before the token exchange is queued (`RealbEP.prefetch`).
- Ranks lowered to fp8 receive their rows as e4m3 + one fp32 scale per row (about half the bytes), quantized in the
  pass that groups them, and run them without quantizing again (the received executor).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
from transformers.distributed.expert_parallel import AllToAllEP

from ..experts import RECEIVED, LayerPlan, Prefetch
from ..formats.fp8 import quantize_rowwise
from ..kernels import rows as row_kernels
from ..kernels.combine import weighted_combine
from ..kernels.exchange import exchange_counts
from ..modality import TEXT
from ..policy import RoutingStats, may_give_a_rank
from .base import RealbEP, grad_flows
from .groups import all_gather_into, collective, section
from .state import EpState
from .tp_rows import tp_gather_rows, tp_rows

FP8_ROW_EXTRA = 4  # bytes of the fp32 scale sent after each fp8 row


class RealbAllToAllState(NamedTuple):
    """transformers' `_AllToAllState` fields (same names), plus the layer's plan and prefetched weights."""

    top_k_weights: torch.Tensor
    order: torch.Tensor
    send_sizes: list[int]
    recv_sizes: list[int]
    num_tokens: int
    plan: LayerPlan
    ready: Prefetch | None


class _Received(NamedTuple):
    """What the dispatch hands the experts call beside the rows (see `RealbAllToAllEP._experts`)."""

    plan: LayerPlan
    ready: Prefetch | None
    x_scale: torch.Tensor | None  # fp8 rows: one scale per received row
    rows_per_expert: list[int]
    out_dtype: torch.dtype


class RealbAllToAllEP(RealbEP, AllToAllEP):
    """transformers' `AllToAllEP` with ReaLB's count exchange, prefetch and fp8 dispatch."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts_forward = self._experts
        # the dispatch's extras for the experts call that follows it in the same thread
        self._handoff = threading.local()

    def _dispatch_tokens(self, hidden_states, top_k_index, top_k_weights):
        module, state = self.experts, self.state
        placement = module.realb_placement
        num_tokens = hidden_states.size(0)
        modality, source = module.realb_modality(num_tokens)
        no_grad = not grad_flows(hidden_states, top_k_weights)
        if self.tp_mesh.size() > 1:
            tensors = [hidden_states, top_k_index, top_k_weights] + ([modality] if modality is not None else [])
            tensors = [tp_rows(t, self.tp_mesh, with_grad=not no_grad) for t in tensors]
            hidden_states, top_k_index, top_k_weights = tensors[:3]
            modality = tensors[3] if modality is not None else None
        ep_group, ep_size = self.ep_mesh.get_group(), self.ep_mesh.size()
        num_local, num_global = placement.num_local, placement.num_global
        device = hidden_states.device

        with section("count_exchange"):
            # rows travel as fp8 only to a rank the config can lower to fp8: otherwise nothing is checked
            params = module.realb_runtime.params(device)
            check_finite = state.fp8_dispatch and no_grad and may_give_a_rank(params, "fp8", num_global)
            mine = exchange_counts(top_k_index, modality, hidden_states, num_global, TEXT, check_finite)
            gathered = torch.empty(ep_size * mine.numel(), dtype=mine.dtype, device=device)
            with collective("all_gather of the routing counts", module):
                all_gather_into(gathered, mine, ep_group)
                table = gathered.view(ep_size, -1).cpu()  # the layer's one host sync, as in AllToAllEP
        state.count("count_exchange", gathered.numel() * gathered.element_size())

        with section("decide"):
            totals = table.sum(0).tolist()
            stats = RoutingStats(
                tuple(totals[:num_global]), tuple(totals[num_global : 2 * num_global]), totals[2 * num_global]
            )
            quantized = check_finite and totals[2 * num_global + 1] == 0
            plan = module.realb_plan(hidden_states, top_k_index, (modality, source), stats, quantized, self.rank)
            recv_table = table[:, placement.local]  # rows each source sends to each of this rank's experts
            rows_per_expert = recv_table.sum(0).tolist()
            ready = self.prefetch(plan, rows_per_expert)

        with section("dispatch"):
            send_sizes = table[self.rank, :num_global].view(ep_size, num_local).sum(1).tolist()
            recv_sizes = recv_table.sum(1).tolist()
            top_k = top_k_index.size(-1)
            order = torch.argsort(top_k_index.reshape(-1), stable=True)
            rows = order // top_k
            x_scale = None
            if plan.fp8_ranks is not None:
                tokens, x_scale = exchange_mixed(
                    hidden_states, rows, send_sizes, recv_sizes, plan.fp8_ranks, self.rank, ep_group, module, state
                )
            else:
                tokens = exchange_high(hidden_states[rows], send_sizes, recv_sizes, ep_group, module, state)
            # the counts from the device copy of the table: copying the host one would wait for the dispatch
            recv_counts = gathered.view(ep_size, -1)[:, placement.local].reshape(-1)
            recv_ids = torch.arange(num_local, device=device).repeat(ep_size)
            recv_ids = recv_ids.repeat_interleave(recv_counts, output_size=sum(recv_sizes)).unsqueeze(-1)
            weights = torch.ones(recv_ids.shape, dtype=hidden_states.dtype, device=device)

        self._handoff.received = _Received(plan, ready, x_scale, rows_per_expert, hidden_states.dtype)
        result = RealbAllToAllState(top_k_weights, order, send_sizes, recv_sizes, num_tokens, plan, ready)
        return tokens, recv_ids, weights, result

    def _experts(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the received rows (top-1, unit weights: routing weights apply on the sender)."""
        handoff, self._handoff.received = self._handoff.received, None
        module, plan = self.experts, handoff.plan
        with section("experts"):
            if sum(handoff.rows_per_expert) == 0 and not grad_flows(tokens, weights):
                hidden_dim = module.down_proj.shape[-1] if module.is_transposed else module.down_proj.shape[1]
                return torch.zeros(tokens.shape[0], hidden_dim, dtype=handoff.out_dtype, device=tokens.device)
            if plan.executor == RECEIVED:
                return module.realb_run_received(
                    plan, tokens, handoff.x_scale, expert_ids.view(-1), handoff.out_dtype, handoff.ready,
                    handoff.rows_per_expert,
                )  # fmt: skip
            return module.realb_run(plan, tokens, expert_ids, weights, handoff.ready)

    def _combine_tokens(self, expert_output, state):
        """transformers' combine, with the un-permute, the routing weights and the top-k sum in one pass
        (`kernels.combine.weighted_combine`, which rounds as the stock combine does) when no gradient flows."""
        self.state.count("combine", expert_output.numel() * expert_output.element_size())
        with section("combine"), collective("all_to_all of the expert outputs (combine)", self.experts):
            if grad_flows(expert_output, state.top_k_weights):
                output = super()._combine_tokens(expert_output, state)
            else:
                recv_out = torch.empty(
                    sum(state.send_sizes), expert_output.size(-1), dtype=expert_output.dtype,
                    device=expert_output.device,
                )  # fmt: skip
                dist.all_to_all_single(
                    recv_out, expert_output.contiguous(), state.send_sizes, state.recv_sizes,
                    group=self.ep_mesh.get_group(),
                )  # fmt: skip
                position = row_kernels.inverse_permutation(state.order).view(state.top_k_weights.shape)
                output = weighted_combine(recv_out, position, state.top_k_weights)
                if self.tp_mesh.size() > 1:
                    output = tp_gather_rows(output, state.num_tokens, self.tp_mesh)
        self.finish(state.plan, state.plan.executor == RECEIVED, state.ready)  # this rank got fp8 rows
        return output


def exchange_high(
    send_tokens: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], ep_group, module, state: EpState
) -> torch.Tensor:
    """The token all-to-all in the model dtype (differentiable, as transformers' dispatch)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd
    from transformers.distributed.parallel_utils import _WaitTensor

    state.count("dispatch_high", send_tokens.numel() * send_tokens.element_size())
    with collective("all_to_all of the tokens (dispatch)", module):
        recv = all_to_all_single_autograd(send_tokens, recv_sizes, send_sizes, ep_group)
        return _WaitTensor.apply(recv)


def exchange_mixed(
    hidden: torch.Tensor,
    rows: torch.Tensor,
    send_sizes: list[int],
    recv_sizes: list[int],
    fp8_ranks: Sequence[bool],
    me: int,
    ep_group,
    module,
    state: EpState,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One byte all-to-all: rows for fp8 ranks as e4m3 + fp32 scale, the others in the model dtype.

    Returns the rows this rank receives: in the model dtype and None, or as e4m3 bytes (R, H) and their scales."""
    hidden_dim, dtype = hidden.size(-1), hidden.dtype
    high_row = hidden_dim * hidden.element_size()
    # padded to whole 4-byte words, so that every piece of the send buffer starts aligned for any model dtype
    fp8_row = -(-(hidden_dim + FP8_ROW_EXTRA) // 4) * 4
    send_bytes = [size * (fp8_row if low else high_row) for size, low in zip(send_sizes, fp8_ranks)]
    # every piece written in place into the one send buffer (no concatenation pass)
    send = torch.empty(sum(send_bytes), dtype=torch.uint8, device=hidden.device)
    start = offset = 0
    for size, low, nbytes in zip(send_sizes, fp8_ranks, send_bytes):
        chunk, piece = rows[start : start + size], send[offset : offset + nbytes]
        start, offset = start + size, offset + nbytes
        if low:  # the grouping gather and the rowwise quantization in one pass (Triton on CUDA)
            if row_kernels.available(hidden.device):
                xq, scale = row_kernels.gather_quant_rows(hidden, chunk)
            else:
                xq, scale = quantize_rowwise(hidden[chunk])
            piece = piece.view(size, fp8_row)
            piece[:, :hidden_dim].copy_(xq.view(torch.uint8))
            piece[:, hidden_dim : hidden_dim + FP8_ROW_EXTRA].copy_(scale.view(torch.uint8).view(-1, FP8_ROW_EXTRA))
        else:
            torch.index_select(hidden, 0, chunk, out=piece.view(dtype).view(size, hidden_dim))
        state.count("dispatch_fp8" if low else "dispatch_high", nbytes)
    row = fp8_row if fp8_ranks[me] else high_row
    recv_bytes = [size * row for size in recv_sizes]
    recv = torch.empty(sum(recv_bytes), dtype=torch.uint8, device=hidden.device)
    with collective("all_to_all of the tokens (fp8 dispatch)", module):
        dist.all_to_all_single(recv, send, recv_bytes, send_bytes, group=ep_group)
    if not fp8_ranks[me]:
        return recv.view(dtype).view(-1, hidden_dim), None
    recv = recv.view(-1, fp8_row)
    xq_bytes = recv[:, :hidden_dim]  # e4m3 bytes; the experts gather them by expert, then view them as fp8
    scale = recv[:, hidden_dim : hidden_dim + FP8_ROW_EXTRA].contiguous().view(torch.float32).view(-1)
    return xq_bytes, scale
