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
        ("infer", {"repaint": "yes"}, "infer.repaint must be true or false, got 'yes'"),
        ("infer", {"noise_correlation": 2}, r"infer.noise_correlation must be in \[0, 1\], got 2.0"),
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
    assert (infer.noise_correlation, infer.batch_slices, infer.device, infer.seed) == (0.0, 8, "auto", 0)


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


def test_the_fine_tune_recipe_is_the_base_recipe_plus_its_changes():
    configs = Path(__file__).resolve().parents[1] / "configs"
    base = Config.load(configs / "x0_mirror.yaml").to_dict()
    tune = Config.load(configs / "x0_mirror_ft.yaml").to_dict()
    changed = {
        f"{section}.{key}"
        for section, values in tune.items()
        for key, value in values.items()
        if base[section][key] != value
    }
    assert changed == {"diffusion.terminal_fraction", "train.lr_schedule", "train.warmup_steps",
                       "train.init_weights", "train.max_cpu_minutes"}


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


def test_the_shipped_weights_compute_what_the_last_recipe_stage_describes():
    repo = Path(__file__).resolve().parents[1]
    saved = yaml.safe_load(read_metadata(repo / "workspace" / "additional_files" / "model.safetensors")["config"])
    recipe = Config.load(repo / "configs" / "x0_ctx2rg.yaml")
    assert recipe.model.context_slices == 2 and recipe.train.init_weights == "runs/x0_ctx2r0/model.safetensors"
    assert recipe.model.atlas and recipe.data.atlas_gain == 1.0 and recipe.data.atlas_fit == "affine"
    expected = yaml.safe_load(model_config_yaml(recipe))
    # Settings added after the weights were exported are absent from their metadata; loading
    # gives them their defaults, which must be what the recipe says.
    newer = [(s, k) for s in expected for k in expected[s] if k not in (saved.get(s) or {})]
    assert newer == []
    for s, k in newer:
        assert expected[s].pop(k) == Config().to_dict()[s][k]
    assert saved == expected
