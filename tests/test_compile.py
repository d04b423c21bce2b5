"""torch.compile, torch.export and CUDA graphs on ReaLB models and layers.

CPU (CI): transformers' compile checks of `GenerationTesterMixin` on converted models, compiled and exported
forwards equal to eager, no graph break on the config-only and device paths, no recompile across batches.
CUDA: the same with the real kernels, capture and replay of a device-path layer, `mode="reduce-overhead"`.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from layer_fixtures import build_experts, realb_copy
from transformers import CompileConfig

from realb_hf import RealbConfig, apply_realb, get_runtime, get_telemetry
from realb_hf.quantizer import realb_modules
from realb_hf.tiny import TINY_FAMILIES, build_tiny_model, text_batch, tiny_mixtral_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test compiles from scratch: traces of earlier tests' models share code objects with this one's and
    count toward dynamo's recompile limit."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


# configs whose layer runs on the device path on CUDA (fp8) or from the config alone: no graph break expected
DEVICE_CONFIGS = {
    "off": dict(policy="off"),
    "realb-rank": dict(policy="realb", ep_size=4, batch_threshold=1, modality_threshold=0.0),
    "realb-expert": dict(policy="realb", ep_size=4, batch_threshold=1, modality_threshold=0.0, granularity="expert"),
    "realb-on-the-fly": dict(policy="realb", ep_size=4, batch_threshold=1, modality_threshold=0.0,
                             weight_cache="on_the_fly"),
    "static": dict(policy="static", ep_size=4, rank_precisions={0: "low"}),
    "all-low": dict(policy="all_low"),
}  # fmt: skip
# emulated fp4 runs the host path: graph breaks allowed, results equal
HOST_CONFIGS = {
    "nvfp4": dict(policy="realb", ep_size=4, batch_threshold=1, modality_threshold=0.0, low_precision="nvfp4"),
    "mxfp4-expert": dict(policy="realb", ep_size=4, batch_threshold=1, modality_threshold=0.0,
                         low_precision="mxfp4", granularity="expert"),
}  # fmt: skip


def _skewed(tokens: int, num_experts: int, hidden: int, device: str, seed: int):
    """Routing with rank 0 (of 4) hot by a margin that changes with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    index = torch.rand(tokens, num_experts, generator=gen).topk(2, dim=-1).indices
    hot = tokens // (seed + 2)
    index[:hot] = torch.stack([torch.arange(hot) % 2, 2 + torch.arange(hot) % 2], -1)  # experts 0-3: rank 0
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), -1).bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    return x.to(device), index.to(device), weights.to(device)


def _layer(device: str, **config) -> torch.nn.Module:
    layer = realb_copy(build_experts(64, 32, 16, device), **config)
    layer.realb_device_path = "always"  # the CPU runs the device path's reference ops
    return layer


def _compiled_layer_checks(device: str, config: dict, fullgraph: bool, backend: str) -> None:
    """Compiled calls decide exactly as eager ones and give the same output: bit for bit without inductor; with
    it, within bf16 rounding (inductor fuses the stock forward's elementwise ops, stock's own compiled output
    differs from eager by as much)."""
    layer = _layer(device, **config)
    compiled = torch.compile(layer, fullgraph=fullgraph, backend=backend)
    exact = backend != "inductor"
    with torch.no_grad():
        for seed in range(3):
            inputs = _skewed(512, 16, 64, device, seed)
            want = layer(*inputs)
            if seed:  # one trace serves every batch of this shape, whatever the routing decides
                with torch.compiler.set_stance("fail_on_recompile"):
                    got = compiled(*inputs)
            else:
                got = compiled(*inputs)
            torch.testing.assert_close(got, want, rtol=0 if exact else 2e-2, atol=0 if exact else 4e-2)
    records = layer.realb_runtime.telemetry.records
    assert len(records) == 6  # compiled calls recorded like eager ones
    for eager, compiled_call in zip(records[0::2], records[1::2], strict=True):
        assert (eager.precision_per_rank, eager.tokens_per_rank) == (
            compiled_call.precision_per_rank, compiled_call.tokens_per_rank,
        )  # fmt: skip
    if config.get("policy") == "realb":
        assert any(r.lowered_experts for r in records[1::2])  # the compiled calls really lowered


