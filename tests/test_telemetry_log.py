"""The device log: compiled model forwards write their layers' counts into module buffers, and telemetry reads
them once per forward. Records must equal eager ones, in forward order, whatever reads or resets come between."""

from __future__ import annotations

import pytest
import torch

from realb_hf import RealbConfig, apply_realb, get_runtime, get_telemetry
from realb_hf import runtime as runtime_module
from realb_hf.quantizer import realb_modules
from realb_hf.telemetry_log import BUFFER, HEADER
from realb_hf.tiny import build_tiny_model, tiny_mixtral_config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def _mixtral(policy: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_tiny_model(tiny_mixtral_config(), dtype=torch.float32).eval()
    model = apply_realb(model, RealbConfig(policy=policy, **config)).to(torch.bfloat16)
    for module in realb_modules(model):
        module.realb_device_path = "always"  # the CPU runs the device path's reference ops
    return model


# the dynamic policy decided on the device from its counts, and a config decision (counts made in the graph)
CONFIGS = {"realb": dict(ep_size=4, batch_threshold=4, modality_threshold=0.0), "static": dict(ep_size=4,
           rank_precisions={0: "low"})}  # fmt: skip


def _batches(model, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, model.config.vocab_size, (2, 8), generator=gen) for _ in range(n)]


@pytest.mark.parametrize("policy", sorted(CONFIGS))
def test_compiled_forwards_write_the_log_and_record_like_eager(policy):
    model = _mixtral(policy, **CONFIGS[policy])
    batches = _batches(model, 3)
    telemetry = get_telemetry(model)
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(batches[0])
        telemetry.reset()
        for ids in batches:
            model(ids)
        want = telemetry.records
        telemetry.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        for ids in batches:
            compiled(ids)
    targets = {str(getattr(n.target, "_name", n.target)) for g in explained.graphs for n in g.graph.nodes}
    assert "realb_telemetry::next_forward" in targets and "realb_telemetry::receive" not in targets
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    assert telemetry.records == want  # every field, forward numbers included
    assert len(want) == 3 * len(realb_modules(model))


@pytest.mark.slow
@pytest.mark.parametrize("policy", sorted(CONFIGS))
def test_under_inductor_the_log_records_what_the_per_layer_operator_records(policy):
    """Inductor compiles the log's in-place writes: records (and logits) equal those of the same model whose layers
    have no log and hand each call over through `realb_telemetry::receive`."""
    seen = []
    for keep_log in (True, False):
        torch.compiler.reset()
        model = _mixtral(policy, **CONFIGS[policy])
        if not keep_log:
            for module in realb_modules(model):
                delattr(module, BUFFER)
        with torch.no_grad():
            compiled = torch.compile(model, fullgraph=True)
            logits = [compiled(ids).logits for ids in _batches(model, 3)]
        seen.append((get_telemetry(model).records, logits))
    (with_log, logits), (without, want_logits) = seen
    assert with_log == without and len(with_log) == 3 * len(realb_modules(model))
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits, strict=True))


def test_reads_resets_and_eager_forwards_between_compiled_ones_keep_every_record_once():
    model = _mixtral("realb", **CONFIGS["realb"])
    a, b, c = _batches(model, 3)
    telemetry = get_telemetry(model)
    layers = len(realb_modules(model))
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(a)
        assert [r.forward for r in telemetry.records] == [1] * layers  # read while the log is live
        compiled(b)
        model(c)  # eager: the log of forward 2 is taken first
        compiled(a)
        assert [r.forward for r in telemetry.records] == [1] * layers + [2] * layers + [3] * layers + [4] * layers
        compiled(b)
        telemetry.reset()  # forward 5 is forgotten, not recorded later as another forward's
        compiled(c)
        assert [r.forward for r in telemetry.records] == [1] * layers


def test_records_keep_the_settings_their_forward_decided_with():
    model = _mixtral("realb", **CONFIGS["realb"])
    (ids,) = _batches(model, 1)
    telemetry = get_telemetry(model)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(ids)
        get_runtime(model).reconfigure(policy="off")
        compiled(ids)
        with get_runtime(model).configured(policy="all_low"):
            compiled(ids)
    reasons = [{r.reason for r in telemetry.records if r.forward == f} for f in (1, 2, 3)]
    assert reasons[1:] == [{"off"}, {"all_low"}] and reasons[0] <= {"lowered", "no_eligible_rank"}


def test_calls_whose_settings_were_forgotten_are_counted_as_dropped(monkeypatch):
    monkeypatch.setattr(runtime_module, "MAX_SERIALS", 2)
    model = _mixtral("realb", **CONFIGS["realb"])
    (ids,) = _batches(model, 1)
    runtime, telemetry = get_runtime(model), get_telemetry(model)
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with runtime.configured(imbalance_threshold=7.0):
            compiled(ids)
        for threshold in (8.0, 9.0):  # two more configs: the first two serials are forgotten
            with runtime.configured(imbalance_threshold=threshold):
                pass
    assert telemetry.records == [] and telemetry.dropped == len(realb_modules(model))


def test_a_bounded_window_keeps_the_same_newest_records_compiled_or_eager():
    kept = {}
    for mode in ("eager", "compiled"):
        torch.compiler.reset()
        model = _mixtral("realb", **CONFIGS["realb"])
        telemetry = get_telemetry(model)
        telemetry.max_records = 3
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if mode == "compiled" else model
        with torch.no_grad():
            for ids in _batches(model, 4):
                run(ids)
        kept[mode] = (telemetry.records, telemetry.dropped)
    layers = len(realb_modules(model))
    assert kept["compiled"] == kept["eager"]
    assert len(kept["eager"][0]) == 3 and kept["eager"][1] == 4 * layers - 3


