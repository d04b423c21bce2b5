"""One model shared by threads: per-call state (modality, settings) stays with its call, and settings changes
apply between forwards, never in the middle of one."""

import sys
import threading

import pytest
import torch
from conftest import load_qwen

import realb_hf
from realb_hf.tiny import VOCAB, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

ROUNDS = 5


def text_batch():
    ids = torch.randint(10, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def run(model, inputs):
    """Greedy decode of 4 tokens with every step's scores, and this call's telemetry (records of its forwards)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores)


@pytest.fixture(scope="module")
def model(qwen_dir):
    return load_qwen(qwen_dir, ep_size=4, batch_threshold=0, modality_threshold=0.0, imbalance_threshold=0.0)


def test_two_threads_with_their_own_settings_get_their_single_thread_results(model):
    """A: the dynamic policy on an image batch with M_d 0.5 (its decisions read its own modality); B: all_low mxfp4
    on text. Run alone, then together (a barrier starts both at once) five times: every concurrent result equals
    its single-thread one exactly."""
    runtime = realb_hf.get_runtime(model)
    images = qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config()).kwargs
    jobs = {"A": (dict(modality_threshold=0.5), images), "B": (dict(policy="all_low", low_precision="mxfp4"), text_batch())}
    alone = {}
    for name, (settings, inputs) in jobs.items():
        with runtime.configured(**settings):
            alone[name] = run(model, inputs)
    with runtime.configured(policy="off"):  # both settings change their results: A lowers image-heavy ranks
        assert not torch.equal(alone["A"][1], run(model, images)[1])
        assert not torch.equal(alone["B"][1], run(model, jobs["B"][1])[1])

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so the two calls interleave inside their forwards
    try:
        concurrent_rounds(model, runtime, jobs, alone)
    finally:
        sys.setswitchinterval(switch)
    assert runtime.config.policy == "realb"  # the model's own settings never changed


def concurrent_round(model, runtime, jobs) -> dict:
    """Every job in its own thread, all released together by a barrier: {job: result}."""
    barrier, results, errors = threading.Barrier(len(jobs)), {}, []

    def work(name):
        settings, inputs = jobs[name]
        try:
            with runtime.configured(**settings):
                barrier.wait()
                results[name] = run(model, inputs)
        except Exception as error:  # surfaced below with the thread's name
            errors.append((name, error))

    threads = [threading.Thread(target=work, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def concurrent_rounds(model, runtime, jobs, alone):
    for _ in range(ROUNDS):
        results = concurrent_round(model, runtime, jobs)
        for name in jobs:
            assert torch.equal(results[name][0], alone[name][0]), name
            assert torch.equal(results[name][1], alone[name][1]), name


def test_reconfigure_applies_between_forwards(model):
    """While a thread generates, another flips the model's policy as fast as it can: each forward's records
    carry one policy (the one in force when the forward started), and the generating thread's own modality."""
    runtime = realb_hf.get_runtime(model)
    telemetry = runtime.telemetry
    telemetry.reset()
    stop = threading.Event()

    def flip():
        policies = ["off", "all_low"]
        i = 0
        while not stop.is_set():
            runtime.reconfigure(policy=policies[i % 2])
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        inputs = qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config()).kwargs
        for _ in range(3):
            run(model, inputs)
    finally:
        stop.set()
        flipper.join()
        runtime.reconfigure(policy="realb")
    by_forward = {}
    for record in telemetry.records:
        by_forward.setdefault(record.forward, set()).add(record.reason)
        assert record.modality_source == "mm_token_type_ids"
    assert by_forward and all(len(reasons) == 1 for reasons in by_forward.values()), by_forward


def test_configured_checks_like_reconfigure_and_restores(model):
    runtime = realb_hf.get_runtime(model)
    with pytest.raises(ValueError, match="ep_size=3 must divide"):
        with runtime.configured(ep_size=3):
            pass
    with runtime.configured(policy="off") as config:
        assert config.policy == "off" and runtime.params(torch.device("cpu")).policy == "off"
        with runtime.configured(granularity="expert"):  # nested: on top of the outer block's settings
            params = runtime.params(torch.device("cpu"))
            assert params.policy == "off" and params.granularity == "expert"
        assert runtime.params(torch.device("cpu")).granularity == "rank"
    assert runtime.params(torch.device("cpu")).policy == "realb"


def test_configured_weight_cache_applies_to_the_thread_s_calls(model):
    """Every setting of a `configured` block applies to its calls, weight_cache included: persistent copies are made
    only inside the block that asks for them."""
    runtime = realb_hf.get_runtime(model)
    experts = [m for m in model.modules() if isinstance(m, realb_hf.RealbExperts)]
    for m in experts:
        m.realb_free_cache()
    images = qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config()).kwargs
    with torch.no_grad():
        with runtime.configured(policy="all_low", low_precision="fp8"):
            model(**images)
        assert all(not m.realb_weight_cache for m in experts)  # on_the_fly: nothing kept
        with runtime.configured(policy="all_low", low_precision="fp8", weight_cache="persistent"):
            model(**images)
    assert all("fp8" in m.realb_weight_cache for m in experts)
    for m in experts:
        m.realb_free_cache()