@pytest.mark.parametrize("name", sorted(DEVICE_CONFIGS))
def test_compiled_layer_equals_eager_without_graph_break(name):
    _compiled_layer_checks("cpu", DEVICE_CONFIGS[name], fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("name", sorted(HOST_CONFIGS))
def test_compiled_host_path_equals_eager(name):
    layer = _layer("cpu", **HOST_CONFIGS[name])
    compiled = torch.compile(layer, backend="aot_eager")
    with torch.no_grad():
        inputs = _skewed(512, 16, 64, "cpu", 0)
        torch.testing.assert_close(compiled(*inputs), layer(*inputs), rtol=0, atol=0)
    assert layer.realb_runtime.telemetry.records[-1].lowered_experts


def test_explain_counts_no_graph_break_in_a_device_path_layer():
    layer = _layer("cpu", **DEVICE_CONFIGS["realb-rank"])
    with torch.no_grad():
        explained = torch._dynamo.explain(layer)(*_skewed(512, 16, 64, "cpu", 0))
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    targets = {str(getattr(n.target, "_name", n.target)) for g in explained.graphs for n in g.graph.nodes}
    assert {"realb_kernels::counts_and_flags", "realb_telemetry::receive"} <= targets


def _mixtral(policy: str = "off", **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_model(tiny_mixtral_config(), dtype=torch.float32).eval()
    return apply_realb(model, RealbConfig(policy=policy, **config))


def _device_path_mixtral(policy: str = "off", **config) -> torch.nn.Module:
    """`_mixtral` in bf16 with every layer on the device path (the CPU runs its reference ops)."""
    model = _mixtral(policy, **config).to(torch.bfloat16)
    for module in realb_modules(model):
        module.realb_device_path = "always"
    return model


def _compile_config() -> CompileConfig:
    config = CompileConfig()
    config._compile_all_devices = True  # transformers compiles only on accelerators unless told
    return config


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_transformers_generate_compile_checks(name):
    """The checks of transformers' `test_generate_compile_model_forward_fullgraph`,
    `test_generate_compilation_all_outputs` and `test_static_cache_no_recompile_with_smaller_length` on a converted
    model (default config): generate compiles its decode step (fullgraph), every output comes back, the tokens equal
    eager generation, and a shorter generation reuses the compiled step."""
    family = TINY_FAMILIES[name]
    model = apply_realb(family.build(dtype=torch.float32).eval(), RealbConfig())
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
    common = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4)
    eager = model.generate(prompt, **common)

    static = dict(common, cache_implementation="static", compile_config=_compile_config())
    out = model.generate(
        prompt, **static, return_dict_in_generate=True, output_scores=True, output_logits=True,
        output_hidden_states=True,
    )  # fmt: skip
    assert hasattr(model, "_compiled_call")  # generate compiled the decode step (CompileConfig: fullgraph=True)
    assert torch.equal(out.sequences, eager)
    assert len(out.scores) == len(out.logits) == len(out.hidden_states) == 4
    forwards = get_telemetry(model).forwards
    with torch.compiler.set_stance("fail_on_recompile"):  # a shorter generation reuses the compiled step
        shorter = model.generate(
            prompt, **dict(static, max_new_tokens=2, min_new_tokens=2), return_dict_in_generate=True,
            output_scores=True, output_logits=True, output_hidden_states=True,
        )  # fmt: skip
    assert torch.equal(shorter.sequences, eager[:, : prompt.shape[1] + 2])
    assert get_telemetry(model).forwards == forwards + 2  # compiled decode steps count as forwards


def test_generate_compiles_the_decode_step_as_one_frame_like_stock():
    """transformers compiles `model.__call__`, whose nn.Module call machinery dynamo skips, so model hooks would
    each be a frame (and under reduce-overhead a CUDA graph) of their own around the forward. ReaLB wraps the
    forward instead: a converted model's decode step is one frame with one graph, as stock's is."""
    from torch._dynamo.utils import counters

    family = TINY_FAMILIES["qwen3_vl_moe"]
    prompt = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    seen = {}
    for name in ("stock", "realb"):
        model = family.build(dtype=torch.float32).eval()
        if name == "realb":
            apply_realb(model, RealbConfig())
        torch._dynamo.reset()
        counters.clear()
        model.generate(
            prompt, do_sample=False, max_new_tokens=3, min_new_tokens=3, cache_implementation="static",
            compile_config=_compile_config(),
        )  # fmt: skip
        seen[name] = (counters["frames"]["total"], counters["stats"]["unique_graphs"])
    assert seen["realb"] == seen["stock"] == (1, 1)


def test_detaching_gives_the_model_its_forward_back_and_refuses_over_a_later_wrapper():
    model = _mixtral()
    tracker = get_runtime(model).modality
    assert "forward" in vars(model)  # ReaLB's wrapper, on the instance
    tracker.detach()
    assert "forward" not in vars(model)
    runtime = get_runtime(model)
    tracker.attach(model, runtime.begin_forward, runtime.end_forward)
    model.forward = functools.partial(model.forward)  # another library wraps on top (as accelerate's hooks do)
    with pytest.raises(RuntimeError, match="wrapped again after ReaLB's modality tracking"):
        tracker.detach()


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_fullgraph_forward_of_every_family(name):
    """Every supported family converts to a model whose text forward compiles without a graph break and equals
    eager (the vision towers of stock transformers read sizes on the host, so image batches break graphs there)."""
    family = TINY_FAMILIES[name]
    model = apply_realb(family.build(dtype=torch.float32).eval(), RealbConfig())
    batch = text_batch(seed=0)
    with torch.no_grad():
        want = model(**batch.kwargs).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch.kwargs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert get_telemetry(model).forwards == 2


# Dim.DYNAMIC, not a named Dim: torch 2.11 cannot prove a guard that a named Dim turns into an error
# (min(16*seq, 32*seq) == 16*seq, from a contiguity check), and so refuses the stock Mixtral as well
_TOKENS_DYNAMIC = {
    "input_ids": {0: torch.export.Dim.DYNAMIC(max=16), 1: torch.export.Dim.DYNAMIC(min=2, max=256)},
    "use_cache": None,
}


@pytest.mark.parametrize("policy", ["off", "realb"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_export_static_and_dynamic_shapes(policy, dynamic):
    """policy="off", and the dynamic policy on the device path (its decision is device tensor ops)."""
    config = dict(ep_size=4, batch_threshold=4) if policy == "realb" else {}
    model = _device_path_mixtral(policy, **config)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (2, 8))
    shapes = _TOKENS_DYNAMIC if dynamic else None
    with torch.no_grad():
        exported = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, dynamic_shapes=shapes)
        fresh = torch.randint(3, vocab, (3, 12) if dynamic else (2, 8))
        before = len(get_telemetry(model).records)
        got = exported.module()(input_ids=fresh, use_cache=False).logits
        assert len(get_telemetry(model).records) == before + 2  # the exported program hands telemetry its counts
        want = model(input_ids=fresh, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compiled_host_path_breaks_the_graph_cleanly():
    """The host decision reads counts back: compiled code runs it eagerly (a graph break), never a trace error."""
    model = _mixtral("realb", ep_size=4, batch_threshold=4)  # float32: the host path
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        want = model(ids).logits
        explained = torch._dynamo.explain(model)(ids)
        got = torch.compile(model, backend="aot_eager")(ids).logits
    assert explained.graph_break_count > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_exporting_is_true_under_torch_export_only():
    """`tracing.exporting` in eager code, under torch.compile and under torch.export. torch 2.11's dynamo folds
    `torch.compiler.is_exporting()` to True inside torch.compile (a compiled host decision then raised the export
    error), which is why ReaLB does not ask that function: on such a torch it fails this test."""
    from realb_hf.tracing import exporting

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(exporting())
            return x + 1

    x = torch.ones(2)
    Probe()(x)
    torch.compile(Probe(), fullgraph=True, backend="eager")(x)
    torch.export.export(Probe(), (x,))
    assert seen == [False, False, True]


@pytest.mark.parametrize("name", sorted(DEVICE_CONFIGS))
def test_a_model_compiled_before_any_eager_forward_compiles_once(name):
    """The first compiled call fills no cache that a guard reads: settings, policy parameters, config decisions and
    constant flags are made afresh while tracing, so the calls after it never recompile."""
    model = _device_path_mixtral(**DEVICE_CONFIGS[name])
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, model.config.vocab_size, (2, 8), generator=gen) for _ in range(3)]
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        compiled(batches[0])
        with torch.compiler.set_stance("fail_on_recompile"):
            for ids in batches[1:]:
                compiled(ids)


