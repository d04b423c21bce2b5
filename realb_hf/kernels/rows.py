"""Row kernels of the expert MLP and the fp8 rowwise format they reproduce, plus small row helpers.

- `gather_quant_rows`: pick rows of a matrix (an index) and quantize them rowwise to e4m3 in the same pass, so
  the gathered copy in the source dtype never exists. With no index it converts whole weights (one read, one
  write).
- `swiglu_quant_rows` / `swiglu_rows`: SwiGLU of a (S, 2I) gate|up matrix fused with the rowwise quantization
  of its (S, I) output, computed in fp32 (no rounding between the two); or in the input dtype.

Every kernel can take its row count (and where its rows start in the index) as a device tensor: rows past the
count are padding that no program touches, so a caller never has to read a count back to the host.

The quantizing gathers produce exactly what `quantize_rowwise` defines: scale = max(amax, 1e-12) * (1/448),
data = clamp(x / scale) in e4m3 with round-to-nearest-even (IEEE division, so CPU and GPU agree bit for bit).
Rows holding NaN are not guaranteed to propagate it (Triton's max drops NaN): callers send rows with non-finite
inputs elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

from .library import define_op

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU-only installs: callers use the torch references
    triton = None
    tl = None
else:
    from torch.library import wrap_triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# amax * (1/448) rather than amax / 448: CUDA turns division by a Python scalar into a multiplication by
# its (inexact) reciprocal, CPU divides exactly, and the 1-ulp difference flips fp8 ties. An explicit
# multiplication rounds the same everywhere, so CPU and GPU quantize bit-identically.
INV_FP8_MAX = 1.0 / FP8_MAX
AMAX_EPS = 1e-12  # floor on a row's amax, so all-zero rows get a finite non-zero scale


def quantize_rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise e4m3 quantization over the last dim: `t (..., K)` -> `(data (..., K) fp8, scale (...) fp32)`.

    `t ~= data.float() * scale[..., None]` with `scale = amax * (1 / 448)`. Works for 2-D activations
    `(S, K)` and 3-D weights `(E, N, K)`. A pure function of its input (no state, no host sync) so it can later be fused or
    compiled; both the GPU kernels and the CPU emulation consume its output, so they see identical
    quantized operands.
    """
    amax = t.abs().amax(dim=-1).float()
    scale = amax.clamp(min=AMAX_EPS) * INV_FP8_MAX  # clamp propagates NaN; inf stays inf
    data = (t.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return data, scale


def available(device: torch.device) -> bool:
    """Triton kernels need a CUDA device and the triton package."""
    return triton is not None and device.type == "cuda"


def host_to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without a stream stall (pinned staging, non-blocking copy)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """`position` with `position[perm[i]] = i`: where each original row went (one small scatter, no sort)."""
    position = torch.empty_like(perm)
    position[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return position


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a 2-D `x`, copying whole rows: rows of 1- or 2-byte elements are moved as 4-byte words
    (an element-wise gather of bytes runs far below memory bandwidth)."""
    itemsize = x.element_size()
    if (
        itemsize < 4
        and x.dim() == 2
        and x.stride(-1) == 1
        and (x.size(-1) * itemsize) % 4 == 0
        and (x.stride(0) * itemsize) % 4 == 0
        and (x.storage_offset() * itemsize) % 4 == 0
    ):
        return x.view(torch.int32).index_select(0, index).view(x.dtype)
    return x.index_select(0, index)


if triton is not None:
    _MAX = tl.constexpr(FP8_MAX)
    _INV_MAX = tl.constexpr(INV_FP8_MAX)
    _EPS = tl.constexpr(AMAX_EPS)

    @triton.jit
    def _store_row(out_ptr, scale_ptr, row, out_stride, cols, x, mask, QUANT: tl.constexpr, EXACT: tl.constexpr):
        """Row `x` (fp32) to `out`: quantized rowwise to e4m3 with its scale, or cast to out's dtype.

        EXACT divides by the scale as `quantize_rowwise` does (bit-identical); otherwise it multiplies by the
        reciprocal (one division per row instead of one per element: the SwiGLU kernel is compute-bound)."""
        if QUANT:
            amax = tl.max(tl.abs(x), axis=0)
            scale = tl.maximum(amax, _EPS) * _INV_MAX
            if EXACT:
                q = tl.div_rn(x, scale)
            else:
                q = x * (1.0 / scale)
            q = tl.clamp(q, -_MAX, _MAX)
            tl.store(out_ptr + row * out_stride + cols, q.to(tl.float8e4nv), mask=mask)
            tl.store(scale_ptr + row, scale)
        else:
            tl.store(out_ptr + row * out_stride + cols, x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_count(rows, count_ptr, HAS_COUNT: tl.constexpr):
        """Rows to process: all `rows`, or the device-side count (so a count of 0 costs one load per program)."""
        n = tl.cast(rows, tl.int64)  # tl.cast, not .to: an int argument may arrive as a Python int (inductor)
        if HAS_COUNT:
            n = tl.minimum(tl.load(count_ptr).to(tl.int64), n)
        return n

    @triton.jit(do_not_specialize=["rows"])  # a row count of 1 would otherwise become a compile-time constant
    def _rows_kernel(
        src_ptr, idx_ptr, start_ptr, count_ptr, flag_ptr, out_ptr, scale_ptr,
        rows, K, src_stride, out_stride, group_rows,
        HAS_IDX: tl.constexpr, HAS_START: tl.constexpr, HAS_COUNT: tl.constexpr, HAS_FLAG: tl.constexpr,
        QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Persistent programs striding over the rows: the grid does not depend on the device-side count.
        n = _row_count(rows, count_ptr, HAS_COUNT)
        first = 0
        if HAS_IDX and HAS_START:
            first = tl.load(start_ptr).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        for row in range(tl.program_id(0).to(tl.int64), n, tl.num_programs(0).to(tl.int64)):
            work = True
            if HAS_FLAG:
                work = tl.load(flag_ptr + row // group_rows) != 0
            if work:
                src_row = row
                if HAS_IDX:
                    src_row = tl.load(idx_ptr + first + row).to(tl.int64)
                x = tl.load(src_ptr + src_row * src_stride + cols, mask=mask, other=0.0).to(tl.float32)
                _store_row(out_ptr, scale_ptr, row, out_stride, cols, x, mask, QUANT, True)

    @triton.jit(do_not_specialize=["rows"])
    def _swiglu_kernel(
        h_ptr, count_ptr, out_ptr, scale_ptr, rows, inter, h_stride, out_stride,
        HAS_COUNT: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr,
    ):
        n = _row_count(rows, count_ptr, HAS_COUNT)
        cols = tl.arange(0, BLOCK)
        mask = cols < inter
        for row in range(tl.program_id(0).to(tl.int64), n, tl.num_programs(0).to(tl.int64)):
            gate = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(h_ptr + row * h_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
            if QUANT:  # fp32 throughout: the quantization sees the unrounded product
                act = gate * tl.sigmoid(gate) * up
            else:  # as eager `silu(gate) * up` rounds: torch's silu x / (1 + expf(-x)) to bf16, then the product
                silu = tl.div_rn(gate, 1.0 + libdevice.exp(-gate))
                act = silu.to(out_ptr.dtype.element_ty).to(tl.float32) * up
            _store_row(out_ptr, scale_ptr, row, out_stride, cols, act, mask, QUANT, False)

    @triton.jit(do_not_specialize=["rows"])
    def _split_rows_kernel(
        src_ptr, idx_ptr, totals_ptr, a_ptr, a_scale_ptr, b_ptr, b_scale_ptr,
        rows, K, src_stride, a_stride, b_stride,
        QUANT_A: tl.constexpr, QUANT_B: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # `_rows_kernel` for two groups in one launch: sorted rows [0, n_a) to `a`, [n_a, n_a + n_b) to `b`.
        n_a = tl.load(totals_ptr).to(tl.int64)
        n = tl.minimum(n_a + tl.load(totals_ptr + 1).to(tl.int64), tl.cast(rows, tl.int64))
        cols = tl.arange(0, BLOCK)
        mask = cols < K
        for row in range(tl.program_id(0).to(tl.int64), n, tl.num_programs(0).to(tl.int64)):
            src_row = tl.load(idx_ptr + row).to(tl.int64)
            x = tl.load(src_ptr + src_row * src_stride + cols, mask=mask, other=0.0).to(tl.float32)
            if row < n_a:
                _store_row(a_ptr, a_scale_ptr, row, a_stride, cols, x, mask, QUANT_A, True)
            else:
                _store_row(b_ptr, b_scale_ptr, row - n_a, b_stride, cols, x, mask, QUANT_B, True)


PROGRAMS_PER_SM = 16
_SM_COUNT: dict[int, int] = {}
_share = threading.local()  # fraction of the GPU the row kernels may fill (`background`)


def persistent_grid(rows: int, sm_count: int) -> tuple[int]:
    """Persistent grid: enough programs to fill `sm_count` SMs (or the current `background` share of them),
    never more than `rows`, at least one."""
    programs = int(sm_count * PROGRAMS_PER_SM * getattr(_share, "fraction", 1.0))
    return (max(1, min(rows, programs)),)


def _grid(rows: int, device: torch.device) -> tuple[int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return persistent_grid(rows, _SM_COUNT[index])


@contextlib.contextmanager
def background(fraction: float):
    """Row kernels launched inside fill at most `fraction` of the GPU's SMs: work queued on a side stream then
    leaves room for what runs beside it (the token all-to-all's NCCL kernels, the dispatch gathers)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"background fraction must be in (0, 1] (a share of the GPU's SMs), got {fraction!r}")
    previous = getattr(_share, "fraction", 1.0)
    _share.fraction = fraction
    try:
        yield
    finally:
        _share.fraction = previous


def shifted_index(index: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`index[start:]` padded to `len(index)` (with its last entry) for a `start` that stays on the device."""
    at = torch.arange(index.numel(), device=index.device) + start
    return index[at.clamp(max=max(index.numel() - 1, 0))]


def _row_outputs(like: torch.Tensor, rows: int, k: int, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised outputs of a row kernel: (rows, k) e4m3 data and (rows,) fp32 scales, or (rows, k) in
    `like`'s dtype and an empty scale. Shared by the Triton kernels and the fake implementations."""
    data = like.new_empty((rows, k), dtype=FP8_DTYPE if quantize else like.dtype)
    scale = like.new_empty((rows if quantize else 0,), dtype=torch.float32)
    return data, scale


def _launch_meta(k: int) -> tuple[int, int]:
    block = triton.next_power_of_2(k)
    return block, min(16, max(1, block // 256))


# ---- realb_kernels::gather_quant_rows ---------------------------------------------------------------------


def _gather_reference(src, index, start, count, expert_flags, quantize):
    """Every output row computed (padding and unflagged experts included): what the kernel writes, and more."""
    flat = src.reshape(-1, src.shape[-1])
    picked = flat if index is None else flat[index if start is None else shifted_index(index, start)]
    if quantize:
        return quantize_rowwise(picked)
    return (picked.clone() if index is None else picked), src.new_empty((0,), dtype=torch.float32)


def _gather_fake(src, index, start, count, expert_flags, quantize):
    rows = index.numel() if index is not None else math.prod(src.shape[:-1])
    return _row_outputs(src, rows, src.shape[-1], quantize)


def _gather_cuda(src, index, start, count, expert_flags, quantize, kernel=None):
    """`kernel`: the launcher (`wrap_triton` of `_rows_kernel` when traced); the same for the other `_cuda`s."""
    k = src.shape[-1]
    flat = src.reshape(-1, k)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = index.numel() if index is not None else flat.shape[0]
    out, scale = _row_outputs(src, rows, k, quantize)
    if rows:
        block, warps = _launch_meta(k)
        dummy = flat  # pointer arguments of disabled features: never read or written
        group_rows = src.shape[-2] if expert_flags is not None else 1
        (kernel or _rows_kernel)[_grid(rows, src.device)](
            flat,
            index if index is not None else dummy,
            start if start is not None else dummy,
            count if count is not None else dummy,
            expert_flags if expert_flags is not None else dummy,
            out, scale if quantize else dummy,
            rows, k, flat.stride(0), out.stride(0), group_rows,
            HAS_IDX=index is not None, HAS_START=start is not None, HAS_COUNT=count is not None,
            HAS_FLAG=expert_flags is not None, QUANT=quantize, BLOCK=block, num_warps=warps,
        )
    return out, scale


def _gather_traceable(
    src: torch.Tensor,
    index: torch.Tensor | None,
    start: torch.Tensor | None,
    count: torch.Tensor | None,
    expert_flags: torch.Tensor | None,
    quantize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _gather_cuda(src, index, start, count, expert_flags, quantize, wrap_triton(_rows_kernel))


_GATHER = define_op(
    "gather_quant_rows",
    "(Tensor src, Tensor? index, Tensor? start, Tensor? count, Tensor? expert_flags, bool quantize)"
    " -> (Tensor, Tensor)",
    reference=_gather_reference,
    fake=_gather_fake,
    cuda=_gather_cuda if triton is not None else None,
    traceable=_gather_traceable if triton is not None else None,
)


def gather_quant_rows(
    src: torch.Tensor,
    index: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    expert_flags: torch.Tensor | None = None,
    quantize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`src[index]` (or all of `src`, any leading dims) quantized rowwise: (rows, K) e4m3 and (rows,) fp32.

    Device-side bounds, so no caller reads a count back to the host:
    - `start`, `count` (one-element int tensors, start None: 0): output row i is `src[index[start + i]]` for
      i < count; rows at and past `count` are padding, left unwritten. The output has `index.numel()` rows.
    - `expert_flags` (weights `(E, N, K)` only): experts whose flag is 0 are skipped (left unwritten), so a
      conversion can be queued before anyone knows which experts it is for.
    `quantize=False` gathers in `src`'s dtype instead (scale is None). The reference (off CUDA) writes every row.
    """
    data, scale = _GATHER(src, index, start, count, expert_flags, quantize)
    if index is None:
        return data.view(src.shape), scale.view(src.shape[:-1]) if quantize else None
    return data, scale if quantize else None


# ---- realb_kernels::gather_split_rows ---------------------------------------------------------------------


def _split_reference(src, index, totals, quantize_a, quantize_b):
    a = _gather_reference(src, index, None, totals[:1], None, quantize_a)
    b = _gather_reference(src, index, totals[:1], totals[1:], None, quantize_b)
    return (*a, *b)


def _split_fake(src, index, totals, quantize_a, quantize_b):
    rows, k = index.numel(), src.shape[-1]
    return (*_row_outputs(src, rows, k, quantize_a), *_row_outputs(src, rows, k, quantize_b))


def _split_cuda(src, index, totals, quantize_a, quantize_b, kernel=None):
    k = src.shape[-1]
    if src.stride(-1) != 1:
        src = src.contiguous()
    rows = index.numel()
    (a, a_scale), (b, b_scale) = _row_outputs(src, rows, k, quantize_a), _row_outputs(src, rows, k, quantize_b)
    if rows:
        block, warps = _launch_meta(k)
        (kernel or _split_rows_kernel)[_grid(rows, src.device)](
            src, index, totals, a, a_scale if quantize_a else src, b, b_scale if quantize_b else src,
            rows, k, src.stride(0), a.stride(0), b.stride(0),
            QUANT_A=quantize_a, QUANT_B=quantize_b, BLOCK=block, num_warps=warps,
        )
    return a, a_scale, b, b_scale


def _split_traceable(
    src: torch.Tensor, index: torch.Tensor, totals: torch.Tensor, quantize_a: bool, quantize_b: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _split_cuda(src, index, totals, quantize_a, quantize_b, wrap_triton(_split_rows_kernel))


_SPLIT = define_op(
    "gather_split_rows",
    "(Tensor src, Tensor index, Tensor totals, bool quantize_a, bool quantize_b) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=_split_reference,
    fake=_split_fake,
    cuda=_split_cuda if triton is not None else None,
    traceable=_split_traceable if triton is not None else None,
)


def gather_split_rows(
    src: torch.Tensor, index: torch.Tensor, totals: torch.Tensor, quantize: tuple[bool, bool]
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]:
    """`gather_quant_rows` of two consecutive groups in one launch: rows `index[0:n_a]` and `index[n_a:n_a + n_b]`
    (`totals` = (n_a, n_b), on the device) of `src (S, K)`, each group quantized or not. Each output has
    `index.numel()` rows; rows past the group's count are padding, left unwritten."""
    a, a_scale, b, b_scale = _SPLIT(src, index, totals, quantize[0], quantize[1])
    return (a, a_scale if quantize[0] else None), (b, b_scale if quantize[1] else None)


# ---- realb_kernels::swiglu_rows ---------------------------------------------------------------------------


def _swiglu_reference(h, count, quantize):
    """Every row: quantized, the rowwise quantization of the fp32 product (the kernel multiplies by the
    reciprocal scale instead of dividing, within fp8 rounding of this); else eager `silu(gate) * up`."""
    gate, up = h.chunk(2, dim=-1)
    if quantize:
        return quantize_rowwise(torch.nn.functional.silu(gate.float()) * up.float())
    return torch.nn.functional.silu(gate) * up, h.new_empty((0,), dtype=torch.float32)


def _swiglu_fake(h, count, quantize):
    return _row_outputs(h, h.shape[0], h.shape[1] // 2, quantize)


def _swiglu_cuda(h, count, quantize, kernel=None):
    rows, two_i = h.shape
    inter = two_i // 2
    if h.stride(-1) != 1:
        h = h.contiguous()
    out, scale = _row_outputs(h, rows, inter, quantize)
    if rows:
        block, warps = _launch_meta(inter)
        (kernel or _swiglu_kernel)[_grid(rows, h.device)](
            h, count if count is not None else h, out, scale if quantize else h,
            rows, inter, h.stride(0), out.stride(0),
            HAS_COUNT=count is not None, QUANT=quantize, BLOCK=block, num_warps=warps,
        )
    return out, scale


def _swiglu_traceable(h: torch.Tensor, count: torch.Tensor | None, quantize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _swiglu_cuda(h, count, quantize, wrap_triton(_swiglu_kernel))


_SWIGLU = define_op(
    "swiglu_rows",
    "(Tensor h, Tensor? count, bool quantize) -> (Tensor, Tensor)",
    reference=_swiglu_reference,
    fake=_swiglu_fake,
    cuda=_swiglu_cuda if triton is not None else None,
    traceable=_swiglu_traceable if triton is not None else None,
)


def swiglu_rows(
    h: torch.Tensor, count: torch.Tensor | None = None, quantize: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(S, 2I) concatenated gate|up -> SwiGLU output: quantized rowwise ((S, I) e4m3, (S,) fp32), or in h's
    dtype with eager rounding (scale None). Rows at and past `count` (device int) are padding, unwritten.

    The quantized output multiplies by the row's reciprocal scale (not bit-identical to `quantize_rowwise` of the
    product, which divides; the difference is within fp8 rounding)."""
    out, scale = _SWIGLU(h, count, quantize)
    return out, scale if quantize else None


def swiglu_quant_rows(h: torch.Tensor, count: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, 2I) concatenated gate|up -> SwiGLU output quantized rowwise: (S, I) e4m3 and (S,) fp32."""
    return swiglu_rows(h, count, quantize=True)
