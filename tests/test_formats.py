"""Tests of realb_hf.formats: bf16 bit-identity, low-precision error bounds, edge cases, registry.

Measured relative Frobenius error of `grouped_linear` (weights AND activations quantized) against the
fp32 reference `x.float() @ W.float().T` per expert group, on CPU, torch 2.13 + torchao 0.18.
Shapes: E=4 experts, N=64, K=128, groups of 37/0/64/27 rows (one empty), x ~ N(0, 1) and W ~ N(0, 0.02^2),
both rounded to bf16. "W only" quantizes the weight alone (activations stay bf16), for comparison.

| format | W+A error, seed 0 | W+A, seeds 0-4 | W only, seeds 0-4 | bound asserted |
| ------ | ----------------- | -------------- | ----------------- | -------------- |
| bf16   | 0.16%             | 0.16-0.17%     | -                 | bit-identical to transformers `_grouped_mm` |
| fp8    | 3.64%             | 3.62-3.68%     | 2.56-2.65%        | < 4.5%         |
| nvfp4  | 13.61%            | 13.06-13.61%   | 9.33-9.55%        | < 15%          |
| mxfp4  | 16.28%            | 16.02-16.28%   | 11.30-11.51%      | < 18%          |

(bf16's 0.16% is only the bf16 rounding of the output; fp8 is rowwise e4m3, nvfp4 uses an e4m3 scale per
16 plus per-expert / per-expert-group fp32 global scales, mxfp4 an e8m0 scale per 32.)
"""

from __future__ import annotations

import warnings

import pytest
import torch

from realb_hf.formats import (
    FORMATS,
    LOW_PRECISIONS,
    Bf16Format,
    Fp8Format,
    Fp8Weight,
    get_format,
    quantize_rowwise,
    resolve_low_precision,
)
from realb_hf.formats.emulation import EmulationWarning, _reset_emulation_warnings
from realb_hf.formats.fp8 import FP8_MAX