def test_the_low_precision_is_resolved_outside_the_trace(monkeypatch):
    """"auto" asks the device's capability and installed packages; traced code gets the answer as a constant, so a
    query dynamo cannot trace (`importlib.util.find_spec` on torch 2.11) does not break a fullgraph compile."""
    import importlib.util

    from realb_hf import runtime

    asked = []

    def resolve(name, device):
        asked.append(name)
        return "fp8" if importlib.util.find_spec("torch") is not None else "nvfp4"

    monkeypatch.setattr(runtime, "resolve_low_precision", resolve)
    model = _device_path_mixtral("realb", ep_size=4, batch_threshold=4)
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        want = model(ids).logits
        asked.clear()
        got = torch.compile(model, fullgraph=True, backend="eager")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert asked and set(asked) == {"auto"}


def test_compiled_model_forward_records_like_eager():
    model = _device_path_mixtral("realb", ep_size=4, batch_threshold=4)
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    with torch.no_grad():
        want = model(ids).logits
        eager_records = get_telemetry(model).records
        get_telemetry(model).reset()
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    compiled_records = get_telemetry(model).records
    assert [r.precision_per_rank for r in compiled_records] == [r.precision_per_rank for r in eager_records]
    assert get_telemetry(model).forwards == 1


# ---- CUDA -----------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("name", sorted(DEVICE_CONFIGS))
def test_compiled_layer_on_cuda(name):
    """Inductor, the real kernels: equal to eager, no graph break, no recompile across routings."""
    config = dict(DEVICE_CONFIGS[name])
    _compiled_layer_checks("cuda", config, fullgraph=True, backend="inductor")


