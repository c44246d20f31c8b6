"""One hyperparameter schema: :class:`ModelConfig` drives SPARTHA, the module, settings.json and the CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import spartha_pyro as sp
from spartha_pyro.cli import _apply_config, _model_config, build_parser, main
from spartha_pyro.config import ModelConfig

TINY = dict(hidden=16, y_dim=4, d_dim=2, r_dim=2, x_dim=2)


@pytest.fixture(scope="module")
def tiny(sim):
    model = sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", aux_weights={"y": 20}, **TINY)
    model.train(max_epochs=1, progress=False, validation=None)
    return model


def test_spartha_keywords_build_the_config(tiny):
    assert tiny.config == ModelConfig(aux_weights={"y": 20.0, "d": 50.0, "r": 50.0}, **TINY)
    assert tiny.module.histology_weight == ModelConfig.histology_weight
    assert tiny.module.guide_hist.aux_weights == {"z_y0": 20.0, "z_d": 50.0, "z_r": 50.0}


def test_unknown_setting_is_named(sim):
    with pytest.raises(sp.InputError, match=r"unknown model setting\(s\) \['hiden'\]"):
        sp.SPARTHA(sim, label_keys=["cell_type"], batch_key="slide", hiden=16)


@pytest.mark.parametrize("bad, match", [
    (dict(likelihood="poisson"), "likelihood must be one of"),
    (dict(histology_encoder="cnn"), "histology_encoder must be one of"),
    (dict(aux_weights={"z": 1.0}), "aux_weights keys"),
    (dict(hidden=0), "must be positive"),
])
def test_bad_values_raise_input_error(bad, match):
    with pytest.raises(sp.InputError, match=match):
        ModelConfig(**bad)


def test_settings_json_is_the_config(tiny, tmp_path):
    tiny.save(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "settings.json").read_text())["init_kwargs"]
    assert saved == dataclasses.asdict(tiny.config)
    assert sp.SPARTHA.load(tmp_path / "m").config == tiny.config


def test_model_saved_with_the_old_layout_loads(tiny, sim, tmp_path):
    """Before the schema, init_kwargs held only the aux weights given ({} by default); models
    saved before a field existed lack it: both load with the schema's defaults, same output."""
    tiny.save(tmp_path / "m")
    path = tmp_path / "m" / "settings.json"
    settings = json.loads(path.read_text())
    settings["init_kwargs"]["aux_weights"] = {"y": 20}
    del settings["init_kwargs"]["histology_dropout"]
    path.write_text(json.dumps(settings))
    loaded = sp.SPARTHA.load(tmp_path / "m")
    assert loaded.config == tiny.config
    spots = sim[sim.obs["slide"] == sim.obs["slide"].iloc[0]]
    np.testing.assert_array_equal(loaded.predict_mean(spots, num_samples=2).values,
                                  tiny.predict_mean(spots, num_samples=2).values)


def test_cli_model_options_are_the_schema():
    args = build_parser().parse_args(["train", "data.h5ad", "-o", "m"])
    assert ModelConfig(**_model_config(args)) == ModelConfig()
    changed = build_parser().parse_args(["train", "d", "-o", "m", "--no-artifact-latent", "--aux-weights", "r=5",
                                         "--histology-dropout", "0.5", "--likelihood", "zinb"])
    assert ModelConfig(**_model_config(changed)) == ModelConfig(
        artifact_latent=False, aux_weights={"r": 5.0}, histology_dropout=0.5, likelihood="zinb")


def test_config_file_negated_keys(tmp_path):
    """``no_artifact_latent = true`` (and ``no_refit``) in a config file turn the option off."""
    (tmp_path / "c.toml").write_text("[train]\nno_artifact_latent = true\nno_refit = true\nhidden = 32\n")
    parser = build_parser()
    argv = ["train", "d.h5ad", "-o", "m", "--config", str(tmp_path / "c.toml")]
    _apply_config(parser, argv)
    args = parser.parse_args(argv)
    assert (args.artifact_latent, args.refit, args.hidden) == (False, False, 32)
    assert main(["train", "missing.h5ad", "-o", str(tmp_path / "m"), "--hiden", "3"]) == 2  # usage error
