"""RealbExperts on a tiny Qwen3-VL-MoE: exactness of the bf16 path, the mixed path, edge cases."""

from dataclasses import replace

import pytest
import torch
from conftest import load_qwen

import realb_hf
from realb_hf import formats as formats_mod
from realb_hf.formats import Bf16Format
from realb_hf.runtime import model_telemetry


def logits(model, batch):
    with torch.no_grad():
        return model(**batch.kwargs).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def experts_of(model):
    return [m for m in model.modules() if isinstance(m, realb_hf.RealbExperts)]


@pytest.fixture(scope="module")
def stock_logits(qwen_dir, qwen_batch):
    return logits(load_qwen(qwen_dir), qwen_batch)


def test_bf16_path_equals_stock_exactly(qwen_dir, qwen_batch, stock_logits):
    for kwargs in (dict(policy="off", ep_size=4), dict(ep_size=4), dict(policy="static", rank_precisions={0: "high"})):
        model = load_qwen(qwen_dir, **kwargs)
        assert len(experts_of(model)) == 2
        assert torch.equal(logits(model, qwen_batch), stock_logits), kwargs


def test_mixed_path_groups_and_unpermutes_rows_correctly(qwen_dir, qwen_batch, stock_logits, monkeypatch):
    """With the "low" format swapped for bf16 the mixed path must reproduce the stock result."""
    monkeypatch.setitem(formats_mod.FORMATS, "fp8", Bf16Format())
    for kwargs in (
        dict(policy="static", ep_size=4, rank_precisions={1: "low", 3: "low"}, low_precision="fp8"),
        dict(policy="all_low", low_precision="fp8"),
        dict(policy="realb", ep_size=4, batch_threshold=0, modality_threshold=0.0, granularity="expert", low_precision="fp8"),
    ):
        model = load_qwen(qwen_dir, **kwargs)
        out = logits(model, qwen_batch)
        assert any(r.lowered_experts for r in realb_hf.get_telemetry(model).records), kwargs
        assert rel(out, stock_logits) < 2e-3, kwargs


@pytest.mark.parametrize("fmt, bound", [("fp8", 0.03), ("nvfp4", 0.06), ("mxfp4", 0.06)])
def test_low_precision_error_is_bounded(qwen_dir, qwen_batch, stock_logits, fmt, bound):
    model = load_qwen(qwen_dir, policy="all_low", low_precision=fmt)
    err = rel(logits(model, qwen_batch), stock_logits)
    assert 0 < err < bound


def test_rank_precisions_differ_per_virtual_rank(qwen_dir, qwen_batch):
    model = load_qwen(qwen_dir, policy="static", ep_size=4, rank_precisions={0: "low", 2: "nvfp4"}, low_precision="fp8")
    logits(model, qwen_batch)
    for record in realb_hf.get_telemetry(model).records:
        assert record.precision_per_rank == ["fp8", "bf16", "nvfp4", "bf16"]
        assert len(record.tokens_per_rank) == 4


def _layer_inputs(module, tokens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, module.gate_up_proj.shape[-1], generator=gen).to(torch.bfloat16)
    weights = torch.softmax(torch.randn(tokens, 2, generator=gen), dim=-1).to(torch.bfloat16)
    return hidden, weights


@pytest.fixture(scope="module")
def low_model(qwen_dir):
    return load_qwen(qwen_dir, policy="all_low", low_precision="fp8")


@pytest.fixture(scope="module")
def off_model(qwen_dir):
    return load_qwen(qwen_dir, policy="off")


def test_empty_batch(low_model):
    module = experts_of(low_model)[0]
    hidden, weights = _layer_inputs(module, 0)
    out = module(hidden, torch.zeros(0, 2, dtype=torch.long), weights)
    assert out.shape == (0, hidden.shape[-1])


def test_experts_with_zero_tokens_and_all_tokens_on_one_expert(low_model, off_model):
    low, ref = experts_of(low_model)[0], experts_of(off_model)[0]
    hidden, weights = _layer_inputs(low, 64)
    for index in (
        torch.tensor([[3, 5]] * 64),  # every other expert idle
        torch.tensor([[7, 7]] * 64),  # both slots on one expert
    ):
        out, expected = low(hidden, index, weights), ref(hidden, index, weights)
        assert out.shape == expected.shape
        assert 0 < rel(out.float(), expected.float()) < 0.08


