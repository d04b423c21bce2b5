"""realb_hf.bench on CPU: workloads, trace record/replay, the layer benchmark and the CLI (tiny sizes)."""

import contextlib
import json
import re
import statistics

import pytest
import torch

import realb_hf
from realb_hf.bench.layer import LayerBenchSettings, run_layer_bench
from realb_hf.bench.layer_presets import build_experts, get_preset, rank_module
from realb_hf.bench.rank_inputs import MODALITY_SOURCE, oracle_inputs, rank_inputs, realb_rank_call, routing_stats
from realb_hf.bench.trace import Trace, record_trace, replay_routing
from realb_hf.bench.variants import VARIANTS
from realb_hf.bench.workload import WorkloadSpec, generate, rank_load, workload_for_skew
from realb_hf.experts import DEVICE, HOST, host_path
from realb_hf.policy import RoutingStats, decide, rank_loads
from realb_hf.runtime import RealbRuntime
from realb_hf.tiny import build_tiny_model, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

# ---- workloads -------------------------------------------------------------------------------------


def test_workload_is_deterministic_and_well_formed():
    spec = WorkloadSpec(tokens=1000, num_experts=32, top_k=4, vision_share=0.7, concentration=0.4, seed=3)
    a, b = generate(spec), generate(spec)
    assert torch.equal(a.top_k_index, b.top_k_index) and torch.equal(a.top_k_weights, b.top_k_weights)
    assert torch.equal(a.modality, b.modality)
    assert a.top_k_index.shape == (1000, 4) and a.top_k_index.dtype == torch.int64
    assert a.top_k_weights.shape == (1000, 4) and a.modality.shape == (1000,) and a.modality.dtype == torch.int8
    assert int(a.top_k_index.min()) >= 0 and int(a.top_k_index.max()) < 32
    assert (a.top_k_index.sort(dim=-1).values.diff(dim=-1) > 0).all(), "duplicate expert in a token's top-k"
    assert torch.allclose(a.top_k_weights.sum(-1), torch.ones(1000), atol=1e-5) and (a.top_k_weights > 0).all()
    assert int((a.modality == 1).sum()) == 700 and set(a.modality.unique().tolist()) == {0, 1}
    other = generate(WorkloadSpec(tokens=1000, num_experts=32, top_k=4, concentration=0.4, seed=4))
    assert not torch.equal(a.top_k_index, other.top_k_index)


def test_concentration_raises_skew_and_search_hits_target():
    base = WorkloadSpec(tokens=2048, num_experts=32, top_k=4, vision_share=0.7)
    skews = [
        generate(WorkloadSpec(**{**base.__dict__, "concentration": c})).rank_load(4).max_over_mean
        for c in (0, 0.3, 0.7)
    ]
    assert skews[0] < skews[1] < skews[2] and skews[0] < 1.15
    workload, search = workload_for_skew(base, 1.6, 4)
    assert search.reachable and abs(workload.rank_load(4).max_over_mean - 1.6) < 0.02
    load = workload.rank_load(4)
    assert load.pairs.index(max(load.pairs)) == 0  # the hot block starts at expert 0
    assert load.vision_share[0] > 0.7  # the straggler is vision-dominated
    with pytest.raises(ValueError, match="out of reach"):
        workload_for_skew(base, 3.9, 4)


def test_rank_load_matches_the_policy():
    w = generate(WorkloadSpec(tokens=512, num_experts=16, top_k=4, concentration=0.5))
    stats = RoutingStats(
        tuple(torch.bincount(w.top_k_index.reshape(-1), minlength=16).tolist()),
        tuple(torch.bincount(w.top_k_index[w.modality == 1].reshape(-1), minlength=16).tolist()),
        w.tokens,
    )
    tokens, vision = rank_loads(stats, 4)
    load = rank_load(w.top_k_index, 16, 4, w.modality)
    assert load.pairs == tokens
    assert load.vision_share == pytest.approx([v / t for v, t in zip(vision, tokens)])


# ---- traces ----------------------------------------------------------------------------------------


def test_trace_round_trip_and_replay_are_exact(tmp_path):
    config = tiny_qwen3_vl_moe_config()
    model = realb_hf.apply_realb(build_tiny_model(config), realb_hf.RealbConfig(policy="off"))
    batches = [qwen3_vl_image_batch(batch=2, seed=s, config=config).kwargs for s in (0, 1)]
    path = tmp_path / "t.trace.pt"
    trace = record_trace(model, batches, path)
    assert len(trace.forwards) == 2 and len(trace.layers) == 2
    loaded = Trace.load(path)
    assert loaded.layers == trace.layers and loaded.num_experts == trace.num_experts
    assert loaded.model_type == "qwen3_vl_moe"
    for (i, name, a), (j, name_b, b) in zip(trace, loaded):
        assert (i, name) == (j, name_b)
        assert torch.equal(a.top_k_index, b.top_k_index) and a.top_k_index.dtype == b.top_k_index.dtype
        assert torch.equal(a.top_k_weights, b.top_k_weights) and a.top_k_weights.dtype == b.top_k_weights.dtype
        assert torch.equal(a.modality, b.modality)
        assert torch.equal(b.modality, batches[i]["mm_token_type_ids"].reshape(-1).to(torch.int8))
    assert loaded.forwards[0].input_shape == list(batches[0]["input_ids"].shape)

    with torch.no_grad():
        reference = model(**batches[1]).logits
        with replay_routing(model, path, start=1):
            replayed = model(**batches[1]).logits
        assert torch.equal(replayed, reference)
        tampered = Trace.load(path)
        for r in tampered.forwards[1].routing.values():
            r.top_k_index.copy_(torch.arange(r.top_k_index.shape[1]).expand_as(r.top_k_index))
        with replay_routing(model, tampered, start=1):
            assert not torch.equal(model(**batches[1]).logits, reference)

    w = loaded.workload(0, forward=0)
    assert w.num_experts == 8 and w.tokens == batches[0]["input_ids"].numel()

    from realb_hf.bench.__main__ import main

    assert main(["trace-info", str(path), "--ep", "2", "4"]) == 0


