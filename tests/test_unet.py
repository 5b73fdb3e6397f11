"""The U-Net: published parameter count, shapes, presets and overrides."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from brainpaint.config.settings import Config, ModelConfig
from brainpaint.errors import ConfigError
from brainpaint.config.presets import PRESETS, resolve_architecture
from brainpaint.model.unet import AttentionBlock, build_unet, count_parameters, timestep_embedding
from brainpaint.conditioning.layout import network_channels

torch.set_num_threads(1)


def _meta_unet(preset: str, in_channels: int = 3, out_channels: int = 2, **overrides):
    """Build on the meta device: no memory is allocated, even for the paper network."""
    with torch.device("meta"):
        return build_unet(ModelConfig(preset=preset, **overrides), in_channels, out_channels)


def _tiny(in_channels: int = 3, out_channels: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_unet(ModelConfig(preset="tiny"), in_channels, out_channels)


def test_paper_preset_has_the_published_parameter_count():
    assert count_parameters(_meta_unet("paper")) == 113_672_066


def test_paper_preset_architecture():
    model = _meta_unet("paper")
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(n.num_groups == 32 for n in norms)
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert attention and all(a.num_heads == 1 for a in attention)
    assert not any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def test_paper_attention_runs_on_14x14_maps_for_224_input():
    model = _meta_unet("paper")
    seen = []
    for block in model.modules():
        if isinstance(block, AttentionBlock):
            block.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[-2:])))
    x = torch.empty(1, 3, 224, 224, device="meta")
    out = model(x, torch.zeros(1, dtype=torch.long, device="meta"))
    assert out.shape == (1, 2, 224, 224)
    # 2 attention blocks on the way down and 3 on the way up at factor 16; the middle at 32.
    assert sorted(seen) == [(7, 7)] + [(14, 14)] * 5


def test_preset_sizes():
    assert 3_500_000 <= count_parameters(_meta_unet("small")) <= 8_000_000
    assert count_parameters(_meta_unet("tiny")) < 200_000
    assert set(PRESETS) >= {"paper", "small", "tiny"}


def test_overrides_and_unknown_preset():
    arch = resolve_architecture(ModelConfig(preset="tiny", base_channels=8, channel_mult=[1, 2, 4]))
    assert arch["base_channels"] == 8 and arch["channel_mult"] == (1, 2, 4)
    assert arch["num_res_blocks"] == PRESETS["tiny"]["num_res_blocks"]
    assert count_parameters(_meta_unet("tiny", base_channels=8)) < count_parameters(_meta_unet("tiny"))
    with pytest.raises(ConfigError, match="unknown model.preset 'huge'"):
        resolve_architecture(ModelConfig(preset="huge"))


def test_network_channels():
    cfg = Config()
    assert network_channels(cfg) == (3, 2)
    cfg = Config.from_dict({"model": {"context_slices": 2}, "diffusion": {"learn_sigma": False}})
    assert network_channels(cfg) == (2 + 8 + 1, 1)


def test_tiny_forward_shapes_on_non_square_input():
    model = _tiny()
    x = torch.randn(2, 3, 64, 48)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, 2, 64, 48)
    # Zero-initialised output convolution: the untrained network predicts exactly zero.
    assert torch.count_nonzero(out) == 0


def test_output_depends_on_input_and_timestep_once_trained_away_from_zero_init():
    model = _tiny(in_channels=5, out_channels=1)
    for p in model.parameters():  # undo the zero init everywhere
        if torch.count_nonzero(p) == 0 and p.ndim > 1:
            nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 5, 32, 32)
    a = model(x, torch.tensor([10]))
    b = model(x, torch.tensor([900]))
    c = model(x + 0.5, torch.tensor([10]))
    assert a.shape == (1, 1, 32, 32)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    a.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_bad_input_is_rejected_with_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(1, 3, 33, 32), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 3 input channels, got 4"):
        model(torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long))


def test_group_norm_falls_back_to_a_divisor_of_the_channel_count():
    # base 48: skip concatenations give 144 channels, which 32 groups do not divide.
    model = _meta_unet("paper", base_channels=48, channel_mult=[1, 2, 2, 4])
    for norm in (m for m in model.modules() if isinstance(m, nn.GroupNorm)):
        assert norm.num_channels % norm.num_groups == 0
        assert norm.num_groups <= 32
    assert any(n.num_groups == 24 for n in model.modules() if isinstance(n, nn.GroupNorm))


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    # first frequency is 1: cos(5), sin(5)
    assert emb[1, 0].item() == pytest.approx(torch.cos(torch.tensor(5.0)).item(), abs=1e-6)
    assert emb[1, 4].item() == pytest.approx(torch.sin(torch.tensor(5.0)).item(), abs=1e-6)