@cuda
@pytest.mark.parametrize("weight_cache", ["persistent", "on_the_fly"])
def test_inductor_launches_the_row_and_combine_kernels_itself(weight_cache):
    """With their traceable forms turned on (experimental), the row and combine operators' Triton kernels are
    launched by inductor's generated code, with no call into those operators' Python, and the layer equals eager."""
    from torch._inductor.utils import run_and_get_code

    from realb_hf.kernels.library import TRACEABLE, use_traceable

    layer = _layer("cuda", **dict(DEVICE_CONFIGS["realb-rank"], weight_cache=weight_cache))
    previous = use_traceable(frozenset(TRACEABLE))
    try:
        with torch.no_grad():
            inputs = _skewed(512, 16, 64, "cuda", 0)
            want = layer(*inputs)
            got, code = run_and_get_code(torch.compile(layer, fullgraph=True), *inputs)
    finally:
        use_traceable(previous)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=4e-2)
    source = "\n".join(code)
    launched = {"_split_rows_kernel", "_swiglu_kernel", "_combine_kernel"}
    if weight_cache == "on_the_fly":
        launched.add("_rows_kernel")  # the weights' conversion
    assert {k for k in launched if re.search(rf"(?<!\w){k}", source)} == launched
    opaque = [f"realb_kernels.{name}.default" for name in ("gather_quant_rows", "gather_split_rows", "swiglu_rows",
                                                            "weighted_combine")]
    assert not [name for name in opaque if name in source]
    assert layer.realb_runtime.telemetry.records[-1].lowered_experts


@cuda
@pytest.mark.parametrize("name", sorted(HOST_CONFIGS))
def test_compiled_emulated_fp4_on_cuda(name):
    layer = _layer("cuda", **HOST_CONFIGS[name])
    compiled = torch.compile(layer)
    with torch.no_grad():
        inputs = _skewed(512, 16, 64, "cuda", 0)
        torch.testing.assert_close(compiled(*inputs), layer(*inputs), rtol=2e-2, atol=4e-2)