def test_report_skips_the_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    from realb_hf.bench import report

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = {
        "kind": "model",
        "device": "cpu",
        "measures": "m",
        "model": {"preset": "tiny", "layers": 1, "num_experts": 4, "top_k": 2},
        "batch": {"requests": 1, "request_tokens": 8, "tokens": 8, "vision_share": 0.5},
        "routing": {"ep": 2, "description": "d", "mean_max_over_mean": 1.2},
        "variants": {"stock_bf16": {"ms": 1.0, "tokens_per_s": 8000.0, "speedup_vs_stock": 1.0}},
        "env": report.environment("cpu", []),
    }
    paths = report.save(result, tmp_path, "m")
    assert set(paths) == {"json", "markdown"} and not (tmp_path / "m.png").exists()
    assert "skipping the plot" in capsys.readouterr().out


# ---- the layer benchmark ---------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["all_to_all", "all_reduce"])
def test_rank_modules_partition_the_layer_exactly(form):
    """Per-rank modules on per-rank rows, combined, give the full layer's output: the slicing is right."""
    preset = get_preset("tiny")
    full = build_experts(preset, torch.device("cpu"), torch.float32)
    w = generate(WorkloadSpec(tokens=64, num_experts=16, top_k=4, concentration=0.5))
    hidden = torch.randn(64, preset.hidden)
    with torch.no_grad():
        reference = full(hidden, w.top_k_index, w.top_k_weights)
        for ep in (2, 4):
            total = torch.zeros_like(reference)
            for r in range(ep):
                inputs = rank_inputs(w, [hidden], r, ep, form)
                x, ids, weights = inputs.calls[0]
                out = rank_module(full, r * 16 // ep, (r + 1) * 16 // ep, True)(x, ids, weights)
                if form == "all_reduce":
                    total += out
                else:  # combine: weight each pair's output and add it to its token
                    flat = w.top_k_index.reshape(-1)
                    slots = ((flat >= r * 16 // ep) & (flat < (r + 1) * 16 // ep)).nonzero().squeeze(1)
                    slots = slots[torch.sort(flat[slots], stable=True).indices]
                    total.index_add_(0, slots // 4, out * w.top_k_weights.reshape(-1)[slots, None])
                assert inputs.pairs == rank_load(w.top_k_index, 16, ep).pairs[r]
            assert torch.allclose(total, reference, atol=1e-5), (form, ep)
        calls = oracle_inputs(w, [hidden], 4, form)
        assert calls[0][1].shape[0] == 64  # 64 tokens x top-4 / 4 ranks, or all 64 tokens (all_reduce)


@pytest.mark.parametrize("form", ["all_to_all", "all_reduce"])
@pytest.mark.parametrize("device_path", ["never", "always"])
@pytest.mark.parametrize("variant", ["realb_rank_otf", "realb_expert_persistent"])
def test_a_realb_rank_runs_the_global_decision(variant, device_path, form):
    """A rank's call plans from the layer's global routing (as the all-reduce EP does) and runs exactly the globally
    decided precisions on its own experts: bit-equal to the reference executor given those precisions, whether
    the host or the device executor (held bit-equal on CPU) runs it."""
    preset = get_preset("tiny")
    full = build_experts(preset, torch.device("cpu"), torch.bfloat16)
    w, _ = workload_for_skew(WorkloadSpec(tokens=256, num_experts=16, top_k=4), 1.6, 4)
    config = LayerBenchSettings(batch_threshold=0).realb_config(VARIANTS[variant], 4)
    params = RealbRuntime(config=config).params(torch.device("cpu"))
    decision = decide(routing_stats(w), params)
    assert decision.rank_precision[0] in ("fp8", "mixed") and decision.rank_precision[1:] == ("bf16",) * 3
    hidden = torch.randn(256, preset.hidden).to(torch.bfloat16)
    inputs = rank_inputs(w, [hidden], 0, 4, form)
    with torch.no_grad():
        module = rank_module(full, 0, 4, True, config)
        module.realb_device_path = device_path
        plan = module.realb_plan(hidden, w.top_k_index, (w.modality, MODALITY_SOURCE))
        assert plan.executor == (DEVICE if device_path == "always" else HOST)
        if plan.precisions is not None:  # decided on the host: the rank's slice of the global decision
            assert plan.precisions == decision.expert_precision[0:4]
        got = realb_rank_call(module, w)(*inputs.realb_calls()[0])
        reference = rank_module(full, 0, 4, True, config)
        expected = host_path.run(reference, *inputs.calls[0], decision.expert_precision[0:4], params.high)
        stock = rank_module(full, 0, 4, True)(*inputs.calls[0])
    assert torch.equal(got, expected)
    assert not torch.equal(got, stock) and ((got - stock).float().norm() / stock.float().norm()) < 0.1  # fp8


@pytest.mark.parametrize("variant", ["realb_rank_otf", "realb_expert_persistent", "all_low"])
def test_all_reduce_rank_calls_add_up_to_the_one_module_layer(variant):
    """Every rank's call in the all_reduce form, summed (the all-reduce), equals one ReaLB module holding the whole
    layer under virtual EP: each rank plans the layer's decision and runs it on exactly its placed experts."""
    preset = get_preset("tiny")
    full = build_experts(preset, torch.device("cpu"), torch.float32)
    w, _ = workload_for_skew(WorkloadSpec(tokens=256, num_experts=16, top_k=4), 1.6, 4)
    config = LayerBenchSettings(batch_threshold=0).realb_config(VARIANTS[variant], 4)
    hidden = torch.randn(256, preset.hidden)
    with torch.no_grad():
        whole = realb_hf.apply_realb_to_experts(rank_module(full, 0, 16, False), config)
        whole.realb_runtime.modality.codes, whole.realb_runtime.modality.source = w.modality, MODALITY_SOURCE
        reference = whole(hidden, w.top_k_index, w.top_k_weights)
        total = torch.zeros_like(reference)
        for r in range(4):
            inputs = rank_inputs(w, [hidden], r, 4, "all_reduce")
            total += realb_rank_call(rank_module(full, 4 * r, 4 * r + 4, True, config), w)(*inputs.realb_calls()[0])
        stock = full(hidden, w.top_k_index, w.top_k_weights)
    assert torch.allclose(total, reference, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(total, stock, atol=1e-3)  # something ran in low precision


def test_layer_bench_tiny_produces_every_variant():
    workload, _ = workload_for_skew(WorkloadSpec(tokens=256, num_experts=16, top_k=4), 1.6, 4)
    settings = LayerBenchSettings(
        preset="tiny",
        ep_sizes=(1, 4),
        warmup=0,
        repeats=1,
        input_sets=1,
        batch_threshold=0,
        progress=False,
        dtype="float32",  # CPU bf16 grouped_mm is ~10x slower than fp32 at these sizes
    )
    result = run_layer_bench([("skew", workload, {"skew_target": 1.6})], settings)
    json.dumps(result)
    eps = result["workloads"][0]["eps"]
    assert [e["ep"] for e in eps] == [1, 4]
    for e in eps:
        assert set(e["variants"]) == set(settings.variants)
        for name, v in e["variants"].items():
            assert v["layer_ms"] > 0 and v["speedup_vs_stock"] > 0
            if name != "oracle_bf16":
                assert len(v["ranks"]) == e["ep"]
                assert v["layer_ms"] == max(r["ms"] for r in v["ranks"])
                assert sum(r["pairs"] for r in v["ranks"]) == 256 * 4
        assert e["variants"]["stock_bf16"]["speedup_vs_stock"] == 1.0
        assert e["variants"]["all_low"]["lowered_fraction"] == 1.0
        assert e["variants"]["all_low"]["cache_bytes_per_rank"] > 0
    ep1, ep4 = (e["variants"] for e in eps)
    assert ep1["realb_rank_otf"]["lowered_fraction"] == 0.0  # one rank is never overloaded
    assert ep4["realb_rank_otf"]["lowered_fraction"] > 0 and ep4["realb_rank_otf"]["rank_precision"][0] == "fp8"
    assert ep4["realb_rank_otf"]["ranks"][0]["convert_ms"] is not None
    assert ep4["realb_rank_persistent"]["cache_bytes_per_rank"] > 0
    assert 0 < ep4["realb_expert_otf"]["lowered_fraction"] <= ep4["realb_rank_otf"]["lowered_fraction"]
    assert eps[1]["max_over_mean"] == pytest.approx(workload.rank_load(4).max_over_mean)
    assert VARIANTS["oracle_bf16"].kind == "oracle"


def test_cli_layer_writes_json_and_markdown(tmp_path, capsys):
    from realb_hf.bench.__main__ import main

    argv = [
        "layer", "--preset", "tiny", "--tokens", "256", "--skew", "1.3", "--ep", "1", "2",
        "--variants", "stock_bf16", "realb_rank_otf", "oracle_bf16", "--warmup", "0", "--repeats", "1",
        "--input-sets", "1", "--batch-threshold", "0", "--device", "cpu", "--dtype", "float32", "--no-progress",
        "--no-plot", "--out", str(tmp_path),
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "layer-tiny.json").read_text())
    assert data["kind"] == "layer" and data["env"]["argv"] == argv
    for key in ("gpu", "torch", "transformers", "date", "command"):
        assert key in data["env"]
    assert data["workloads"][0]["skew_ep"] == 2
    markdown = (tmp_path / "layer-tiny.md").read_text()
    assert "| EP | max/mean load | mode | variant |" in markdown and "realb_rank_otf" in markdown
    out = capsys.readouterr().out
    assert out.rstrip().endswith(markdown.rstrip().splitlines()[-1])


@pytest.mark.slow
def test_cli_model_tiny(tmp_path):
    """Eager rows of every variant, compiled rows (dynamo with the eager backend here) of stock and the compile
    variant, ratios within each mode, and ReaLB's pipeline with nothing lowered as the lever's reference."""
    from realb_hf.bench.__main__ import main

    argv = [
        "model", "--preset", "tiny", "--requests", "2", "--request-tokens", "96", "--skew", "1.5", "--ep", "4",
        "--variants", "stock_bf16", "realb_nothing_lowered", "realb_rank_otf", "--warmup", "0", "--repeats", "1",
        "--batch-threshold", "0", "--device", "cpu", "--dtype", "float32", "--no-progress", "--out", str(tmp_path),
        "--compile", "--compile-backend", "eager", "--compile-variants", "realb_rank_otf",
    ]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "model-tiny.json").read_text())
    variants = data["variants"]
    compiled = {"stock_bf16 [compiled]", "realb_rank_otf [compiled]"}
    assert set(variants) == {"stock_bf16", "realb_nothing_lowered", "realb_rank_otf", *compiled}
    for name, v in variants.items():
        assert v["compiled"] == (name in compiled) and "error" not in v and v["ms"] > 0
        stock = variants["stock_bf16 [compiled]" if v["compiled"] else "stock_bf16"]
        assert v["speedup_vs_stock"] == pytest.approx(stock["ms"] / v["ms"])
    assert variants["realb_rank_otf"]["lowered_fraction"] > 0
    assert variants["realb_rank_otf [compiled]"]["lowered_fraction"] > 0
    assert variants["realb_nothing_lowered"]["lowered_fraction"] == 0.0
    lever = variants["realb_rank_otf"]["speedup_vs_nothing_lowered"]
    assert lever == pytest.approx(variants["realb_nothing_lowered"]["ms"] / variants["realb_rank_otf"]["ms"])
    assert "| compiled | realb_rank_otf [compiled] |" in (tmp_path / "model-tiny.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--layers", "0"], "layers must be >= 1, got 0"),
        (["--requests", "0"], "requests must be >= 1, got 0"),
        (["--repeats", "0"], "repeats must be >= 1, got 0"),
        (["--warmup", "-1"], "warmup must be >= 0, got -1"),
        (["--vision-share", "2"], r"vision_share must lie in \[0, 1\], got 2.0"),
        (["--skew", "0.5"], "max/mean rank load is >= 1 by definition, got skew 0.5"),
        (["--ep", "1"], "needs ep >= 2 .* give ep >= 2 or a fixed router bias"),
        (["--hot-experts", "0"], "hot_experts must be >= 1, got 0"),
        (["--hot-offset", "-3"], "hot_offset must be >= 0, got -3"),
        (["--hot-offset", "15", "--hot-experts", "4"], r"ids of the model's 16 experts, in \[0, 16\): \[16, 17, 18\] are not"),
    ],
)
def test_model_cli_names_bad_inputs(tmp_path, capsys, flags, message):
    """Refused before anything is timed (a 0-layer model ran on past 120 s, a negative offset wrapped silently)."""
    from realb_hf.bench.__main__ import main

    argv = ["model", "--preset", "tiny", "--layers", "1", "--requests", "1", "--request-tokens", "64", "--device", "cpu"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path), *flags]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "module, flags, message",
    [
        ("hot_rank", ["--tokens", "0", "8"], r"--tokens must all be at least 1, got \[0, 8\]"),
        ("hot_rank", ["--repeats", "0"], "--repeats must be at least 1, got 0"),
        ("generation", ["--ep", "3"], "--ep 3 must divide the model's 128 experts per layer"),
        ("generation", ["--layers", "0"], "--layers must be at least 1, got 0"),
        ("generation", ["--new-tokens", "1"], "--new-tokens must be at least 2"),
        ("decode_overhead", ["--tokens", "0"], r"--tokens must all be at least 1, got \[0\]"),
        ("compiled_overhead", ["--calls", "0"], "--calls must be at least 1, got 0"),
        ("compiled_overhead", ["--compile-backend", "eager", "--mode", "reduce-overhead"], "is an inductor mode"),
        ("rank_profile", ["--tokens", "0"], "--tokens must be at least 1, got 0"),
        ("rank_profile", ["--profiled-calls", "0"], "--profiled-calls must be at least 1, got 0"),
        ("rank_profile", ["--ep", "3"], "--ep must be >= 2 and divide the preset's 128 experts, got 3"),
        ("rank_profile", ["--ranks", "0", "4"], r"--ranks must lie in 0..3 \(EP size 4\), got \[4\]"),
    ],
)
def test_bench_scripts_name_bad_flags(capsys, module, flags, message):
    """Each benchmark script refuses a bad flag before building anything, naming it and what is allowed."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"realb_hf.bench.{module}").main(flags)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def _compiled_pairs(rows: dict, eager_stock: str, compiled_stock: str) -> None:
    """Every compiled row's ratio is against compiled stock, every eager row's against eager stock."""
    for row in rows.values():
        stock = rows[compiled_stock if row["compiled"] else eager_stock]
        assert row["speedup"] == pytest.approx(stock["ms"] / row["ms"])


def test_layer_cli_compiled_and_nothing_lowered_rows(tmp_path, capsys):
    """--compile adds a compiled row (aot_eager here) per compile variant next to its eager row, with ratios taken
    within each mode; realb_nothing_lowered is ReaLB's pipeline lowering nothing, and the lever's own gain is
    measured against it."""
    from realb_hf.bench.__main__ import main

    argv = [
        "layer", "--preset", "tiny", "--tokens", "256", "--skew", "1.6", "--ep", "2",
        "--variants", "realb_nothing_lowered", "realb_rank_persistent", "--warmup", "1", "--repeats", "2",
        "--input-sets", "1", "--batch-threshold", "0", "--device", "cpu", "--dtype", "float32", "--no-progress",
        "--no-plot", "--out", str(tmp_path), "--compile", "--compile-backend", "aot_eager",
        "--compile-variants", "realb_rank_persistent",
    ]  # fmt: skip
    assert main(argv) == 0
    variants = json.loads((tmp_path / "layer-tiny.json").read_text())["workloads"][0]["eps"][0]["variants"]
    compiled = {"stock_bf16 [compiled]", "realb_rank_persistent [compiled]"}
    assert set(variants) == {"stock_bf16", "realb_nothing_lowered", "realb_rank_persistent", *compiled}
    for name, v in variants.items():
        assert v["compiled"] == (name in compiled) and v["mode"] == ("compiled" if name in compiled else "eager")
        assert "error" not in v and v["layer_ms"] == max(r["ms"] for r in v["ranks"]) > 0
        stock = variants["stock_bf16 [compiled]" if v["compiled"] else "stock_bf16"]
        assert v["speedup_vs_stock"] == pytest.approx(stock["layer_ms"] / v["layer_ms"])
        if v["compiled"]:
            assert all(r["compile_s"] > 0 for r in v["ranks"]) and v["compile_s"] > 0
    nothing = variants["realb_nothing_lowered"]
    assert nothing["lowered_fraction"] == 0.0 and nothing["rank_precision"] == ["bf16", "bf16"]
    assert variants["realb_rank_persistent"]["rank_precision"][0] == "fp8"
    lever = variants["realb_rank_persistent"]["speedup_vs_nothing_lowered"]
    assert lever == pytest.approx(nothing["layer_ms"] / variants["realb_rank_persistent"]["layer_ms"])
    assert variants["realb_rank_persistent [compiled]"]["speedup_vs_nothing_lowered"] is None  # not compiled here
    table = capsys.readouterr().out
    assert "| compiled | realb_rank_persistent [compiled] |" in table and "vs ReaLB nothing lowered" in table
    assert main([*argv[:-2], "--compile-mode", "reduce-overhead"]) == 2
    assert "compile modes other than 'default' need the inductor backend, not 'aot_eager'" in capsys.readouterr().err


def test_nothing_lowered_runs_the_realb_pipeline():
    """The nothing-lowered config lowers nothing on a skewed batch and, where the device executor runs, runs it
    (not the stock forward): it is ReaLB's pipeline without the precision lever."""
    from realb_hf.bench.compiled import NOTHING_LOWERED

    preset = get_preset("tiny")
    full = build_experts(preset, torch.device("cpu"), torch.bfloat16)
    w, _ = workload_for_skew(WorkloadSpec(tokens=256, num_experts=16, top_k=4), 1.9, 4)
    variant = VARIANTS["realb_nothing_lowered"]
    assert (variant.policy, variant.imbalance_threshold) == (
        NOTHING_LOWERED["policy"],
        NOTHING_LOWERED["imbalance_threshold"],
    )
    config = LayerBenchSettings(batch_threshold=0).realb_config(variant, 4)
    hidden = torch.randn(256, preset.hidden).to(torch.bfloat16)
    module = rank_module(full, 0, 4, True, config)
    module.realb_device_path = "always"
    with torch.no_grad():
        plan = module.realb_plan(hidden, w.top_k_index, (w.modality, MODALITY_SOURCE))
        assert plan.executor == DEVICE and not bool(plan.low_flags.any())
        dynamic = LayerBenchSettings(batch_threshold=0).realb_config(VARIANTS["realb_rank_otf"], 4)
        params = RealbRuntime(config=dynamic).params(torch.device("cpu"))
        assert decide(routing_stats(w), params).rank_precision[0] == "fp8"  # the same batch is lowered by default


