"""ModelConfig / TrainConfig: validation, presets, JSON round trip, overrides."""

import json
import subprocess
import sys

import pytest

from common.config import PRESETS, TRAIN_PRESETS, ModelConfig, TrainConfig, parse_override, split_overrides


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    cfg = ModelConfig.from_name(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    if name in TRAIN_PRESETS:
        tc = TrainConfig.from_name(name)
        assert TrainConfig.from_json(tc.to_json()) == tc


def test_paper_presets_match_the_paper():
    r = ModelConfig.from_name("paper-rule110")
    assert (r.n_layers, r.layer_types, r.d_model, r.window) == (4, "ASAS", 256, 24)
    d = ModelConfig.from_name("paper-depo")
    assert (d.n_layers, d.d_model, d.window) == (10, 512, 75)


def test_from_name_overrides_and_derived_fields():
    cfg = ModelConfig.from_name("debug", n_layers=5, pattern="AAS", sleep_layers=[1, 4], ssm_value_dim=24)
    assert cfg.layer_types == "AASAA" and cfg.loop_range == (1, 4) and cfg.ssm_v_dim == 24
    assert ModelConfig.from_name("debug").loop_range == (0, 2)


BAD_MODEL = {
    "pattern": ("AXS", "pattern"),
    "window": (0, "window"),
    "sleep_passes": (0, "sleep_passes"),
    "sleep_layers": ([2, 9], "sleep_layers"),
    "head_dim": (7, "head_dim"),
    "ssm_rule": ("mamba", "ssm_rule"),
    "eviction": ("soft", "eviction"),
    "d_model": ("wide", "d_model"),
    "tie_embeddings": (1, "tie_embeddings"),
    "conv_size": (-1, "conv_size"),
}


@pytest.mark.parametrize("field", BAD_MODEL, ids=list(BAD_MODEL))
def test_bad_model_values_name_the_field(field):
    value, needle = BAD_MODEL[field]
    with pytest.raises(ValueError, match=needle):
        ModelConfig.from_name("debug", **{field: value})


def test_unknown_keys_and_presets_are_rejected():
    with pytest.raises(ValueError, match="unknown ModelConfig field.*colour"):
        ModelConfig.from_dict({"colour": "blue"})
    assert ModelConfig.from_dict({"colour": "blue"}, strict=False) == ModelConfig()
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        ModelConfig.from_name("huge")
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(batch_size=10, grad_accum=3)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_overrides_parse_and_route():
    assert parse_override("d_model=64") == ("d_model", 64)
    assert parse_override("ssm_rule=hebbian") == ("ssm_rule", "hebbian")
    assert parse_override("sleep_layers=[1,3]") == ("sleep_layers", [1, 3])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("d_model")
    model, train = split_overrides({"d_model": 64, "muon_lr": 0.01})
    assert model == {"d_model": 64} and train == {"muon_lr": 0.01}
    with pytest.raises(ValueError, match="unknown config field 'nope'"):
        split_overrides({"nope": 1})


def test_common_imports_no_framework():
    code = ("import sys, common, common.config, common.checkpoint, common.init, common.tokenizers, common.tasks, "
            "common.tasks.render, common.training, common.memory, common.sampling\n"
            "bad = [m for m in ('torch', 'mlx', 'mlx.core') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
