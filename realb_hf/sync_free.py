"""The mixed-precision experts forward that never reads a count back to the host.

The host path (`RealbExperts._realb_mixed_forward`) reads the rows of every (precision, expert) group to the
host to slice the groups and size the GEMMs. On a GPU that read empties the launch queue: the GPU idles while
the ~15 launches that follow are issued (measured: 2.0 ms of host-visible time for 1.2 ms of GPU work at 8k
tokens). Here every precision gets a buffer as long as all the rows, the true row counts stay on the device,
and every kernel skips what lies past its count: the gathers and the SwiGLU read the count, and the grouped
GEMMs stop at their last offset. Together with `policy.lowered_experts_on_device` (the decision as
tensor ops) and weight conversion that skips unflagged experts on the device, a ReaLB layer queues all its
work without waiting for the GPU once. The bookkeeping around the GEMMs (a stable counting sort of the rows
by precision and expert, group offsets, slot positions, the finite check) is two launches on CUDA
(`kernels.sort.sort_rows`), and both groups' rows are gathered (and the low ones quantized) in one more.

Used on CUDA for what it covers: two precisions (the high one and one low one), formats with
`supports_padding` (bf16, fp8), plain SwiGLU experts without bias or post-expert norm. Elsewhere the host
path runs. On CPU it runs the same steps with the reference formats (tests compare it to the host path).
"""

from __future__ import annotations

import torch

from .formats import get_format
from .kernels import rows as row_kernels
from .kernels.combine import weighted_combine
from .kernels.sort import sort_rows

HIGH, LOW = 0, 1  # row codes (kernels.sort.sort_rows): precision group; 2 is another EP rank's expert
_SPLIT_GATHER = {"bf16", "fp8"}  # what `gather_split_rows` writes: copies in the input dtype, or rowwise e4m3


def covers(module, high: str, low: str, hidden: torch.Tensor) -> bool:
    """Whether `module` can run `high`/`low` through this path for `hidden`."""
    high_fmt, low_fmt = get_format(high), get_format(low)
    return (
        high_fmt.supports_padding
        and low_fmt.supports_padding
        and hidden.dtype == torch.bfloat16
        and not module.has_bias
        and not module.has_post_expert_norm
        and module._realb_plain_swiglu()
    )


def mixed_forward(
    module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    low_experts: torch.Tensor,
    high: str,
    low: str,
    low_weights: tuple[object, object],
) -> torch.Tensor:
    """`module`'s experts forward with the experts flagged in `low_experts` ((E,) bool, on the device) in `low`.

    `low_weights` are (first, down) in `low` for at least the flagged experts (other experts get no rows). Ids
    >= `module.num_experts` are other EP ranks' experts (contribute nothing); rows holding inf/NaN run in `high`.
    """
    num_tokens, top_k = top_k_index.shape
    num_experts = module.num_experts
    rows, position, offs, totals = sort_rows(top_k_index, low_experts, hidden, num_experts)
    n_high, n_low = totals[HIGH : HIGH + 1], totals[LOW : LOW + 1]  # one-element device tensors

    first, down = module._realb_weights()
    fused = module._realb_plain_swiglu()
    gate = module._realb_gate(None)  # plain SwiGLU without bias: the gate reads no expert ids
    high_fmt, low_fmt = get_format(high), get_format(low)
    acts_high, acts_low = _gather_both(high_fmt, low_fmt, hidden, rows, totals)
    y_high = high_fmt.expert_mlp_on(acts_high, first, down, offs[HIGH], gate, fused, hidden.dtype, n_high)
    y_low = low_fmt.expert_mlp_on(acts_low, *low_weights, offs[LOW], gate, fused, hidden.dtype, n_low)
    out = weighted_combine(
        y_high, position.view(num_tokens, top_k), top_k_weights.reshape(num_tokens, top_k), y_low=y_low
    )
    return out.to(hidden.dtype)


def _gather_both(high_fmt, low_fmt, hidden: torch.Tensor, rows: torch.Tensor, totals: torch.Tensor) -> tuple:
    """Both groups' rows in the form each format's GEMM consumes: one launch on CUDA (bf16 copies or fp8
    rowwise quantization, `kernels.rows.gather_split_rows`), else each format's own gather."""
    if row_kernels.available(hidden.device) and {high_fmt.name, low_fmt.name} <= _SPLIT_GATHER:
        a, b = row_kernels.gather_split_rows(hidden, rows, totals, (high_fmt.name == "fp8", low_fmt.name == "fp8"))
        return (a if high_fmt.name == "fp8" else a[:1]), (b if low_fmt.name == "fp8" else b[:1])
    return (
        high_fmt.gather_activations(hidden, rows, None, totals[HIGH : HIGH + 1]),
        low_fmt.gather_activations(hidden, rows, totals[HIGH : HIGH + 1], totals[LOW : LOW + 1]),
    )