def test_a_copied_model_logs_into_its_own_telemetry():
    import copy

    model = _mixtral("realb", **CONFIGS["realb"])
    twin = copy.deepcopy(model)
    (ids,) = _batches(model, 1)
    with torch.no_grad():
        torch.compile(twin, fullgraph=True, backend="aot_eager")(ids)
    assert get_telemetry(model).records == [] and len(get_telemetry(twin).records) == len(realb_modules(twin))


def test_telemetry_off_leaves_no_host_operator_in_a_compiled_forward():
    """Off, telemetry counts nothing, eager or compiled: the compiled forward is one graph with no operator of
    telemetry's, which would split its CUDA graph."""
    model = _mixtral("realb", **CONFIGS["realb"])
    telemetry = get_telemetry(model)
    telemetry.enabled = False
    a, b = _batches(model, 2)
    with torch.no_grad():
        model(a)
        explained = torch._dynamo.explain(model)(b)
    targets = {str(getattr(n.target, "_name", n.target)) for g in explained.graphs for n in g.graph.nodes}
    assert explained.graph_count == 1 and not any(t.startswith("realb_telemetry::") for t in targets)
    assert telemetry.forwards == 0 and telemetry.records == []
    telemetry.enabled = True
    with torch.no_grad():
        model(a)
    assert telemetry.forwards == 1 and len(telemetry.records) == len(realb_modules(model))


def test_a_log_left_unwritten_by_a_forward_gives_no_record_of_it():
    """The generation invariant, on two bare logs written by hand: a snapshot holds only the rows its forward wrote,
    and a row whose settings are unknown is counted, not rebuilt."""
    from realb_hf.policy import PolicyParams
    from realb_hf.telemetry_log import KIND_COUNTS, DeviceLog, attach_log, write_log

    params = PolicyParams(ep_size=2, batch_threshold=1)
    log = DeviceLog(lambda serial, device: params if serial == 1 else None)
    layers = [torch.nn.Linear(2, 2) for _ in range(2)]
    for i, layer in enumerate(layers):
        attach_log(layer, num_experts=4)
        log.add(f"layer{i}", layer)
    counts = torch.tensor([[3, 1, 0, 2], [1, 0, 0, 0]])

    def forward(written: list[int], serial: int = 1) -> None:
        for i in written:
            write_log(getattr(layers[i], BUFFER), counts, 3, serial, "input_ids", KIND_COUNTS)
        log.mark_written()

    forward([0, 1])
    first = log.take(1)
    forward([1])
    second = log.take(2)
    forward([0], serial=9)  # settings no longer known
    third = log.take(3)
    assert log.take(4) is None  # nothing written since
    assert [c[1] for c in first.calls] == ["layer0", "layer1"] and [c[1] for c in second.calls] == ["layer1"]
    assert third.calls == [] and third.unknown == 1
    stats = first.calls[0][2]
    assert (stats.expert_tokens, stats.expert_vision, stats.num_tokens) == ((3, 1, 0, 2), (1, 0, 0, 0), 3)


def test_the_log_is_a_buffer_that_moves_with_the_model_and_stays_out_of_checkpoints():
    model = _mixtral("off")
    for module in realb_modules(model):
        log = getattr(module, BUFFER)
        assert log.dtype == torch.int32 and log.shape == (HEADER + 2 * module.num_experts,) and not log.any()
    assert not any(BUFFER in key for key in model.state_dict())
    model.to(torch.float32)  # a dtype cast leaves the counts' integers alone
    assert all(getattr(m, BUFFER).dtype == torch.int32 for m in realb_modules(model))


def test_eager_forwards_never_copy_the_log(monkeypatch):
    model = _mixtral("realb", **CONFIGS["realb"])
    log, taken = get_telemetry(model).device_log, []
    take = log.take
    monkeypatch.setattr(log, "take", lambda forward: taken.append(take(forward)) or taken[-1])
    with torch.no_grad():
        for ids in _batches(model, 2):
            model(ids)
    assert len(get_telemetry(model).records) == 2 * len(realb_modules(model))
    assert len(taken) == 3 and taken == [None] * 3  # asked at each forward and read, and nothing was copied


@pytest.mark.cuda
def test_reduce_overhead_forwards_write_the_log_inside_their_cuda_graph():
    """Telemetry on (the default), mode="reduce-overhead": no CUDA graph is skipped, and replayed forwards record
    like recorded ones (a replay that wrote nothing would leave its forward without records)."""
    from torch._dynamo.utils import counters

    from realb_hf.tiny import TINY_FAMILIES

    family = TINY_FAMILIES["qwen3_vl_moe"]
    model = apply_realb(family.build().cuda().eval(), RealbConfig(ep_size=4, batch_threshold=1))
    batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in family.batch(model.config, seed=s).kwargs.items()}
               for s in (0, 1)]  # fmt: skip
    telemetry, layers = get_telemetry(model), len(realb_modules(model))
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):  # warm-up, recording, replay
            for inputs in batches:
                compiled(**inputs)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    records = telemetry.records
    assert [r.forward for r in records] == [f for f in range(1, 7) for _ in range(layers)]
    by_forward = [[(r.layer, r.tokens_per_rank, r.precision_per_rank) for r in records if r.forward == f]
                  for f in range(1, 7)]  # fmt: skip
    assert by_forward[2:] == by_forward[:4]  # the same batch, the same counts and decisions, every round