def test_hot_rank_compiled_rows_on_cpu(tmp_path, monkeypatch, capsys):
    from realb_hf.bench import hot_rank

    monkeypatch.setitem(hot_rank.PRESETS, "tiny-test", dict(hidden=64, inter=32, local_experts=4, top_k=2))
    out = tmp_path / "hot.json"
    argv = ["--preset", "tiny-test", "--tokens", "16", "--repeats", "2", "--out", str(out)]
    assert hot_rank.main([*argv, "--compile", "--compile-backend", "aot_eager"]) == 0
    result = json.loads(out.read_text())
    rows = result["results"]
    eager = {r["variant"]: r for r in rows if r["mode"] == "eager"}
    compiled = {r["variant"]: r for r in rows if r["mode"] == "compiled"}
    assert set(compiled) == set(hot_rank.COMPILED_VARIANTS) and set(eager) >= set(compiled)
    assert all(r["compiled"] for r in compiled.values()) and not any(r["compiled"] for r in eager.values())
    assert result["compile_backend"] == "aot_eager"
    for group in (eager, compiled):
        for r in group.values():
            assert "error" not in r and r["ms"] > 0
            assert r["speedup"] == pytest.approx(group[hot_rank.STOCK]["ms"] / r["ms"])
            assert r["vs_nothing_lowered"] == pytest.approx(group[hot_rank.NOTHING_LOWERED_VARIANT]["ms"] / r["ms"])
    for name, r in compiled.items():
        assert r["compile_s"] > 0 and r["graphs"] + r["graph_breaks"] >= 1  # each row counts its own compile
        assert r["rel_err"] == pytest.approx(eager[name]["rel_err"], abs=1e-3)  # compiled computes the same
    assert compiled[hot_rank.STOCK]["graphs"] == 1 and compiled[hot_rank.STOCK]["graph_breaks"] == 0
    assert compiled["realb fp8 persistent (fused kernels)"]["rel_err"] > 0.01  # fp8 really ran compiled
    table = capsys.readouterr().out
    assert "| 16 | compiled | realb fp8 persistent (fused kernels) |" in table
    assert "vs stock (same mode)" in table
    with pytest.raises(SystemExit):
        hot_rank.main([*argv, "--compile", "--compile-backend", "eager", "--compile-mode", "reduce-overhead"])
    some = ["--compile", "--compile-backend", "eager", "--compile-variants", hot_rank.NOTHING_LOWERED_VARIANT]
    assert hot_rank.main([*argv, *some]) == 0
    compiled = [r["variant"] for r in json.loads(out.read_text())["results"] if r["compiled"]]
    assert compiled == [hot_rank.STOCK, hot_rank.NOTHING_LOWERED_VARIANT]  # stock always, first