def test_non_finite_rows_match_what_bf16_gives(low_model, off_model):
    low, ref = experts_of(low_model)[0], experts_of(off_model)[0]
    hidden, weights = _layer_inputs(low, 32)
    hidden[3] = float("inf")
    hidden[7, 5] = float("nan")
    index = torch.randint(0, 8, (32, 2), generator=torch.Generator().manual_seed(1))
    out, expected = low(hidden, index, weights), ref(hidden, index, weights)
    bad = torch.tensor([3, 7])
    assert torch.equal(out[bad].isnan(), expected[bad].isnan())
    assert torch.equal(out[bad].isinf(), expected[bad].isinf())
    good = torch.ones(32, dtype=torch.bool)
    good[bad] = False
    assert torch.isfinite(out[good]).all()
    assert rel(out[good].float(), expected[good].float()) < 0.08


def test_sentinel_ids_from_other_ranks_contribute_nothing(low_model, off_model):
    low, ref = experts_of(low_model)[0], experts_of(off_model)[0]
    hidden, weights = _layer_inputs(low, 16)
    index = torch.tensor([[1, 8]] * 8 + [[9, 2]] * 8)  # 8 and 9 are other ranks' experts under EP
    low._is_expert_parallel = ref._is_expert_parallel = True
    try:
        out, expected = low(hidden, index, weights), ref(hidden, index, weights)
    finally:
        low._is_expert_parallel = ref._is_expert_parallel = False
    only_local = low(hidden, index.clamp(max=7) * (index < 8), weights * (index < 8))
    assert rel(out.float(), expected.float()) < 0.08
    assert torch.equal(out, only_local)


def test_on_the_fly_keeps_no_copies_persistent_reports_bytes(qwen_dir, qwen_batch):
    fly = load_qwen(qwen_dir, policy="all_low", low_precision="fp8")
    logits(fly, qwen_batch)
    assert all(m.realb_weight_cache == {} for m in experts_of(fly))
    assert realb_hf.get_telemetry(fly).extra_memory_bytes == 0

    kept = load_qwen(qwen_dir, policy="all_low", low_precision="fp8", weight_cache="persistent")
    out = logits(kept, qwen_batch)
    modules = experts_of(kept)
    expected = sum(m.gate_up_proj.numel() + m.down_proj.numel() + 4 * (m.gate_up_proj.shape[:2].numel() + m.down_proj.shape[:2].numel()) for m in modules)
    assert realb_hf.get_telemetry(kept).extra_memory_bytes == expected  # fp8 data + fp32 row scales
    assert torch.equal(out, logits(fly, qwen_batch))  # same numbers, cached or not


def test_reconfigure_at_runtime(qwen_dir, qwen_batch, stock_logits):
    model = load_qwen(qwen_dir, policy="all_low", low_precision="fp8")
    assert not torch.equal(logits(model, qwen_batch), stock_logits)
    runtime = realb_hf.get_runtime(model)
    runtime.reconfigure(policy="off")
    assert torch.equal(logits(model, qwen_batch), stock_logits)
    with pytest.raises(ValueError, match=r"cannot change \['high_precision'\] on a loaded model"):
        runtime.reconfigure(high_precision="bf16")
    with pytest.raises(ValueError, match="granularity"):
        runtime.reconfigure(granularity="tile")
    assert runtime.config.policy == "off"


def test_reconfigure_checks_the_model_like_loading_does(qwen_dir, qwen_batch, stock_logits):
    """A value that fits the config but not the model (ep_size 3 of 8 experts; mxfp4 on a size its block does not
    divide is checked the same way) is refused, and the model keeps running as it was."""
    model = load_qwen(qwen_dir, policy="off")
    runtime = realb_hf.get_runtime(model)
    before = runtime.config.to_dict()
    with pytest.raises(ValueError, match=r"ep_size=3 must divide the number of experts \(8\) of model.*experts"):
        runtime.reconfigure(ep_size=3)
    assert runtime.config.to_dict() == before
    assert torch.equal(logits(model, qwen_batch), stock_logits)
    runtime.layers["model.language_model.layers.0.mlp.experts"] = replace(
        runtime.layers["model.language_model.layers.0.mlp.experts"], hidden=48
    )  # a layer whose hidden size the mxfp4 block (32) does not divide
    with pytest.raises(ValueError, match="mxfp4 needs the experts' hidden \\(48\\)"):
        runtime.reconfigure(low_precision="mxfp4")
    assert runtime.config.to_dict() == before


