"""The typed configuration: values coerced to their declared types and checked once, at load."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from brainpaint.data import prepare
from brainpaint.config.settings import Config, InferConfig, model_config_yaml
from brainpaint.errors import ConfigError
from brainpaint.model.weights import read_metadata


def test_yaml_values_are_coerced_to_the_declared_types(tmp_path):
    path = tmp_path / "p.yaml"
    # PyYAML reads 2e-4 (no dot) as a string, and people write 16.0 for 16.
    path.write_text("train:\n  lr: 2e-4\n  batch_size: 16.0\ninfer:\n  steps: '8'\n  temperature: 0\n")
    cfg = Config.load(path)
    assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 16 and isinstance(cfg.train.batch_size, int)
    assert cfg.infer.steps == 8 and isinstance(cfg.infer.steps, int)
    assert cfg.infer.temperature == 0.0 and isinstance(cfg.infer.temperature, float)
    assert cfg.explicit == {"train.lr", "train.batch_size", "infer.steps", "infer.temperature"}
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("infer", {"steps": 0}, "infer.steps must be >= 1, got 0"),
        ("infer", {"steps": 2.5}, "infer.steps must be an integer, got 2.5"),
        ("infer", {"repaint": True}, "infer.repaint was retired: only false is still accepted, got True"),
        ("infer", {"noise_correlation": 0.5}, "infer.noise_correlation was retired: only 0.0 is still accepted, got 0.5"),
        ("infer", {"method": "magic"}, "unknown infer.method 'magic' \\(expected one of diffusion, harmonic\\)"),
        ("infer", {"device": "gpu0"}, "infer.device must be auto, cpu, cuda or cuda:N, got 'gpu0'"),
        ("infer", {"seed": None}, "infer.seed must be set"),
        ("train", {"lr": "fast"}, "train.lr must be a number, got 'fast'"),
        ("train", {"lr": 0}, "train.lr must be > 0, got 0.0"),
        ("train", {"keep_last": 0}, "train.keep_last must be >= 1, got 0"),
        ("train", {"val_steps": 20}, "unknown parameter 'train.val_steps'"),  # validation samples as inference does
        ("data", {"crop_size": -4}, "data.crop_size must be >= 1, got -4"),
        ("model", {"channel_mult": [1, 0]}, "model.channel_mult must be >= 1, got 0"),
        ("model", {"channel_mult": 4}, "model.channel_mult must be a list of integers, got 4"),
        ("model", {"num_heads": 3}, r"model.num_heads \(3\) must divide the channels of every attention layer"),
        ("diffusion", {"beta_schedule": "sigmoid"}, "unknown diffusion.beta_schedule 'sigmoid'"),
        ("prepare", {"masks_per_subject": 0}, "prepare.masks_per_subject must be >= 1, got 0"),
    ],
)
def test_one_clear_error_naming_section_and_key(section, values, message):
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_dict({section: values})
    assert "\n" not in str(info.value)


def test_sections_built_in_code_are_checked_too():
    with pytest.raises(ConfigError, match="infer.ensemble must be >= 1"):
        InferConfig(ensemble=0)
    with pytest.raises(ConfigError, match="unknown parameter 'infer.ensembles'"):
        Config.from_dict({"infer": {"ensembles": 2}})
    with pytest.raises(ConfigError, match="unknown parameters section 'inference'"):
        Config.from_dict({"inference": {}})


def test_retired_settings_load_when_they_ask_for_what_every_run_does(tmp_path):
    """The parameters.yaml of an earlier run (and a weights file's metadata) may still hold a
    retired setting: with the value every run now has it is dropped, with another it is an error."""
    path = tmp_path / "old_run_parameters.yaml"
    path.write_text("infer:\n  repaint: false\n  noise_correlation: 0\n  steps: 2\n")
    cfg = Config.load(path)
    assert cfg.to_dict() == Config.from_dict({"infer": {"steps": 2}}).to_dict() and cfg.explicit == {"infer.steps"}
    with pytest.raises(ConfigError, match="infer.repaint was retired: only false is still accepted, got 0"):
        Config.from_dict({"infer": {"repaint": 0}})
    assert Config.from_dict({"data": {"planes": "axial"}, "infer": {"planes": None}}).explicit == frozenset()
    assert Config.from_dict({"infer": {"planes": "axial"}}).to_dict() == Config().to_dict()
    with pytest.raises(ConfigError, match="data.planes was retired: only axial is still accepted, got 'axial\\+coronal'"):
        Config.from_dict({"data": {"planes": "axial+coronal"}})
    with pytest.raises(ConfigError, match="infer.planes was retired: only null or axial is still accepted, got 'coronal'"):
        Config.from_dict({"infer": {"planes": "coronal"}})


def test_override_is_validated_and_marked_explicit():
    cfg = Config.from_dict({"infer": {"steps": 4}})
    done = cfg.override({"infer.ensemble": 3})
    assert done.infer.ensemble == 3 and done.infer.steps == 4
    assert done.explicit == {"infer.steps", "infer.ensemble"}
    with pytest.raises(ConfigError, match="infer.ensemble must be >= 1"):
        cfg.override({"infer.ensemble": 0})


def test_prepare_options_go_through_the_configuration(tmp_path, capsys):
    (tmp_path / "sub-01_T1w.nii.gz").write_bytes(b"")
    assert prepare.run_prepare(tmp_path, tmp_path / "out", masks_per_subject=0) == 2
    assert capsys.readouterr().err == "error: prepare.masks_per_subject must be >= 1, got 0\n"
    assert not (tmp_path / "out").exists()


def test_the_built_in_infer_settings_are_the_shipped_sampler():
    """Without a parameters file, inference runs the sampler the README benchmarks."""
    infer = InferConfig()
    assert (infer.method, infer.sampler, infer.steps, infer.eta, infer.tile) == ("diffusion", "ddim", 1, 0.0, True)
    assert (infer.temperature, infer.ensemble, infer.smoothing_sigma) == (0.0, 1, 0.0)
    assert (infer.batch_slices, infer.device, infer.seed) == (8, "auto", 0)


def test_the_shipped_parameters_file_overrides_nothing():
    from pathlib import Path

    shipped = Config.load(Path(__file__).resolve().parents[1] / "workspace" / "parameters.yaml")
    assert shipped.to_dict() == Config().to_dict() and not shipped.explicit


def test_a_parameters_file_extends_another_section_by_section(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "root.yaml").write_text("model:\n  preset: tiny\ntrain:\n  lr: 1.0e-4\n  batch_size: 4\n")
    (tmp_path / "base" / "mid.yaml").write_text("extends: root.yaml\ntrain:\n  batch_size: 2\n")
    (tmp_path / "leaf.yaml").write_text("extends: base/mid.yaml\ntrain:\n  lr: 3.0e-4\ninfer:\n  steps: 4\n")
    cfg = Config.load(tmp_path / "leaf.yaml")
    assert (cfg.model.preset, cfg.train.lr, cfg.train.batch_size, cfg.infer.steps) == ("tiny", 3e-4, 2, 4)
    assert cfg.explicit == {"model.preset", "train.lr", "train.batch_size", "infer.steps"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("extends: missing.yaml\n", "cannot read parameters file .*missing.yaml"),
        ("extends: loop.yaml\n", "'extends: loop.yaml' makes a cycle"),
        ("extends: [a, b]\n", "'extends' must name another parameters file"),
    ],
)
def test_a_bad_extends_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "loop.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Config.load(path)


# The shipped recipe, configs/shipped.yaml: every setting that differs from the built-in
# defaults, as the old chain of `extends:` files (configs/x0_mirror.yaml ... x0_ctx2rg.yaml,
# commit 0a0ce1e) resolved it when the flat file replaced it.
SHIPPED_RECIPE = {
    "model": {"context_slices": 2, "atlas": True},
    "diffusion": {"prediction": "x0", "terminal_fraction": 0.75},
    "data": {"crop_size": 128, "prior": "harmonic", "atlas_gain": 1.0, "atlas_fit": "affine", "mirror": True,
             "cache_volumes": 200, "cache_dir": "runs/cache"},
    "train": {"lr": 5e-05, "ema_rate": 0.999, "max_steps": 1000000, "max_cpu_minutes": 30.0, "lr_schedule": "cosine",
              "warmup_steps": 20, "export_every": 200, "save_every": 200, "keep_last": 2, "log_every": 25,
              "val_every": 0, "seed": 7, "init_weights": "runs/x0_ctx2r0/model.safetensors"},
}


def _non_default(cfg: Config) -> dict:
    defaults = Config().to_dict()
    changed = {s: {k: v for k, v in values.items() if defaults[s][k] != v} for s, values in cfg.to_dict().items()}
    return {s: values for s, values in changed.items() if values}


def test_the_flat_shipped_recipe_is_the_old_chain_resolved():
    repo = Path(__file__).resolve().parents[1]
    text = (repo / "configs" / "shipped.yaml").read_text()
    assert "extends" not in yaml.safe_load(text)
    assert _non_default(Config.load(repo / "configs" / "shipped.yaml")) == SHIPPED_RECIPE
    # flat and minimal: it lists exactly the settings that differ from the defaults
    listed = {f"{s}.{k}" for s, values in yaml.safe_load(text).items() for k in values}
    assert listed == {f"{s}.{k}" for s, values in SHIPPED_RECIPE.items() for k in values}


def test_the_shipped_weights_compute_what_the_shipped_recipe_describes():
    repo = Path(__file__).resolve().parents[1]
    saved = yaml.safe_load(read_metadata(repo / "workspace" / "additional_files" / "model.safetensors")["config"])
    recipe = Config.load(repo / "configs" / "shipped.yaml")
    expected = yaml.safe_load(model_config_yaml(recipe))
    # Settings retired since the weights were exported stay in their metadata with the value
    # every run now has (`config.settings.RETIRED`); loading drops them.
    assert saved["data"].pop("planes") == "axial"
    # Settings added after the weights were exported are absent from their metadata; loading
    # gives them their defaults, which must be what the recipe says.
    newer = [(s, k) for s in expected for k in expected[s] if k not in (saved.get(s) or {})]
    assert newer == []
    assert saved == expected


def test_the_recipes_that_start_from_the_shipped_one_keep_its_network_and_inputs():
    """gpu_wide: the shipped inputs and targets, a wider network from scratch; tumour: the
    shipped recipe from the shipped weights, with intensity augmentation."""
    repo = Path(__file__).resolve().parents[1]
    shipped = Config.load(repo / "configs" / "shipped.yaml").to_dict()
    for name, changes in {
        "gpu_wide": {"model.base_channels", "data.num_workers", "train.batch_size", "train.lr", "train.warmup_steps",
                     "train.max_cpu_minutes", "train.save_every", "train.export_every", "train.log_every",
                     "train.seed", "train.init_weights"},
        "tumour": {"data.gamma_aug", "data.bias_aug", "train.init_weights"},
    }.items():
        other = Config.load(repo / "configs" / f"{name}.yaml").to_dict()
        changed = {f"{s}.{k}" for s in other for k in other[s] if other[s][k] != shipped[s][k]}
        assert changed == changes, name
    tumour = Config.load(repo / "configs" / "tumour.yaml")
    assert (repo / tumour.train.init_weights).is_file()


def test_the_paper_recipe_is_the_paper():
    cfg = Config.load(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    assert (cfg.model.preset, cfg.model.context_slices, cfg.model.atlas) == ("paper", 0, False)
    assert model_config_yaml(cfg).count("attention_downsample:\n  - 16\n")  # 224 / 16 = 14x14
    d = cfg.diffusion
    assert (d.prediction, d.learn_sigma, d.beta_schedule, d.beta_start, d.beta_end, d.steps) == ("eps", True, "linear", 1e-4, 0.02, 1000)
    assert (d.loss_weighting, d.terminal_fraction) == ("uniform", 0.0)
    assert (cfg.data.prior, cfg.data.mirror, cfg.data.crop_size, cfg.data.slice_size, cfg.data.atlas_gain) == ("none", False, None, 224, 0.0)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.batch_size, t.ema_rate, t.lr_schedule) == (1e-4, 0.0, 8, 0.9999, "constant")
