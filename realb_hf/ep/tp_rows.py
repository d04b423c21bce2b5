"""The TP row split of all-to-all EP: the ranks of a TP group hold one batch and each sends only its slice.

The split is DTensor's (`torch.chunk`; ranks past the last chunk hold no rows). With gradients it goes through
DTensor, whose redistribute all-gathers the row gradients in backward; at inference it is done directly, because
DTensor's host cost lands on every layer (the GPU waits for the host at the count exchange).
"""

from __future__ import annotations

import torch

from .groups import all_gather_into


def tp_rows(t: torch.Tensor, tp_mesh, with_grad: bool) -> torch.Tensor:
    """This TP rank's rows of a batch its TP group shares (Replicate -> Shard(0), a local slice)."""
    if with_grad:
        from torch.distributed.tensor import DTensor, Replicate, Shard

        replicated = DTensor.from_local(t, tp_mesh, [Replicate()], run_check=False)
        return replicated.redistribute(tp_mesh, [Shard(0)]).to_local()
    chunks, rank = torch.chunk(t, tp_mesh.size()), tp_mesh.get_local_rank()
    return chunks[rank] if rank < len(chunks) else t[:0]


def tp_gather_rows(output: torch.Tensor, num_tokens: int, tp_mesh) -> torch.Tensor:
    """The TP group's row slices back into the whole batch on every rank (Shard(0) -> Replicate)."""
    hidden_dim = output.size(-1)
    if num_tokens % tp_mesh.size() == 0:  # even slices: one all-gather straight into the output
        full = output.new_empty(num_tokens, hidden_dim)
        all_gather_into(full, output.contiguous(), tp_mesh.get_group())
        return full
    from torch.distributed.tensor import DTensor, Shard

    shape, stride = (num_tokens, hidden_dim), (hidden_dim, 1)
    return DTensor.from_local(output.contiguous(), tp_mesh, [Shard(0)], shape=shape, stride=stride).full_tensor()