def test_telemetry_api(qwen_dir, qwen_batch, tmp_path):
    model = load_qwen(qwen_dir, ep_size=4, batch_threshold=0, modality_threshold=0.0)
    logits(model, qwen_batch)
    logits(model, qwen_batch)
    telemetry = realb_hf.get_telemetry(model)
    assert telemetry.forwards == 2 and len(telemetry.records) == 4
    assert [r.forward for r in telemetry.last_forward()] == [2, 2]
    record = telemetry.records[0]
    assert record.num_tokens == qwen_batch.kwargs["input_ids"].numel()
    assert sum(record.tokens_per_rank) == record.num_tokens * 2  # top-2
    assert record.modality_source == "mm_token_type_ids"
    assert 0 < max(record.vision_share_per_rank) <= 1
    assert record.predicted_speedup >= 1.0
    summary = telemetry.summary()
    assert summary["records"] == 4 and 0 <= summary["lowered_token_fraction"] <= 1
    path = tmp_path / "telemetry.json"
    text = telemetry.to_json(path)
    assert path.read_text() == text
    assert telemetry.records_from_json(text) == telemetry.records
    telemetry.reset()
    assert telemetry.records == [] and telemetry.forwards == 0


def test_telemetry_keeps_a_bounded_window():
    telemetry = model_telemetry(max_records=3)
    for i in range(5):
        telemetry.add(realb_hf.LayerRecord(i, "l", 1, [1], [0.0], ["bf16"], 1, 1, 1, 1.0, 0.0, 0, "off", "none"))
    assert [r.forward for r in telemetry.records] == [2, 3, 4] and telemetry.dropped == 2


def test_deferred_telemetry_is_read_back_before_it_piles_up(monkeypatch):
    """Counts left on the device are read back every MAX_PENDING layer calls, even if nobody reads telemetry."""
    from realb_hf import telemetry as telemetry_module
    from realb_hf.policy import PolicyParams, decide_without_routing

    monkeypatch.setattr(telemetry_module, "MAX_PENDING", 10)
    telemetry = model_telemetry(max_records=15)
    params = PolicyParams(policy="off", ep_size=2)
    decision = decide_without_routing(params, 4)
    for _ in range(33):
        telemetry.add_deferred("l", torch.tensor([[3, 1, 0, 2], [1, 1, 0, 0]]), 4, decision, params, "none")
        assert len(telemetry._pending) <= 10
    assert len(telemetry.records) == 15 and telemetry.dropped == 18  # nothing lost without being counted
    assert telemetry.records[-1].tokens_per_rank == [4, 2]


def test_shipped_telemetry_builds_records_only_when_read(monkeypatch):
    """Past MAX_PENDING calls the counts go to the host without building records (no Python per call on the
    serving path); reading builds them, and only the ones `max_records` keeps."""
    from realb_hf import telemetry as telemetry_module
    from realb_hf.policy import PolicyParams, decide_without_routing
    from realb_hf.telemetry import DeferredRouting

    built = []
    make_record = telemetry_module.make_record
    monkeypatch.setattr(telemetry_module, "MAX_PENDING", 10)
    monkeypatch.setattr(telemetry_module, "make_record", lambda *a: built.append(a) or make_record(*a))
    telemetry = model_telemetry(max_records=15)
    params = PolicyParams(policy="off", ep_size=2)
    decision = decide_without_routing(params, 4)
    for i in range(33):
        telemetry.next_forward()
        routing = torch.tensor([[i % 4], [0]])  # two tokens, top-1: one on expert i % 4, one on expert 0
        telemetry.add_deferred("l", DeferredRouting(routing, None, 4), 2, decision, params, "none")
    assert not built and len(telemetry._pending) == 3 and telemetry._shipped
    records = telemetry.records
    assert len(built) == 15 and telemetry.dropped == 18
    assert [r.forward for r in records] == list(range(19, 34))
    assert [r.tokens_per_rank for r in records[:4]] == [[1, 1], [1, 1], [2, 0], [2, 0]]  # experts 2, 3, 0, 1