@cuda
@pytest.mark.parametrize("weight_cache", ["persistent", "on_the_fly"])
def test_device_path_layer_replays_in_a_cuda_graph(weight_cache):
    """One capture stays right for every routing of the same size: the decision is made inside the graph."""
    layer = _layer("cuda", **dict(DEVICE_CONFIGS["realb-rank"], weight_cache=weight_cache))
    layer.realb_runtime.telemetry.enabled = False  # a replay runs kernels only: telemetry's Python would not run
    static = list(_skewed(2048, 16, 64, "cuda", 0))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm-up outside the capture: Triton compiles, caches fill
            layer(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layer(*static)
        for seed in (1, 2, 3):
            fresh = _skewed(2048, 16, 64, "cuda", seed)
            for dst, src in zip(static, fresh, strict=True):
                dst.copy_(src)
            graph.replay()
            torch.testing.assert_close(captured, layer(*fresh), rtol=0, atol=0)
    layer.realb_runtime.telemetry.enabled = True
    with torch.no_grad():
        layer(*fresh)
    assert layer.realb_runtime.telemetry.records[-1].lowered_experts  # these routings do lower rank 0


@cuda
def test_reduce_overhead_prefill_on_cuda():
    """mode="reduce-overhead" captures a fixed-shape prefill (telemetry off) and matches eager."""
    from torch._dynamo.utils import counters

    family = TINY_FAMILIES["qwen3_vl_moe"]
    model = apply_realb(family.build().cuda().eval(), RealbConfig(ep_size=4, batch_threshold=1))
    get_telemetry(model).enabled = False
    batches = [family.batch(model.config, seed=s) for s in (0, 1)]
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for batch in batches + batches:
            inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.kwargs.items()}
            want = model(**inputs).logits
            got = compiled(**inputs).logits.clone()
            torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)  # bf16 logits; inductor fuses differently
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@cuda
def test_compiled_model_prefill_and_decode_on_cuda():
    """A multimodal model, default config: compiled prefill with images and a compiled static-cache decode."""
    family = TINY_FAMILIES["qwen3_vl_moe"]
    model = apply_realb(family.build().cuda().eval(), RealbConfig(ep_size=4, batch_threshold=1))
    batch = family.batch(model.config, seed=0)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.kwargs.items()}
    with torch.no_grad():
        want = model(**inputs).logits
        got = torch.compile(model)(**inputs).logits
    torch.testing.assert_close(got, want, rtol=5e-2, atol=5e-2)  # bf16 logits; inductor fuses differently
    ids = inputs["input_ids"][:, :8]
    eager = model.generate(ids, do_sample=False, max_new_tokens=4, min_new_tokens=4)
    static = model.generate(
        ids, do_sample=False, max_new_tokens=4, min_new_tokens=4, cache_implementation="static",
        compile_config=_compile_config(),
    )  # fmt: skip
    assert hasattr(model, "_compiled_call") and torch.equal(eager, static)
    assert get_runtime(model).telemetry.forwards > 0


def test_export_serves_batches_on_both_sides_of_the_batch_threshold():
    """One exported program, dynamic token count: the threshold is a device op, so a batch above it lowers and a
    batch below it does not, each equal to eager."""
    model = _device_path_mixtral("realb", ep_size=4, batch_threshold=64, modality_threshold=0.0)
    vocab = model.config.vocab_size
    with torch.no_grad():
        ids = torch.randint(3, vocab, (2, 8))
        inputs = {"input_ids": ids, "use_cache": False}
        exported = torch.export.export(model, (), inputs, dynamic_shapes=_TOKENS_DYNAMIC)
        telemetry = get_telemetry(model)
        for shape, lowers in (((3, 40), True), ((2, 10), False)):
            ids = torch.randint(3, vocab, shape)
            telemetry.reset()
            got = exported.module()(input_ids=ids, use_cache=False).logits
            records = telemetry.records
            want = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert any(r.lowered_experts for r in records) == lowers
            assert {r.reason for r in records} <= (
                {"lowered", "no_eligible_rank"} if lowers else {"below_batch_threshold"}
            )


def test_export_refuses_a_host_decision_and_says_why():
    model = _mixtral("realb", ep_size=4, batch_threshold=4)  # float32 on CPU: the host path decides
    with pytest.raises(RuntimeError, match="torch.export cannot trace ReaLB's dynamic policy here"):
        torch.export.export(model, (), {"input_ids": torch.randint(3, 100, (2, 8)), "use_cache": False})


def test_a_copied_layer_records_into_its_own_telemetry():
    """Compiled code names a runtime by a handle: a deep copy gets its own, so its records stay its own."""
    import copy

    layer = _layer("cpu", **DEVICE_CONFIGS["realb-rank"])
    twin = copy.deepcopy(layer)
    assert twin.realb_runtime.handle != layer.realb_runtime.handle
    with torch.no_grad():
        torch.compile(twin, fullgraph=True, backend="aot_eager")(*_skewed(512, 16, 64, "cpu", 0))
    assert len(twin.realb_runtime.telemetry.records) == 1 and not layer.realb_runtime.telemetry.records