E, N, K = 4, 64, 128
COUNTS = (37, 0, 64, 27)
ERROR_BOUNDS = {"fp8": 0.045, "nvfp4": 0.15, "mxfp4": 0.18}
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _quiet_emulation_warning():
    """The one-time emulation warning is tested on its own; elsewhere it is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmulationWarning)
        yield


def make_case(seed: int = 0, counts: tuple[int, ...] = COUNTS, k: int = K):
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), k, generator=g).to(torch.bfloat16)
    w = (torch.randn(len(counts), N, k, generator=g) * 0.02).to(torch.bfloat16)
    return x, w, offs


def reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].float() @ w[e].float().T
        start = end
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def run(name: str, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fmt = get_format(name)
    return fmt.grouped_linear(x, fmt.quantize_weight(w), offs)


# ---------------------------------------------------------------- bf16


def test_bf16_is_bit_identical_to_transformers_grouped_mm():
    from transformers.integrations.moe import _grouped_mm

    x, w, offs = make_case()
    fmt = get_format("bf16")
    assert fmt.quantize_weight(w) is w
    out = fmt.grouped_linear(x, w, offs)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _grouped_mm(x, w.transpose(-2, -1), offs=offs))


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("name", LOW_PRECISIONS)
def test_low_precision_error_within_bound(name):
    x, w, offs = make_case()
    out = run(name, x, w, offs)
    assert out.shape == (x.shape[0], N) and out.dtype == x.dtype
    err = rel_err(out, reference(x, w, offs))
    bf16_err = rel_err(run("bf16", x, w, offs), reference(x, w, offs))
    assert err < ERROR_BOUNDS[name], f"{name}: {err:.4f}"
    assert err > 10 * bf16_err, f"{name} did not quantize: {err:.4f} vs bf16 {bf16_err:.4f}"


def test_error_ordering_fp8_nvfp4_mxfp4():
    x, w, offs = make_case()
    ref = reference(x, w, offs)
    errs = [rel_err(run(name, x, w, offs), ref) for name in ("fp8", "nvfp4", "mxfp4")]
    assert errs[0] < errs[1] < errs[2], errs


# ---------------------------------------------------------------- fp8 quantizer


@pytest.mark.parametrize("shape", [(33, K), (E, N, K)])
def test_fp8_quantize_rowwise_round_trip(shape):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    data, scale = quantize_rowwise(t)
    assert data.dtype == torch.float8_e4m3fn and data.shape == t.shape and data.is_contiguous()
    assert scale.dtype == torch.float32 and scale.shape == t.shape[:-1]
    assert torch.allclose(scale, t.abs().amax(-1).float() / FP8_MAX)
    back = data.float() * scale.unsqueeze(-1)
    err = (back - t.float()).abs()
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative for normals; subnormals step 2^-9 * scale.
    bound = torch.maximum(t.float().abs() * 2**-4, scale.unsqueeze(-1) * 2**-10) + 1e-12
    assert (err <= bound).all()
    assert rel_err(back, t.float()) < 0.03


def test_fp8_zero_rows_stay_zero():
    t = torch.randn(4, K).to(torch.bfloat16)
    t[1] = 0
    data, scale = quantize_rowwise(t)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert not data.float().isnan().any()
    assert (data[1].float() == 0).all()


def test_fp8_non_finite_rows_do_not_raise_nor_leak():
    clean = torch.randn(5, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    bad = clean.clone()
    bad[1, 3] = float("inf")
    bad[3, 7] = float("nan")
    data, scale = quantize_rowwise(bad)
    ref_data, ref_scale = quantize_rowwise(clean)
    finite = [0, 2, 4]
    assert torch.equal(data[finite].view(torch.uint8), ref_data[finite].view(torch.uint8))
    assert torch.equal(scale[finite], ref_scale[finite])
    back = data.float() * scale.unsqueeze(-1)
    assert back[1].isnan().any() and back[3].isnan().any()


# ---------------------------------------------------------------- non-finite / zero rows, all formats


@pytest.mark.parametrize("name", LOW_PRECISIONS)
def test_non_finite_rows_leave_finite_rows_alone(name):
    x, w, offs = make_case()
    clean = x.clone()
    clean[[2, 40, 41]] = 0  # rows 40/41 share expert 2's group with finite rows
    bad = clean.clone()
    bad[2, 5] = float("inf")
    bad[40, 9] = float("nan")
    fmt = get_format(name)
    packed = fmt.quantize_weight(w)
    out_bad = fmt.grouped_linear(bad, packed, offs)
    out_clean = fmt.grouped_linear(clean, packed, offs)
    finite = torch.ones(x.shape[0], dtype=torch.bool)
    finite[[2, 40]] = False
    assert torch.equal(out_bad[finite], out_clean[finite])
    assert not torch.isfinite(out_bad[2]).all() and not torch.isfinite(out_bad[40]).all()
    assert (out_clean[41] == 0).all() and (out_bad[41] == 0).all()  # zero row stays zero, no NaN


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", list(FORMATS))
def test_no_rows_gives_empty_output(name):
    _, w, _ = make_case()
    x = torch.empty(0, K, dtype=torch.bfloat16)
    offs = torch.zeros(E, dtype=torch.int32)
    out = run(name, x, w, offs)
    assert out.shape == (0, N) and out.dtype == torch.bfloat16


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("counts", [(0, 0, 50, 0), (50, 0, 0, 0), (0, 0, 0, 50), (10, 0, 0, 40)])
def test_one_expert_or_empty_groups(name, counts):
    x, w, offs = make_case(seed=3, counts=counts)
    out = run(name, x, w, offs)
    assert out.shape == (x.shape[0], N)
    assert rel_err(out, reference(x, w, offs)) < ERROR_BOUNDS.get(name, 0.005)


@pytest.mark.parametrize(("name", "block", "bad_k"), [("nvfp4", 16, 24), ("mxfp4", 32, 48)])
def test_block_divisibility_error(name, block, bad_k):
    fmt = get_format(name)
    x, w, offs = make_case(counts=(3, 0, 2, 1), k=bad_k)
    with pytest.raises(ValueError, match=rf"divisible by its block size {block}.*\(4, 64, {bad_k}\)"):
        fmt.quantize_weight(w)
    _, w_ok, _ = make_case(counts=(3, 0, 2, 1))
    with pytest.raises(ValueError, match=rf"divisible by its block size {block}.*\(6, {bad_k}\)"):
        fmt.grouped_linear(x, fmt.quantize_weight(w_ok), offs)


def test_weight_nbytes():
    _, w, _ = make_case()
    numel = E * N * K
    assert get_format("bf16").weight_nbytes(w) == 2 * numel
    assert get_format("fp8").weight_nbytes(get_format("fp8").quantize_weight(w)) == numel + 4 * E * N
    assert get_format("nvfp4").weight_nbytes(get_format("nvfp4").quantize_weight(w)) == numel // 2 + numel // 16 + 4 * E
    assert get_format("mxfp4").weight_nbytes(get_format("mxfp4").quantize_weight(w)) == numel // 2 + numel // 32


def test_fp8_fp32_activations_round_like_bf16():
    """`torch._scaled_grouped_mm` only outputs bf16, so every fp8 path does, then casts to x.dtype."""
    x, w, offs = make_case()
    fmt = get_format("fp8")
    packed = fmt.quantize_weight(w)
    out32 = fmt.grouped_linear(x.float(), packed, offs)
    assert out32.dtype == torch.float32
    assert torch.equal(out32, fmt.grouped_linear(x, packed, offs).float())


def test_fp8_weight_layout():
    _, w, _ = make_case()
    packed = get_format("fp8").quantize_weight(w)
    assert isinstance(packed, Fp8Weight)
    assert packed.data.shape == (E, N, K) and packed.data.is_contiguous() and packed.scale.shape == (E, N)


# ---------------------------------------------------------------- emulation warning


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_emulation_warning_is_emitted_once(name):
    x, w, offs = make_case(counts=(3, 0, 2, 1))
    fmt = get_format(name)
    packed = fmt.quantize_weight(w)
    _reset_emulation_warnings()
    with pytest.warns(EmulationWarning, match="slower than bf16"):
        fmt.grouped_linear(x, packed, offs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmulationWarning)
        fmt.grouped_linear(x, packed, offs)  # a second warning would raise here


# ---------------------------------------------------------------- registry


def test_registry_and_native_flags_on_cpu():
    assert set(FORMATS) == {"bf16", "fp8", "nvfp4", "mxfp4"}
    for name, fmt in FORMATS.items():
        assert fmt.name == name and get_format(name) is fmt
        assert fmt.is_native(CPU) == (name == "bf16")
    assert [FORMATS[n].bits for n in ("bf16", "fp8", "nvfp4", "mxfp4")] == [16, 8, 4, 4]


def test_bad_names_list_allowed_values():
    with pytest.raises(ValueError, match="bf16, fp8, nvfp4, mxfp4"):
        get_format("int4")
    with pytest.raises(ValueError, match="auto, fp8, nvfp4, mxfp4"):
        resolve_low_precision("bf16", CPU)
    with pytest.raises(ValueError, match="auto, fp8, nvfp4, mxfp4"):
        resolve_low_precision("fp16", CPU)


def test_resolve_low_precision_on_cpu():
    assert resolve_low_precision("auto", CPU) == "fp8"
    assert resolve_low_precision("auto", "cpu") == "fp8"
    for name in LOW_PRECISIONS:
        assert resolve_low_precision(name, CPU) == name


# ---------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("counts", [(128, 0, 200, 56), (0, 0, 77, 0), (3, 1, 0, 5), (0, 0, 0, 0)])
def test_fp8_cuda_matches_cpu_emulation(counts):
    fmt = get_format("fp8")
    x, w, offs = make_case(seed=4, counts=counts)
    dev = torch.device("cuda")
    if not fmt.is_native(dev):
        pytest.skip("fp8 kernels need CUDA capability >= 8.9")
    xq_cpu, sx_cpu = quantize_rowwise(x)
    xq_gpu, sx_gpu = quantize_rowwise(x.to(dev))
    assert torch.equal(xq_gpu.cpu().view(torch.uint8), xq_cpu.view(torch.uint8))
    assert torch.equal(sx_gpu.cpu(), sx_cpu)
    out_gpu = fmt.grouped_linear(x.to(dev), fmt.quantize_weight(w.to(dev)), offs.to(dev)).cpu()
    out_cpu = fmt.grouped_linear(x, fmt.quantize_weight(w), offs)
    assert out_gpu.shape == out_cpu.shape == (x.shape[0], N)
    assert out_gpu.dtype == out_cpu.dtype == torch.bfloat16
    if x.shape[0] == 0:
        return
    # Same fp8 operands; only the accumulation (fast accum on GPU) and the bf16 output rounding differ.
    assert rel_err(out_gpu, out_cpu.float()) < 5e-3
    assert torch.allclose(out_gpu.float(), out_cpu.float(), rtol=2e-2, atol=2e-2 * out_cpu.float().abs().max().item())
    assert rel_err(out_gpu, reference(x, w, offs)) < ERROR_BOUNDS["fp8"]
    out_gpu32 = fmt.grouped_linear(x.float().to(dev), fmt.quantize_weight(w.to(dev)), offs.to(dev))
    assert out_gpu32.dtype == torch.float32 and torch.equal(out_gpu32.cpu(), out_gpu.float())


def test_fp8_reference_epilogue_multiplies_the_scales_first():
    """Huge activations against tiny weights: the outputs (~1e33) are finite in bf16, and the reference epilogue
    multiplies the two scales before the accumulator, so it does not overflow fp32 on the way."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 64, generator=gen) * 1e36).to(torch.bfloat16)
    w = (torch.randn(2, 32, 64, generator=gen) * 1e-3).to(torch.bfloat16)
    offs = torch.tensor([8, 16], dtype=torch.int32)
    reference = Bf16Format().grouped_linear(x, w, offs).float()
    fp8 = Fp8Format()
    out = fp8.grouped_linear(x, fp8.quantize_weight(w), offs).float()
    assert torch.isfinite(reference).all() and torch.isfinite(out).all()
    out, reference = out / 1e33, reference / 1e33  # norms of the raw values would overflow
    assert ((out - reference).norm() / reference.norm()).item() < 0.1
