"""The device executor: a mixed-precision experts forward that never reads a count back to the host.

Every precision gets a buffer as long as all the rows; the true row counts stay on the device and every kernel
skips what lies past its count (the gathers and the SwiGLU read the count, the grouped GEMMs stop at their last
offset). With the decision made on the device (`kernels.counts.counts_and_flags`) and weight conversion that skips
unflagged experts on the device, a layer queues all its work without waiting for the GPU once.

Covers two precisions (the high one and one low one) in formats with `supports_padding` (bf16, fp8), for plain
SwiGLU experts without bias or post-expert norm and bf16 activations. On CPU it runs the same steps with the
reference ops (tests hold it bit-equal to the host path there).
"""

from __future__ import annotations

import torch

from ..formats import get_format
from ..kernels import rows as row_kernels
from ..kernels.combine import weighted_combine
from ..kernels.sort import sort_rows
from .mlp import group_mlp, plain_swiglu
from .weights import PackedWeights, own_weights

HIGH, LOW = 0, 1  # row codes of `kernels.sort.sort_rows`: the precision group (2: another EP rank's expert)
_SPLIT_GATHER = {"bf16", "fp8"}  # what `gather_split_rows` writes: copies in the input dtype, or rowwise e4m3
DEVICE_PATH_MODES = ("auto", "always", "never")


def supports(module: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Whether this executor can run `module` on `hidden` (formats are checked by `runs_formats`).

    `module.realb_device_path`: "auto" on CUDA only, "always" on any device (CPU runs the reference ops: tests and
    the CPU harness of the EP checks), "never" forces the host path (benchmarks compare the two)."""
    mode = getattr(module, "realb_device_path", "auto")
    if mode not in DEVICE_PATH_MODES:
        raise ValueError(
            f"{getattr(module, 'realb_name', 'experts')}.realb_device_path={mode!r}; allowed values: "
            f"{', '.join(repr(m) for m in DEVICE_PATH_MODES)}"
        )
    if mode == "never" or (mode == "auto" and hidden.device.type != "cuda"):
        return False
    return (
        hidden.dtype == torch.bfloat16
        and not module.has_bias
        and not module.has_post_expert_norm
        and plain_swiglu(module)
    )


def runs_formats(high: str, low: str) -> bool:
    """Both formats take device-side row counts."""
    return get_format(high).supports_padding and get_format(low).supports_padding


def run(
    module: torch.nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    low_flags: torch.Tensor,
    high: str,
    low_weights: PackedWeights,
) -> torch.Tensor:
    """`module`'s experts with the local experts flagged in `low_flags` ((E,) bool, on the device) in
    `low_weights.fmt` (which holds at least the flagged experts' slots). Ids >= num_experts are other EP ranks'
    experts (they contribute nothing); rows of tokens holding inf/NaN run in `high`."""
    num_tokens, top_k = top_k_index.shape
    rows, position, offs, totals = sort_rows(top_k_index, low_flags, hidden, module.num_experts)
    n_high, n_low = totals[HIGH : HIGH + 1], totals[LOW : LOW + 1]  # one-element device tensors
    high_weights = own_weights(module, high)
    acts_high, acts_low = _gather_both(high, low_weights.fmt, hidden, rows, totals)
    y_high = group_mlp(module, acts_high, high_weights, offs[HIGH], None, hidden.dtype, n_high)
    y_low = group_mlp(module, acts_low, low_weights, offs[LOW], None, hidden.dtype, n_low)
    out = weighted_combine(
        y_high, position.view(num_tokens, top_k), top_k_weights.reshape(num_tokens, top_k), y_low=y_low
    )
    return out.to(hidden.dtype)


def _gather_both(high: str, low: str, hidden: torch.Tensor, rows: torch.Tensor, totals: torch.Tensor) -> tuple:
    """Both groups' rows in the form each format's GEMM consumes: one launch on CUDA (bf16 copies or fp8 rowwise
    quantization), else each format's own gather."""
    if row_kernels.available(hidden.device) and {high, low} <= _SPLIT_GATHER:
        a, b = row_kernels.gather_split_rows(hidden, rows, totals, (high == "fp8", low == "fp8"))
        return (a if high == "fp8" else a[:1]), (b if low == "fp8" else b[:1])
    return (
        get_format(high).gather_activations(hidden, rows, None, totals[HIGH : HIGH + 1]),
        get_format(low).gather_activations(hidden, rows, totals[HIGH : HIGH + 1], totals[LOW : LOW + 1]),
    )