def test_reset_clears_what_dynamo_counted_so_rows_do_not_inherit_it():
    from realb_hf.bench.compiled import dynamo_counts, reset

    def broken(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(broken, backend="eager")(torch.ones(2))
    torch._dynamo.reset()
    assert dynamo_counts()["graph_breaks"] >= 1 and dynamo_counts()["graphs"] >= 2  # torch's reset keeps them
    reset()
    assert dynamo_counts() == {"graph_breaks": 0, "graphs": 0, "cudagraph_skips": 0}


def test_hot_rank_and_decode_overhead_clis_on_cpu(tmp_path, monkeypatch):
    """Both hot-rank scripts run end to end on tiny sizes and write their JSON; bad counts are refused."""
    from realb_hf import telemetry as telemetry_module
    from realb_hf.bench import decode_overhead, hot_rank

    monkeypatch.setitem(hot_rank.PRESETS, "tiny-test", dict(hidden=64, inter=32, local_experts=4, top_k=2))
    out = tmp_path / "hot.json"
    assert hot_rank.main(["--preset", "tiny-test", "--tokens", "16", "--repeats", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["variant"] for r in rows} >= {"stock bf16 (grouped_mm)", "realb fp8 persistent (fused kernels)"}
    out = tmp_path / "decode.json"
    monkeypatch.setattr(telemetry_module, "MAX_PENDING", 4)  # the sustained run crosses it: records get shipped
    args = ["--preset", "tiny-test", "--tokens", "8", "--blocks", "2", "--repeats", "2", "--sustained", "9"]
    assert decode_overhead.main([*args, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in result] == ["interleaved"] * 5 + ["sustained"] * 5 + ["host only"] * 5
    assert all(len(r["samples_ms"]) == (2 if r["mode"] == "interleaved" else 4) and r["ms"] > 0 for r in result)
    assert [r["vs_stock"] for r in result if r["variant"] == "stock bf16"] == [1.0, 1.0, 1.0]
    for bad in (["--blocks", "0"], ["--tokens", "0"], ["--sustained", "-1"]):
        with pytest.raises(SystemExit):
            decode_overhead.main(["--preset", "tiny-test", *bad])
    with pytest.raises(SystemExit):
        hot_rank.main(["--preset", "tiny-test", "--repeats", "0"])
    # the host-only measurement ran on modules whose stock computation is transformers' registered no-op
    cpu = torch.device("cpu")
    x, index, weights = hot_rank.routing(8, 4, 2, 64, cpu, 0)
    assert hot_rank.build_experts(64, 32, 4, cpu, decode_overhead.NOOP_IMPLEMENTATION)(x, index, weights) is x
    computed = hot_rank.build_experts(64, 32, 4, cpu)(x, index, weights)  # the stock class itself is untouched
    assert computed.shape == x.shape and not torch.equal(computed, x)


# ---- profiling -------------------------------------------------------------------------------------


def _event(name, start, end, device="cpu", self_us=None, annotation=False):
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    return SimpleNamespace(
        name=name,
        time_range=SimpleNamespace(start=start, end=end),
        device_type=DeviceType.CUDA if device == "cuda" else DeviceType.CPU,
        self_cpu_time_total=end - start if self_us is None else self_us,
        is_user_annotation=annotation,
    )


def test_profile_summary_splits_gpu_time_into_compute_communication_and_idle():
    from realb_hf.bench.profiling import CALL_LABEL, summarize

    events = [  # two calls (µs): host windows [0, 1000] and [2000, 2600]; the second call's GPU runs past its host
        _event(CALL_LABEL, 0, 1000),
        _event(CALL_LABEL, 2000, 2600),
        _event(CALL_LABEL, 0, 1000, device="cuda", annotation=True),  # the label's device copy: not work
        _event("realb::dispatch", 100, 400),
        _event("realb::dispatch", 2100, 2200),
        _event("aten::mm", 50, 90, self_us=30),
        _event("cudaDeviceSynchronize", 1200, 1900),  # between the calls: not counted
        _event("gemm", 200, 500, device="cuda"),
        _event("silu", 450, 600, device="cuda"),  # overlaps the GEMM: counted once
        _event("ncclDevKernel_SendRecv", 700, 900, device="cuda"),
        _event("gemm", 2100, 2900, device="cuda"),
    ]
    s = summarize(events, calls=2)
    assert s["wall_ms"] == pytest.approx((1.0 + 0.9) / 2)  # the second window ends with its last kernel
    assert s["gpu_compute_ms"] == pytest.approx((0.4 + 0.8) / 2)
    assert s["gpu_communication_ms"] == pytest.approx(0.2 / 2)
    assert s["gpu_idle_ms"] == pytest.approx(s["wall_ms"] - s["gpu_busy_ms"])
    assert s["gpu_busy_ms"] == pytest.approx((0.6 + 0.8) / 2)
    assert s["sections_host_ms"] == {"realb::dispatch": pytest.approx(0.2)}
    assert s["top_kernels_ms"][0] == ["gemm", pytest.approx(0.55)]
    assert s["top_host_ops_self_ms"] == [["aten::mm", pytest.approx(0.015)]]
    with pytest.raises(ValueError, match="expected 3 'realb_bench::call' ranges in the profile, found 2"):
        summarize(events, calls=3)
    cpu_only = summarize([e for e in events if e.device_type.name == "CPU"], calls=2)
    assert cpu_only["gpu_idle_ms"] is None and cpu_only["gpu_compute_ms"] is None
    # closed ranges (a sync at each end): a kernel the caller launched between them belongs to no call
    between = _event("argmax", 1500, 1600, device="cuda")
    assert summarize([*events, between], calls=2)["gpu_busy_ms"] == pytest.approx((0.6 + 0.1 + 0.8) / 2)
    closed = summarize([*events, between], calls=2, closed=True)
    assert closed["gpu_busy_ms"] == pytest.approx((0.6 + 0.8) / 2)


def test_profile_calls_reads_the_sections_of_a_real_run(tmp_path):
    from realb_hf.bench.profiling import profile_calls
    from realb_hf.ep.groups import section

    def fn():
        with section("decide"):
            torch.ones(64, 64) @ torch.ones(64, 64)

    calls = []
    trace = tmp_path / "trace.json"
    s = profile_calls(fn, calls=2, trace_path=str(trace), before=lambda: calls.append(1))
    assert calls == [1, 1] and s["calls"] == 2 and s["wall_ms"] > 0
    assert "realb::decide" in trace.read_text()
    assert isinstance(section("decide"), contextlib.nullcontext)  # no profiler running: no label, no cost
    assert set(s["sections_host_ms"]) == {"realb::decide"}
    assert any(name == "aten::mm" for name, _ in s["top_host_ops_self_ms"])


def test_compiled_overhead_bench_times_every_variant_and_counts_records_on_cpu(tmp_path, capsys):
    """Compiled forwards of stock and ReaLB (telemetry off and on), timed in alternating blocks: ratios against stock,
    and the telemetry-on model recorded every compiled forward's layers (the device log), the off one nothing."""
    from realb_hf.bench import compiled_overhead

    out = tmp_path / "overhead.json"
    argv = ["--layers", "1", "--requests", "2", "--blocks", "2", "--calls", "3", "--compile-backend", "aot_eager"]
    assert compiled_overhead.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["results"]}
    assert set(rows) == set(compiled_overhead.VARIANTS)
    stock = rows["stock"]
    for r in rows.values():
        assert len(r["samples_ms"]) == 2 and r["ms"] == pytest.approx(statistics.median(r["samples_ms"]))
        assert r["vs_stock"] == pytest.approx(stock["ms"] / r["ms"])
    forwards = 6 + 2 * 3  # warm-up calls, then two blocks of three
    assert rows["realb default config, telemetry on"]["records"] == forwards  # one MoE layer
    assert rows["realb default config, telemetry off"]["records"] == 0 and stock["records"] is None
    assert "| realb default config, telemetry on |" in capsys.readouterr().out


def test_generate_bench_decomposes_decode_steps_on_cpu(tmp_path, capsys):
    """Both caches, stock and ReaLB: every run generates exactly the asked tokens, a decode step is the difference
    of the full and the first-token run over the steps between, and ratios and extras are against stock."""
    from realb_hf.bench import generation

    out = tmp_path / "gen.json"
    argv = ["--preset", "tiny", "--layers", "1", "--requests", "2", "--prompt-tokens", "6", "--new-tokens", "3"]
    assert generation.main([*argv, "--repeats", "1", "--variants", "realb default config", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["variant"], r["cache"]): r for r in result["results"]}
    assert set(rows) == {(v, c) for v in ("stock", "realb default config") for c in ("static", "dynamic")}
    for (_, cache), r in rows.items():
        assert r["generated_tokens"] == 3 and r["full_ms"] > 0 and r["first_token_ms"] > 0
        assert r["decode_step_ms"] == pytest.approx((r["full_ms"] - r["first_token_ms"]) / 2)
        assert r["decode_compiled"] == (r["graphs"] > 0)
        stock = rows["stock", cache]
        # CPU timings are noise: a step may come out negative, and then there is no ratio
        if stock["decode_step_ms"] > 0 and r["decode_step_ms"] > 0:
            assert r["vs_stock"] == pytest.approx(stock["decode_step_ms"] / r["decode_step_ms"])
        else:
            assert r["vs_stock"] is None
        assert r["extra_decode_step_ms"] == pytest.approx(r["decode_step_ms"] - stock["decode_step_ms"])
        assert r["gpu_busy_step_ms"] is None and r["host_step_ms"] is None  # CPU: no GPU time to split off
    assert "| static | realb default config |" in capsys.readouterr().out
    for r in rows.values():  # transformers compiles no decode step on a CPU: nothing to time alone
        assert r["decode_compiled"] is False and r["step_alone_wall_ms"] is None and r["step_alone_extra_share"] is None
    for bad in (["--new-tokens", "1"], ["--requests", "0"]):
        with pytest.raises(SystemExit):
            generation.main(["--preset", "tiny", *bad])
    # the eager backend compiles the decode step on a CPU: each step is also timed alone
    assert generation.main([*argv, "--caches", "static", "--compile-backend", "eager", "--repeats", "2",
                            "--out", str(out)]) == 0  # fmt: skip
    rows = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    for r in rows.values():
        assert r["decode_compiled"] and r["step_alone_wall_ms"] > 0
        assert r["step_alone_gpu_ms"] is None and r["step_alone_host_ms"] is None  # CPU: no GPU time to split off
    stock, realb = rows["stock"], rows["realb default config"]
    assert realb["extra_step_alone_wall_ms"] == pytest.approx(realb["step_alone_wall_ms"] - stock["step_alone_wall_ms"])
    if stock["decode_step_ms"] > 0:  # CPU noise can make it negative: then there is no share
        share = realb["extra_step_alone_wall_ms"] / stock["decode_step_ms"]
        assert realb["step_alone_extra_share"] == pytest.approx(share)
    else:
        assert realb["step_alone_extra_share"] is None
    stop = generation.StopAfter(4)
    assert stop(torch.zeros(2, 3, dtype=torch.long), None).tolist() == [False, False]
    assert stop(torch.zeros(2, 4, dtype=torch.long), None).tolist() == [True, True]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_rank_profile_refuses_cuda_graphs_without_cuda(capsys):
    from realb_hf.bench.rank_profile import main

    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--tokens", "64", "--modes", "reduce-overhead"])
    assert "mode reduce-overhead records CUDA graphs: it needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variants=("stock_bf16", "oracle_bf16")), r"--variants must be among .*, got \['oracle_bf16'\]"),
        (dict(modes=("eager", "fast")), r"--modes must be among .*, got \['fast'\]"),
    ],
)
def test_rank_profile_run_names_a_bad_variant_or_mode(kwargs, message):
    from realb_hf.bench.rank_profile import run

    with pytest.raises(ValueError, match=message):
        run(preset="tiny", tokens=64, skew=1.3, device=torch.device("cpu"), **kwargs)