def test_decode_size_telemetry_counts_when_read(qwen_dir, qwen_batch, monkeypatch):
    """Below the batch threshold the routing is counted when telemetry is read, with the same records as a
    model that counts at once; a small memory cap makes it read back early, still losing nothing."""
    from realb_hf import telemetry as telemetry_module

    eager = load_qwen(qwen_dir, ep_size=2, batch_threshold=0, imbalance_threshold=1e9)  # counts at once, never lowers
    lazy = load_qwen(qwen_dir, ep_size=2, batch_threshold=10**6)
    monkeypatch.setattr(telemetry_module, "MAX_PENDING_BYTES", 1)
    with torch.no_grad():
        for _ in range(2):
            eager(**qwen_batch.kwargs)
            lazy(**qwen_batch.kwargs)
    a, b = realb_hf.get_telemetry(eager).records, realb_hf.get_telemetry(lazy).records
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert (x.tokens_per_rank, x.vision_share_per_rank, x.precision_per_rank) == (
            y.tokens_per_rank, y.vision_share_per_rank, y.precision_per_rank
        )


def test_modality_falls_back_to_placeholder_ids(qwen_dir, qwen_batch):
    model = load_qwen(qwen_dir, ep_size=2)
    kwargs = {k: v for k, v in qwen_batch.kwargs.items() if k != "mm_token_type_ids"}
    kwargs["mm_token_type_ids"] = None
    with torch.no_grad():
        try:
            model(**kwargs)
        except ValueError:  # Qwen3-VL insists on mm_token_type_ids for images: check the text-only path instead
            model(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])
    record = realb_hf.get_telemetry(model).records[-1]
    assert record.modality_source == "input_ids"


def test_modality_from_token_ids_reads_nothing_back():
    """Codes from placeholder ids; the capture runs at every forward's start, so none of its ops reads a value back
    to the host."""
    from realb_hf.modality import IMAGE, TEXT, VIDEO, modality_from_inputs

    ids = torch.tensor([[1, 5, 5, 7, 2]])
    with torch.profiler.profile() as prof:
        codes, source = modality_from_inputs(ids, None, image_token_id=5, video_token_id=7)
    assert codes.tolist() == [[TEXT, IMAGE, IMAGE, VIDEO, TEXT]] and source == "input_ids"
    ops = {e.key for e in prof.key_averages()}
    assert not ops & {"aten::item", "aten::nonzero", "aten::_local_scalar_dense"}, ops


def test_no_experts_model_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"nothing to convert in model type 'llama'.*Supported families include \['qwen3_vl_moe'"):
        realb_hf.apply_realb(model)


def test_modules_to_not_convert(qwen_dir):
    model = load_qwen(qwen_dir, modules_to_not_convert=["layers.1."])
    assert [m.realb_name for m in experts_of(model)] == ["model.language_model.layers.0.mlp.experts"]
    with pytest.raises(ValueError, match="all of them matched modules_to_not_convert"):
        load_qwen(qwen_dir, modules_to_not_convert=["layers"])


def test_ep_size_must_divide_experts_before_loading(qwen_dir):
    with pytest.raises(ValueError, match=r"ep_size=3 must divide the number of experts \(8\)"):
        load_qwen(qwen_dir, ep_size=3)


def test_block_size_is_checked_before_loading():
    from realb_hf.tiny import build_tiny_model, tiny_qwen3_vl_moe_config

    config = tiny_qwen3_vl_moe_config()
    config.text_config.moe_intermediate_size = 40
    with pytest.raises(ValueError, match=r"mxfp4 needs the experts' hidden \(64\) and intermediate \(40\) sizes"):
        realb_hf.apply_realb(build_tiny_model(config), realb_hf.RealbConfig(low_precision="mxfp4"))


def test_apply_twice_is_refused(qwen_dir):
    model = load_qwen(qwen_dir, policy="off")
    with pytest.raises(ValueError, match="already runs ReaLB"):
        realb_hf.apply_realb(model)
    with pytest.raises(ValueError, match="does not run ReaLB"):
        realb_hf.get_runtime(torch.nn.Linear(2, 2))


