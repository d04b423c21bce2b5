"""Row kernels (`kernels.rows`) and the combine against their pure-torch references.

On CUDA the Triton kernels run; elsewhere the same wrappers run the operators' reference kernels, so the
row-count semantics are checked on every machine."""

import pytest
import torch

from realb_hf.formats import get_format
from realb_hf.formats.fp8 import Fp8Weight, quantize_rowwise
from realb_hf.kernels import rows as row_kernels

cuda = pytest.mark.cuda
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]


def test_kernels_report_unavailable_on_cpu():
    assert not row_kernels.available(torch.device("cpu"))


@cuda
@pytest.mark.parametrize("k", [96, 2048, 2560, 7168])
def test_gather_quant_is_bit_identical_to_reference(k):
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16) * torch.rand(300, 1, device="cuda") * 10
    x[5] = 0
    index = torch.randint(0, 300, (517,), device="cuda")
    data, scale = row_kernels.gather_quant_rows(x, index)
    ref_data, ref_scale = quantize_rowwise(x[index])
    assert torch.equal(scale, ref_scale)
    assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
def test_weight_conversion_is_bit_identical_and_keeps_shape(device):
    w = torch.randn(4, 96, 64, device=device, dtype=torch.bfloat16)
    data, scale = row_kernels.gather_quant_rows(w)
    ref_data, ref_scale = quantize_rowwise(w)
    assert data.shape == w.shape and scale.shape == w.shape[:2]
    assert torch.equal(scale, ref_scale) and torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8))


@cuda
def test_swiglu_quant_matches_eager_within_bf16_rounding():
    h = torch.randn(257, 2 * 768, device="cuda", dtype=torch.bfloat16) * 3
    data, scale = row_kernels.swiglu_quant_rows(h)
    gate, up = h.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate) * up
    got = data.float() * scale[:, None]
    assert ((got - act.float()).norm() / act.float().norm()).item() < 0.04
    ref_data, ref_scale = quantize_rowwise(act)
    assert torch.allclose(scale, ref_scale, rtol=1e-2)


