"""Guided-diffusion-style U-Net for 2D slice inpainting, configured by named presets.

The architecture follows the ablated diffusion U-Net of Dhariwal & Nichol (2021) as used by the
BraTS 2023 local-synthesis DDPM: a sinusoidal timestep embedding fed through a 2-layer MLP,
residual blocks (GroupNorm + SiLU + 3x3 conv, embedding added between the two convs), self
attention at chosen downsampling factors, a res-attn-res middle block (optionally followed by
more res-attn pairs, ``extra_middle_blocks``), skip connections by
concatenation, and zero-initialised output convolutions so every residual branch starts as the
identity. Down/upsampling is a strided 3x3 conv / nearest upsample + 3x3 conv
("conv_resample"), not residual up/down blocks.

Presets:
- ``paper``: the published network (113,672,066 parameters with 3 input and 2 output
  channels), meant for GPU training on 224x224 slices.
- ``small``: a few million parameters, for a CPU-trainable demonstration model on crops.
- ``tiny``: under 200k parameters, for unit tests.

Input channels are ``[b, m, (context b's and m's), x_t]`` (see `conditioning.layout.InputLayout`); the
output is ``[eps]`` or ``[eps, v]`` where ``v`` interpolates the log variance (learned range).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from brainpaint.conditioning.atlas import ATLAS_SHAPE

# The architecture description lives in a torch-free module (the configuration checks it).
from brainpaint.config.presets import resolve_architecture

INPUT_CONV = "input_blocks.0.0.weight"  # state-dict key of the first convolution, [C, in, k, k]


def widen_input_conv(weight: torch.Tensor, before: list[str], after: list[str]) -> torch.Tensor:
    """The first convolution of a network with more inputs (`InputLayout.names` `after`), from one
    with fewer (`before`).

    More context slices or the atlas residual add conditioning channels: the channels both
    networks have keep their weights, matched by name, and the new ones start at zero, so the
    wider network computes exactly the function of the narrower one until it learns to use its
    new inputs (a 2D model warm-starts a 2.5D one).
    """
    if weight.shape[1] != len(before):
        raise ValueError(f"the input convolution has {weight.shape[1]} channels, the layout {len(before)}")
    out = weight.new_zeros((weight.shape[0], len(after), *weight.shape[2:]))
    for i, name in enumerate(after):
        if name in before:
            out[:, i] = weight[:, before.index(name)]
    return out


def build_unet(model_cfg, in_channels: int, out_channels: int) -> "UNet":
    """Build the U-Net described by ``model_cfg`` (preset plus overrides)."""
    net = UNet(in_channels=in_channels, out_channels=out_channels, **resolve_architecture(model_cfg))
    if getattr(model_cfg, "atlas", False):
        # The population atlas (brainpaint.atlas) the atlas channel is computed from. Not used
        # by forward(): a buffer, so that checkpoints and weights files carry it.
        net.register_buffer("atlas", torch.zeros(ATLAS_SHAPE))
    return net


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (works for models on the meta device, too)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- building blocks
def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, or the largest divisor of `channels` below it."""
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return _GroupNormFP32(g, channels)


class _GroupNormFP32(nn.GroupNorm):
    """GroupNorm computed in float32 so bf16 activations keep accurate statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: residual branches then start as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of integer timesteps (cosines then sines)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=1)
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Multi-head self attention over all spatial positions (QKV and output by 1x1 conv)."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.reshape(b, c, h * w)
        qkv = self.qkv(self.norm(flat))  # [B, 3C, T]
        # [B, 3C, T] -> 3 x [B, heads, T, C/heads]
        q, k, v = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, C/heads]
        out = out.permute(0, 1, 3, 2).reshape(b, c, h * w)
        return (flat + self.proj_out(out)).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve the resolution with a strided 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour) followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Step(nn.ModuleList):
    """A sequence of layers where ResBlocks also receive the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


# --------------------------------------------------------------------------- the network
class UNet(nn.Module):
    """The diffusion U-Net; ``forward(x [B,C,H,W], t [B]) -> [B,out,H,W]``.

    H and W must be divisible by ``2 ** (len(channel_mult) - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_downsample: tuple[int, ...],
        num_heads: int,
        dropout: float,
        norm_groups: int,
        extra_middle_blocks: int = 0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        emb_channels = 4 * base_channels
        g = norm_groups

        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))

        ch = base_channels
        self.input_blocks = nn.ModuleList([_Step([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_channels, mult * base_channels, dropout, g)]
                ch = mult * base_channels
                if ds in attention_downsample:
                    layers.append(AttentionBlock(ch, num_heads, g))
                self.input_blocks.append(_Step(layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(_Step([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        middle = [ResBlock(ch, emb_channels, ch, dropout, g), AttentionBlock(ch, num_heads, g)]
        middle.append(ResBlock(ch, emb_channels, ch, dropout, g))
        for _ in range(extra_middle_blocks):  # identity at initialisation (zeroed output layers)
            middle += [ResBlock(ch, emb_channels, ch, dropout, g), AttentionBlock(ch, num_heads, g)]
        self.middle_block = _Step(middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_channels, mult * base_channels, dropout, g)]
                ch = mult * base_channels
                if ds in attention_downsample:
                    layers.append(AttentionBlock(ch, num_heads, g))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(_Step(layers))

        self.out = nn.Sequential(_norm(ch, g), nn.SiLU(), _zero(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"the network expects {self.in_channels} input channels, got {x.shape[1]}")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is not divisible by {f}")
        emb = self.time_embed(timestep_embedding(t, self.base_channels).to(x.dtype))
        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).type(x.dtype)
