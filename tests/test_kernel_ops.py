"""The kernels are registered `realb_kernels::` operators: fakes agree with the real kernels, and torch.compile traces them.

`torch.library.opcheck` runs each operator for real and under fake tensors and AOT dispatch, so a fake that
states a wrong shape or dtype, a schema that does not fit the kernel, or an output aliasing an input fails here.
CPU runs the reference kernels; the CUDA cases run the Triton kernels on inputs whose every output row is
written (padding rows hold whatever memory held, so only metadata is compared where an operator leaves some).
"""

import os
import subprocess
import sys

import pytest
import torch

import realb_hf.kernels.exchange  # noqa: F401  (registers realb_kernels::exchange_counts)
from realb_hf.kernels import counts, rows, sort
from realb_hf.kernels.combine import weighted_combine_reference
from realb_hf.kernels.counts import DecisionRule
from realb_hf.kernels.library import TRACEABLE, traceable_names, use_traceable
from realb_hf.modality import TEXT
from realb_hf.policy import PolicyParams

cuda = pytest.mark.cuda
METADATA_ONLY = ("test_schema", "test_autograd_registration", "test_faketensor")
EVERY_TEST = (*METADATA_ONLY, "test_aot_dispatch_dynamic")
RULE_ARGS = (2, True, 0.1, 0.5, 0.78)  # ep_size, expert granularity, imbalance, modality, cost ratio


def op_cases(device: str, every_row_written: bool) -> list:
    """(operator, arguments, opcheck tests) on `device`; with `every_row_written`, count-bounded rows are full."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=gen).bfloat16().to(device)
    index = torch.randint(0, 40, (50,), generator=gen).to(device)
    full = every_row_written
    start, count = torch.tensor([0 if full else 5], device=device), torch.tensor([50 if full else 30], device=device)
    flags = torch.tensor([1, 1, 1, 1] if full else [1, 0, 1, 1], device=device)
    h = torch.randn(30, 128, generator=gen).bfloat16().to(device)
    ids = torch.randint(0, 9, (1500, 2), generator=gen).to(device)  # 8 experts, 8 is another rank's
    modality = torch.randint(0, 3, (1500,), dtype=torch.int8, generator=gen).to(device)
    low = (torch.rand(8, generator=gen) < 0.5).to(device)
    hidden = torch.randn(1500, 16, generator=gen).bfloat16().to(device)
    y, y_low = torch.randn(60, 16, generator=gen).to(device), torch.randn(20, 16, generator=gen).to(device)
    pos = torch.randint(-1, 80, (30, 2), generator=gen).to(device)
    weights = torch.rand(30, 2, generator=gen).to(device)
    split_totals = torch.tensor([20, 25], dtype=torch.int32, device=device)
    ops, all_tests = torch.ops.realb_kernels, EVERY_TEST
    return [
        (ops.gather_quant_rows.default, (x, index, start, count, None, True), all_tests),
        (ops.gather_quant_rows.default, (x, index, start, count, None, False), all_tests),
        (ops.gather_quant_rows.default, (x.view(4, 10, 64), None, None, None, flags, True), all_tests),
        (ops.gather_quant_rows.default, (x, None, None, None, None, False), all_tests),
        # the Triton kernel leaves rows past each group's count unwritten, whatever the totals
        (ops.gather_split_rows.default, (x, index, split_totals, True, False), METADATA_ONLY if full else all_tests),
        (ops.swiglu_rows.default, (h, None if full else torch.tensor([10], device=device), True), all_tests),
        (ops.swiglu_rows.default, (h, None, False), all_tests),
        (ops.routing_counts.default, (ids, modality, 8, TEXT), all_tests),
        (ops.routing_counts.default, (ids[:0], None, 8, TEXT), all_tests),
        (ops.lowered_flags.default, (counts.routing_counts(ids, modality, 8, TEXT), *RULE_ARGS), all_tests),
        (ops.counts_and_flags.default, (ids, modality, 8, TEXT, *RULE_ARGS), all_tests),
        (ops.counts_and_flags.default, (ids, modality, 8, TEXT, 4, False, 0.0, 0.5, 0.78), all_tests),
        (ops.sort_rows.default, (ids, low, hidden, 8), all_tests),
        (ops.exchange_counts.default, (ids, modality, hidden, 8, TEXT, True), all_tests),
        (ops.exchange_counts.default, (ids[:0], None, hidden[:0], 8, TEXT, False), all_tests),
        (ops.weighted_combine.default, (y, pos, weights, y_low), all_tests),
        (ops.weighted_combine.default, (y, pos.clamp(max=59), weights.bfloat16(), None), all_tests),
    ]


def _name(case) -> str:
    return case[0].name()


@pytest.mark.parametrize("case", op_cases("cpu", every_row_written=False), ids=_name)
def test_operators_pass_opcheck_on_cpu(case):
    op, args, tests = case
    result = torch.library.opcheck(op, args, test_utils=tests)
    assert all(r == "SUCCESS" for r in result.values()), result


@cuda
def test_operators_pass_opcheck_on_cuda():
    for op, args, tests in op_cases("cuda", every_row_written=True):
        result = torch.library.opcheck(op, args, test_utils=tests)
        assert all(r == "SUCCESS" for r in result.values()), (op.name(), result)


def layer_bookkeeping(top_k_index, modality, hidden, weights, low_first, rule: DecisionRule):
    """Every CPU-capable operator through its public wrapper, as a layer's forward strings them together."""
    num_tokens, top_k = top_k_index.shape
    routed, flags = counts.counts_and_flags(top_k_index, modality, 8, rule, TEXT)
    again = counts.lowered_flags(counts.routing_counts(top_k_index, modality, 8, TEXT), rule)
    low = flags | low_first
    order = sort.sort_rows(top_k_index, low, hidden, 8)
    high_rows, low_rows = rows.gather_split_rows(hidden, order.rows, order.totals, (False, True))
    data, scale = rows.gather_quant_rows(hidden, order.rows, order.totals[:1], order.totals[1:])
    weight, weight_scale = rows.gather_quant_rows(weights, expert_flags=low)
    act, act_scale = rows.swiglu_rows(torch.cat([hidden, hidden], dim=-1), order.totals[:1])
    y = high_rows[0].float()  # positions of low rows index past y, into the second matrix
    out = torch.ops.realb_kernels.weighted_combine(y, order.position.view(num_tokens, top_k), torch.ones(num_tokens, top_k), y)
    return routed, flags, again, *order, *low_rows, data, scale, weight, weight_scale, act, act_scale, out