@cuda
def test_fused_expert_mlp_matches_composed_path():
    fmt = get_format("fp8")
    e, hidden, inter, rows = 8, 256, 192, 1000
    first = fmt.quantize_weight(torch.randn(e, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * 0.05)
    down = fmt.quantize_weight(torch.randn(e, hidden, inter, device="cuda", dtype=torch.bfloat16) * 0.05)
    assert isinstance(first, Fp8Weight)
    x = torch.randn(400, hidden, device="cuda", dtype=torch.bfloat16)
    src = torch.randint(0, 400, (rows,), device="cuda")
    counts = torch.tensor([0, 300, 100, 0, 250, 50, 300, 0], device="cuda")
    offs = torch.cumsum(counts, 0, dtype=torch.int32)

    def gate(h):
        g, u = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u

    fused = fmt.expert_mlp(x, src, first, down, offs, gate, fused_swiglu=True)
    composed = fmt.expert_mlp(x, src, first, down, offs, gate, fused_swiglu=False)
    assert fused.shape == (rows, hidden)
    assert ((fused.float() - composed.float()).norm() / composed.float().norm()).item() < 0.02


def test_combine_reference_matches_stock_weighting():
    from realb_hf.kernels.combine import weighted_combine_reference

    y = torch.randn(12, 16, dtype=torch.bfloat16)
    pos = torch.tensor([[0, 5], [3, -1], [11, 2]])
    w = torch.rand(3, 2, dtype=torch.bfloat16)
    out = weighted_combine_reference(y, pos, w)
    expected = torch.stack([y[0] * w[0, 0] + y[5] * w[0, 1], y[3] * w[1, 0], y[11] * w[2, 0] + y[2] * w[2, 1]])
    assert torch.allclose(out.float(), expected.float(), rtol=1e-2, atol=1e-2)
    assert out.dtype == torch.bfloat16


@cuda
@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
def test_combine_kernel_matches_reference(weights_dtype):
    from realb_hf.kernels.combine import weighted_combine, weighted_combine_reference

    y = torch.randn(5000, 2048, device="cuda", dtype=torch.bfloat16)
    pos = torch.randint(-1, 5000, (700, 8), device="cuda")
    w = torch.rand(700, 8, device="cuda").to(weights_dtype)
    out, ref = weighted_combine(y, pos, w), weighted_combine_reference(y, pos, w)
    assert out.dtype == ref.dtype
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start, count, rows", [(0, 0, 517), (0, 517, 517), (100, 300, 517), (517, 0, 517), (0, 1, 1)])
def test_count_aware_gather_touches_only_real_rows(start, count, rows, device):
    x = torch.randn(300, 2048, device=device, dtype=torch.bfloat16)
    index = torch.randint(0, 300, (rows,), device=device)
    start_t, count_t = torch.tensor([start], device=device), torch.tensor([count], device=device)
    data, scale = row_kernels.gather_quant_rows(x, index, start_t, count_t)
    ref_data, ref_scale = quantize_rowwise(x[index[start : start + count]])
    assert torch.equal(scale[:count], ref_scale)
    assert torch.equal(data[:count].view(torch.uint8), ref_data.view(torch.uint8))
    plain, none = row_kernels.gather_quant_rows(x, index, start_t, count_t, quantize=False)
    assert none is None and torch.equal(plain[:count], x[index[start : start + count]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantize", [(False, True), (True, False), (False, False), (True, True)])
@pytest.mark.parametrize("n_a, n_b, rows", [(0, 0, 517), (200, 317, 517), (517, 0, 517), (0, 400, 517), (1, 0, 1)])
def test_split_gather_equals_two_gathers(quantize, n_a, n_b, rows, device):
    x = torch.randn(300, 2048, device=device, dtype=torch.bfloat16)
    index = torch.randint(0, 300, (rows,), device=device)
    totals = torch.tensor([n_a, n_b], device=device, dtype=torch.int32)
    got = row_kernels.gather_split_rows(x, index, totals, quantize)
    for (data, scale), quant, lo, n in zip(got, quantize, (0, n_a), (n_a, n_b)):
        ref, ref_scale = row_kernels.gather_quant_rows(x, index[lo : lo + n], quantize=quant)
        assert data.shape[0] == rows and (scale is None) == (not quant)
        assert torch.equal(data[:n].view(torch.uint8), ref.view(torch.uint8))
        if quant:
            assert torch.equal(scale[:n], ref_scale)


@pytest.mark.parametrize("device", DEVICES)
def test_flagged_weight_conversion_converts_only_flagged_experts(device):
    w = torch.randn(6, 96, 256, device=device, dtype=torch.bfloat16)
    flags = torch.tensor([0, 1, 1, 0, 0, 1], device=device, dtype=torch.bool)
    data, scale = row_kernels.gather_quant_rows(w, expert_flags=flags)
    ref_data, ref_scale = quantize_rowwise(w)
    for e in (1, 2, 5):
        assert torch.equal(scale[e], ref_scale[e]) and torch.equal(data[e].view(torch.uint8), ref_data[e].view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count, rows", [(0, 257), (100, 257), (257, 257), (1, 1)])
def test_swiglu_kernels_with_a_device_count(count, rows, device):
    h = torch.randn(rows, 2 * 768, device=device, dtype=torch.bfloat16) * 3
    gate, up = h.chunk(2, dim=-1)
    eager = torch.nn.functional.silu(gate) * up
    count_t = torch.tensor([count], device=device)
    act, none = row_kernels.swiglu_rows(h, count_t, quantize=False)
    assert none is None
    assert torch.equal(act[:count], eager[:count])  # rounds exactly as eager silu(gate) * up
    data, scale = row_kernels.swiglu_quant_rows(h, count_t)
    got = data[:count].float() * scale[:count, None]
    if count:
        assert ((got - eager[:count].float()).norm() / eager[:count].float().norm()).item() < 0.04


def test_background_share_caps_the_persistent_grid():
    """Side-stream conversions fill a share of the SMs; the share is restored afterwards (no GPU needed)."""
    full = (132 * row_kernels.PROGRAMS_PER_SM,)
    assert row_kernels.persistent_grid(10**6, 132) == full
    with row_kernels.background(0.25):
        assert row_kernels.persistent_grid(10**6, 132) == (132 * row_kernels.PROGRAMS_PER_SM // 4,)
        assert row_kernels.persistent_grid(5, 132) == (5,)
    assert row_kernels.persistent_grid(0, 132) == (1,)
    assert row_kernels.persistent_grid(10**6, 132) == full


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_background_share_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match="must be in"):
        with row_kernels.background(fraction):
            pass


def test_kernels_are_a_leaf_layer():
    """Nothing under realb_hf/kernels imports the rest of realb_hf: every layer above may use the kernels."""
    import ast
    from pathlib import Path

    import realb_hf.kernels

    above = []
    for path in Path(realb_hf.kernels.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("realb_hf")):
                above.append(f"{path.name}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import):
                above += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("realb_hf")]
    assert not above, above