def test_telemetry_without_a_counting_function_refuses_deferred_routing():
    """Telemetry imports no kernel: a bare one cannot count routing handed in to count later, and says so."""
    from realb_hf.policy import PolicyParams, decide_without_routing
    from realb_hf.telemetry import DeferredRouting, LayerCounts

    telemetry = realb_hf.Telemetry()
    params = PolicyParams(policy="off")
    routing = DeferredRouting(torch.zeros(3, 2, dtype=torch.long), None, 4)
    telemetry.receive("layer", LayerCounts(routing, decide_without_routing(params, 4), 3, params, "none"))
    with pytest.raises(ValueError, match="count_routing"):
        _ = telemetry.records
    counted = model_telemetry()
    counted.receive("layer", LayerCounts(routing, decide_without_routing(params, 4), 3, params, "none"))
    assert counted.records[0].tokens_per_rank == [6]


def test_telemetry_window_keeps_the_newest_records_and_counts_the_dropped():
    """A full window (a ring) drops its oldest record per add; shrinking `max_records` keeps the newest."""
    from realb_hf.layer_record import make_record
    from realb_hf.policy import PolicyParams, RoutingStats, decide

    params = PolicyParams(policy="off")
    stats = RoutingStats((1, 1), (0, 0), 1)
    record = make_record(0, "layer", stats, decide(stats, params), params, "none")
    for window in (2_000, 200_000):
        telemetry = model_telemetry(max_records=window)
        for _ in range(window + 500):
            telemetry.add(record)
        assert len(telemetry.records) == window and telemetry.dropped == 500
    telemetry.max_records = 10  # shrinking keeps the newest and counts what went
    telemetry.add(record)
    assert len(telemetry.records) == 10 and telemetry.dropped == 500 + 200_000 - 9


@pytest.mark.parametrize("bad", [-1, 2.5, "10", True])
def test_a_bad_telemetry_window_is_named_and_loses_nothing(bad):
    """`max_records` is a plain field: a bad value is refused where the window is used (reading the records, or
    the next add), naming the field and what it takes; the records stay, and a good value serves them again."""
    from realb_hf.layer_record import make_record
    from realb_hf.policy import PolicyParams, RoutingStats, decide

    params = PolicyParams(policy="off")
    stats = RoutingStats((1, 1), (0, 0), 1)
    telemetry = model_telemetry(max_records=5)
    for _ in range(3):
        telemetry.add(make_record(0, "layer", stats, decide(stats, params), params, "none"))
    telemetry.max_records = bad
    with pytest.raises(ValueError, match=r"Telemetry.max_records must be None \(keep every record\) or a whole number >= 0"):
        telemetry.add(make_record(0, "layer", stats, decide(stats, params), params, "none"))
    telemetry.max_records = None
    assert len(telemetry.records) == 3 and telemetry.dropped == 0
    with pytest.raises(ValueError, match="max_records"):
        model_telemetry(max_records=bad).add(make_record(0, "layer", stats, decide(stats, params), params, "none"))


def test_summary_of_no_records_reports_no_speedup():
    summary = model_telemetry().summary()
    assert summary["records"] == 0
    assert summary["predicted_speedup"] == 1.0 and summary["balancedness_tokens"] == 1.0


@pytest.mark.parametrize("low", ["fp8", "nvfp4"])
def test_training_through_lowered_experts_is_refused_with_the_way_out(qwen_dir, qwen_batch, low):
    """Train mode with gradients: a lowered layer refuses, naming policy='off'; with policy='off' training runs
    and gradients reach the experts; eval-mode forwards with gradients enabled still run."""
    model = load_qwen(qwen_dir, policy="all_low", low_precision=low)
    model.train()
    with pytest.raises(RuntimeError, match="policy='off'"):
        model(**qwen_batch.kwargs)
    model.eval()
    assert torch.isfinite(model(**qwen_batch.kwargs).logits.float()).all()
    realb_hf.get_runtime(model).reconfigure(policy="off")
    model.train()
    model(**qwen_batch.kwargs).logits.float().sum().backward()
    experts = next(m for m in model.modules() if isinstance(m, realb_hf.RealbExperts))
    assert experts.gate_up_proj.grad is not None