def test_rank_profile_measures_every_rank_variant_and_mode_on_cpu(tmp_path, capsys):
    """Each (rank, variant, mode) gets a row with its rank's pairs, its times and, compiled, dynamo's counts."""
    from realb_hf.bench.rank_profile import main

    out = tmp_path / "ranks.json"
    argv = ["--preset", "tiny", "--tokens", "256", "--skew", "1.3", "--ranks", "0", "2", "--repeats", "2"]
    argv += ["--profiled-calls", "1", "--variants", "stock_bf16", "realb_rank_persistent", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    keys = [(r["rank"], r["variant"], r["mode"]) for r in rows]
    variants, modes = ("stock_bf16", "realb_rank_persistent"), ("eager", "default")
    assert keys == [(k, v, m) for k in (0, 2) for v in variants for m in modes]
    for row in rows:
        assert row["pairs"] == result["rank_pairs"][row["rank"]]
        assert row["event_ms"] > 0 and row["synced_wall_ms"] >= row["issue_ms"] > 0
        assert ("graph_breaks" in row) == (row["mode"] == "default")
    assert result["rank_pairs"][0] > result["rank_pairs"][2]  # rank 0 is the hot one
    assert "| bound by |" in capsys.readouterr().out and result["command"].endswith(" ".join(argv))