def test_operators_compile_without_graph_breaks():
    """fullgraph=True fails on any graph break; two sizes make the second compile use symbolic shapes."""
    compiled = torch.compile(layer_bookkeeping, fullgraph=True, backend="aot_eager")
    rule = PolicyParams(ep_size=2, granularity="expert", modality_threshold=0.5).device_rule()
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(8, 12, 32, generator=gen).bfloat16()
    for tokens in (300, 517):
        top_k_index = torch.randint(0, 9, (tokens, 2), generator=gen)
        top_k_index[: tokens // 2] %= 4  # rank 0 hot
        modality = (torch.rand(tokens, generator=gen) < 0.8).to(torch.int8)
        hidden = torch.randn(tokens, 32, generator=gen).bfloat16()
        low_first = torch.zeros(8, dtype=torch.bool)
        low_first[5] = True
        eager = layer_bookkeeping(top_k_index, modality, hidden, weights, low_first, rule)
        for got, want in zip(compiled(top_k_index, modality, hidden, weights, low_first, rule), eager, strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert torch.equal(got.view(torch.uint8) if got.dtype == rows.FP8_DTYPE else got,
                               want.view(torch.uint8) if want.dtype == rows.FP8_DTYPE else want)


def test_a_rank_count_that_does_not_divide_the_experts_is_refused():
    ids = torch.randint(0, 6, (10, 2))
    bad = DecisionRule(ep_size=4, expert_granularity=False, imbalance_threshold=0.1, modality_threshold=0.7,
                       cost_ratio=0.78)
    for call in (
        lambda: counts.counts_and_flags(ids, None, 6, bad, TEXT),
        lambda: counts.lowered_flags(torch.zeros(2, 6, dtype=torch.long), bad),
        lambda: counts.lowered_flags_reference(torch.zeros(2, 6, dtype=torch.long), bad),
    ):
        with pytest.raises(ValueError, match=r"ep_size=4 .* number of experts \(6\)"):
            call()


def test_the_policy_hands_its_numbers_to_the_device_rule():
    params = PolicyParams(ep_size=4, granularity="expert", imbalance_threshold=0.3, modality_threshold=0.6,
                          low="nvfp4", low_cost_ratio=0.5)
    assert params.device_rule() == DecisionRule(4, True, 0.3, 0.6, 0.5)
    assert PolicyParams().device_rule() == DecisionRule(1, False, 0.1, 0.7, 0.78)


def test_combine_wrapper_keeps_autograd_off_cuda():
    """Off CUDA the wrapper runs the reference itself, so gradients reach the routing weights as before."""
    from realb_hf.kernels.combine import weighted_combine

    y = torch.randn(6, 4)
    w = torch.rand(3, 2, requires_grad=True)
    pos = torch.tensor([[0, 5], [3, -1], [1, 2]])
    weighted_combine(y, pos, w).sum().backward()
    assert torch.allclose(w.grad, torch.stack([y[[0, 5]].sum(-1), torch.stack([y[3].sum(), torch.tensor(0.0)]),
                                               y[[1, 2]].sum(-1)]))
    assert torch.equal(weighted_combine(y, pos, w.detach()), weighted_combine_reference(y, pos, w.detach()))


@cuda
def test_kernel_outputs_track_no_gradient_on_cuda():
    """Autograd falls through the operators: a Triton kernel's outputs do not require grad, as when it was
    launched directly (EP's combine checks whether gradients flow before it picks the fused combine)."""
    h = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    act, _ = rows.swiglu_rows(h, quantize=False)
    y, w = torch.randn(8, 64, device="cuda", requires_grad=True), torch.rand(4, 2, device="cuda", requires_grad=True)
    out = torch.ops.realb_kernels.weighted_combine(y, torch.randint(0, 8, (4, 2), device="cuda"), w, None)
    assert not act.requires_grad and not out.requires_grad


@cuda
def test_the_device_path_replays_in_a_cuda_graph():
    """Counts and decision, sort, split gather, SwiGLU and combine captured once, replayed on new routing."""
    tokens, top_k, num_experts = 3000, 2, 8
    rule = PolicyParams(ep_size=2, granularity="expert", modality_threshold=0.5).device_rule()

    def inputs(seed):
        gen = torch.Generator().manual_seed(seed)
        index = torch.randint(0, num_experts, (tokens, top_k), generator=gen)
        index[: tokens // (seed + 2)] %= 4  # rank 0 hot, by a different margin per seed
        modality = (torch.rand(tokens, generator=gen) < 0.8).to(torch.int8)
        hidden = torch.randn(tokens, 256, generator=gen).bfloat16()
        return [t.cuda() for t in (index, modality, hidden, torch.rand(tokens, top_k, generator=gen))]

    def step(index, modality, hidden, weights):
        _, flags = counts.counts_and_flags(index, modality, num_experts, rule, TEXT)
        order = sort.sort_rows(index, flags, hidden, num_experts)
        (high, _), (low, low_scale) = rows.gather_split_rows(hidden, order.rows, order.totals, (False, True))
        act, _ = rows.swiglu_rows(high, order.totals[:1], quantize=False)
        out = torch.ops.realb_kernels.weighted_combine(hidden, index, weights, None)
        return flags, order, high, low, low_scale, act, out

    def real_rows(result):
        """What is defined: padding rows past each group's count are not."""
        flags, order, high, low, low_scale, act, out = result
        n_high, n_low = order.totals.tolist()
        return [flags, *order, high[:n_high], low[:n_low].view(torch.uint8), low_scale[:n_low], act[:n_high], out]

    static = inputs(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: Triton compiles and every cache fills outside the capture
        step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(*static)
    for seed in (1, 2):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(real_rows(captured), real_rows(step(*fresh)), strict=True):
            assert torch.equal(got, want)


@pytest.mark.skipif(not TRACEABLE, reason="needs Triton: operators have a traceable form only where it is installed")
def test_the_traceable_kernels_setting_names_operators_with_a_traceable_form():
    assert traceable_names("") == frozenset()
    assert traceable_names("all") == frozenset(TRACEABLE)
    assert traceable_names(" weighted_combine ,swiglu_rows") == {"weighted_combine", "swiglu_rows"}
    with pytest.raises(ValueError, match=r"REALB_TRACEABLE_KERNELS='sort_rows,weighted_combine' names "
                                         r"\['sort_rows'\].*allowed: 'all' or a comma-separated list of \["):
        traceable_names("sort_rows,weighted_combine")
    with pytest.raises(ValueError, match=r"use_traceable got \['counts'\], which have no traceable form"):
        use_traceable(frozenset({"counts"}))


def test_a_bad_traceable_kernels_setting_fails_at_import():
    env = dict(os.environ, REALB_TRACEABLE_KERNELS="not_an_operator")
    done = subprocess.run([sys.executable, "-c", "import realb_hf"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "REALB_TRACEABLE_KERNELS='not_an_operator' names ['not_an_operator']" in done.stderr


@cuda
def test_compiled_code_calls_the_opaque_operators_unless_told():
    """By default compiled code calls the registered operators; with `use_traceable` it launches the kernels."""
    from torch._inductor.utils import run_and_get_code

    h = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    want = rows.swiglu_rows(h, quantize=True)
    for names, opaque in ((frozenset(), True), (frozenset({"swiglu_rows"}), False)):
        torch.compiler.reset()
        previous = use_traceable(names)
        try:
            got, code = run_and_get_code(torch.compile(lambda h: rows.swiglu_rows(h, quantize=True)), h)
        finally:
            use_traceable(previous)
        assert ("realb_kernels.swiglu_rows.default" in "\n".join(code)) == opaque
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not TRACEABLE, reason="needs Triton: operators have a traceable form only where it is installed")
def test_traceable_forms_apply_on_cuda_only():
    """Turned on, they leave compiled CPU code on the operators (the references), with eager's results."""
    rule = PolicyParams(ep_size=2, granularity="expert", modality_threshold=0.5).device_rule()
    gen = torch.Generator().manual_seed(2)
    top_k_index = torch.randint(0, 9, (300, 2), generator=gen)
    modality = (torch.rand(300, generator=gen) < 0.8).to(torch.int8)
    hidden, weights = torch.randn(300, 32, generator=gen).bfloat16(), torch.randn(8, 12, 32, generator=gen).bfloat16()
    args = (top_k_index, modality, hidden, weights, torch.zeros(8, dtype=torch.bool), rule)
    torch.compiler.reset()
    previous = use_traceable(frozenset(TRACEABLE))
    try:
        explained = torch._dynamo.explain(layer_bookkeeping)(*args)
        compiled = torch.compile(layer_bookkeeping, fullgraph=True, backend="aot_eager")(*args)
    finally:
        use_traceable(previous)
        torch.compiler.reset()
    targets = {str(getattr(n.target, "_name", n.target)) for g in explained.graphs for n in g.graph.nodes}
    assert "realb_kernels::swiglu_rows" in targets and not any(t.endswith("_traceable") for t in targets)
    for got, want in zip(compiled, layer_bookkeeping(*args), strict=True):
        assert torch.equal(got.view(torch.uint8) if got.dtype == rows.FP8_DTYPE else got,
                           want.view(torch.uint8) if want.dtype == rows.FP8_DTYPE else want)
