import json

import pytest
import torch
from transformers.quantizers import auto

import realb_hf
from realb_hf import RealbConfig
from realb_hf.registration import register


def test_defaults_and_quant_method():
    c = RealbConfig()
    assert c.quant_method == "realb"
    assert (c.low_precision, c.policy, c.granularity, c.weight_cache) == ("auto", "realb", "rank", "on_the_fly")
    assert (c.modality_threshold, c.batch_threshold, c.ep_size) == (0.7, 2048, 1)


def test_registered_with_transformers_and_idempotent():
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["realb"] is RealbConfig
    assert auto.AUTO_QUANTIZER_MAPPING["realb"] is realb_hf.RealbHfQuantizer
    assert RealbConfig in auto.LOADING_ATTRIBUTES_CONFIG_TYPES
    register()  # a second registration is a no-op, not transformers' "already registered" error
    register()
    assert auto.LOADING_ATTRIBUTES_CONFIG_TYPES.count(RealbConfig) == 1


def test_foreign_registration_under_our_name_is_refused(monkeypatch):
    class Other(RealbConfig):
        pass

    Other.__module__ = "someone_else"
    monkeypatch.setitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "realb", Other)
    with pytest.raises(RuntimeError, match="already registered by someone_else"):
        register()


def test_json_round_trip_is_exact_including_int_keys():
    c = RealbConfig(
        low_precision="nvfp4",
        policy="static",
        rank_precisions={1: "low", 0: "bf16", 3: "mxfp4"},
        ep_size=4,
        modality_threshold=0.9,
        batch_threshold=512,
        imbalance_threshold=0.25,
        granularity="expert",
        weight_cache="persistent",
        low_cost_ratio=0.5,
        modules_to_not_convert=["visual"],
    )
    text = c.to_json_string()
    back = RealbConfig.from_dict(json.loads(text))
    assert back == c
    assert back.rank_precisions == {0: "bf16", 1: "low", 3: "mxfp4"}
    assert all(isinstance(k, int) for k in back.rank_precisions)
    assert back.to_json_string() == text
    via_auto = auto.AutoQuantizationConfig.from_dict(json.loads(text))
    assert isinstance(via_auto, RealbConfig) and via_auto == c


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(low_precision="fp16"), r"low_precision='fp16' is not allowed; choose one of \['auto', 'fp8', 'nvfp4', 'mxfp4'\]"),
        (dict(high_precision="fp32"), r"high_precision='fp32' is not allowed; choose one of \['bf16'\]"),
        (dict(policy="eplb"), r"policy='eplb' is not allowed; choose one of \['realb', 'static', 'all_low', 'off'\]"),
        (dict(granularity="layer"), r"granularity='layer' is not allowed; choose one of \['rank', 'expert'\]"),
        (dict(weight_cache="disk"), r"weight_cache='disk' is not allowed; choose one of \['on_the_fly', 'persistent'\]"),
        (dict(modality_threshold=1.5), r"modality_threshold=1.5 is out of range; allowed: \[0.0, 1.0\]"),
        (dict(modality_threshold=-0.1), r"modality_threshold=-0.1 is out of range"),
        (dict(modality_threshold="high"), r"modality_threshold must be a number"),
        (dict(modality_threshold=float("nan")), r"modality_threshold=nan is out of range"),
        (dict(batch_threshold=-1), r"batch_threshold=-1 is out of range; allowed: \[0, inf\)"),
        (dict(batch_threshold=2.5), r"batch_threshold must be an int"),
        (dict(batch_threshold=True), r"batch_threshold must be an int"),
        (dict(imbalance_threshold=-0.5), r"imbalance_threshold=-0.5 is out of range"),
        (dict(ep_size=0), r"ep_size=0 is out of range; allowed: \[1, inf\)"),
        (dict(ep_size="4"), r"ep_size must be an int"),
        (dict(low_cost_ratio=0.0), r"low_cost_ratio=0.0 is out of range; allowed: \(0.0, 1.0\]"),
        (dict(low_cost_ratio=1.5), r"low_cost_ratio=1.5 is out of range"),
        (dict(policy="static"), r'policy="static" needs rank_precisions'),
        (dict(rank_precisions={0: "low"}), r"rank_precisions is only used with policy='static'"),
        (dict(policy="static", rank_precisions={2: "low"}, ep_size=2), r"key 2 is not a rank in \[0, 1\]"),
        (dict(policy="static", rank_precisions={"x": "low"}), r"key 'x' is not a rank number"),
        (dict(policy="static", rank_precisions={0: "int4"}), r"rank_precisions\[0\]='int4' is not allowed"),
        (dict(policy="static", rank_precisions=[0]), r"must be a dict"),
        (dict(modules_to_not_convert="visual"), r"modules_to_not_convert must be a list"),
        (dict(quant_method="fp8"), r"quant_method must be 'realb'"),
        (dict(bogus=1), r"unknown field\(s\) \['bogus'\]; known fields: \['low_precision'"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RealbConfig(**kwargs)


def test_loading_attributes_are_the_explicit_runtime_knobs():
    assert RealbConfig().get_loading_attributes() == {}
    c = RealbConfig(modality_threshold=0.9, ep_size=4, modules_to_not_convert=["visual"])
    assert c.get_loading_attributes() == {"modality_threshold": 0.9, "ep_size": 4}
    # Changing the policy carries the static map along, so a saved static map cannot linger.
    assert RealbConfig(policy="off").get_loading_attributes() == {"policy": "off", "rank_precisions": None}


def test_update_validates_and_restores_on_error():
    c = RealbConfig()
    assert c.update(policy="all_low", not_a_field=1) == {"not_a_field": 1}
    assert c.policy == "all_low"
    with pytest.raises(ValueError, match="granularity"):
        c.update(granularity="nope")
    assert c.granularity == "rank"


def test_merge_at_reload_overrides_runtime_knobs_only():
    saved = RealbConfig(low_precision="fp8", policy="static", rank_precisions={0: "low"}, ep_size=2).to_dict()
    merged = auto.AutoHfQuantizer.merge_quantization_configs(saved, RealbConfig(policy="realb", modality_threshold=0.9))
    assert merged.policy == "realb" and merged.rank_precisions is None
    assert merged.modality_threshold == 0.9 and merged.ep_size == 2 and merged.low_precision == "fp8"


def test_update_leaving_static_drops_its_map():
    c = RealbConfig(policy="static", rank_precisions={0: "low"}, ep_size=2)
    c.update(policy="realb")
    assert c.policy == "realb" and c.rank_precisions is None


@pytest.mark.parametrize("bad", [-1, float("nan"), "512", True, None])
def test_conversion_cost_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="RealbConfig.conversion_cost"):
        RealbConfig(conversion_cost=bad)


def test_conversion_cost_counts_only_per_call_conversion():
    """The policy sees the conversion cost only when weights are converted on every call."""
    from realb_hf.runtime import Settings

    device = torch.device("cpu")
    assert Settings(RealbConfig(conversion_cost=512)).params(device).conversion_cost == 512.0
    persistent = RealbConfig(conversion_cost=512, weight_cache="persistent")
    assert Settings(persistent).params(device).conversion_cost == 0.0
    assert Settings(RealbConfig()).params(device).conversion_cost == 0.0
