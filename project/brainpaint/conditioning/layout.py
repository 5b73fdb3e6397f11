"""The network's input channels, by name: the one definition of what the network sees, in order.

`InputLayout.of(cfg)` lists the channels a configuration gives the network: the voided slice
`b` (prior-filled) and its mask `m`; with `data.mirror` their mirror images about the midline
(`b~`, `m~`); with `model.context_slices` k the neighbouring slices' `b`/`m` by distance
(`b-1`, `m-1`, `b+1`, `m+1`, ...); with `model.atlas` the atlas residual (`atlas`); last the
noisy target `x_t`. `build` cuts one slice's conditioning (every channel but `x_t`) out of a
volume's inputs in that order, for training, the training preview and inference alike;
`index` answers where a channel is; warm starts match input weights by these names
(`model.unet.widen_input_conv`), so a network that grows keeps its channels' weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from brainpaint.conditioning.geometry import crop, mirror_x

X_T = "x_t"


@dataclass(frozen=True)
class InputLayout:
    mirror: bool = False
    context_slices: int = 0
    atlas: bool = False

    @classmethod
    def of(cls, cfg) -> "InputLayout":
        """The layout of a full Config (`data.mirror`, `model.context_slices`, `model.atlas`)."""
        return cls(bool(cfg.data.mirror), int(cfg.model.context_slices), bool(cfg.model.atlas))

    @property
    def conditioning(self) -> list[str]:
        """Names of the conditioning channels in order (every input but `x_t`)."""
        names = ["b", "m"] + (["b~", "m~"] if self.mirror else [])
        for k in range(1, self.context_slices + 1):
            names += [f"b-{k}", f"m-{k}", f"b+{k}", f"m+{k}"]
        return names + (["atlas"] if self.atlas else [])

    @property
    def names(self) -> list[str]:
        """Names of all input channels in order: the conditioning, then `x_t`."""
        return self.conditioning + [X_T]

    def index(self, name: str) -> int:
        """Position of channel `name` among the inputs (ValueError for a channel it lacks)."""
        return self.names.index(name)

    def image_channels(self) -> list[str]:
        """The conditioning channels that are MR images (b and its mirror and neighbours), not masks or the atlas."""
        return [n for n in self.conditioning if n.startswith("b")]

    def build(self, vin, z: int, box) -> np.ndarray:
        """Conditioning of slice z of `vin` (`conditioning.inputs.VolumeInputs`), cropped to `box`:
        [C, H, W] float32 in the order of `conditioning`. Neighbours beyond the volume edge are
        zeros; the mirrored channels use `vin.mirror_shift`."""
        if self.mirror != (vin.mirror_shift is not None) or self.atlas != (vin.atlas is not None):
            raise ValueError(f"volume inputs do not match the layout {self.conditioning}")
        depth = vin.b.shape[2]
        shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        channels = []
        for name in self.conditioning:
            source = vin.b if name[0] == "b" else vin.mask
            if name == "atlas":
                channels.append(crop(vin.atlas[:, :, z], box))
            elif name.endswith("~"):
                channels.append(crop(mirror_x(source[:, :, z], vin.mirror_shift), box))
            else:
                zz = z + (int(name[1:]) if len(name) > 1 else 0)
                channels.append(crop(source[:, :, zz], box) if 0 <= zz < depth else np.zeros(shape, np.float32))
        return np.stack(channels).astype(np.float32, copy=False)


def network_channels(cfg) -> tuple[int, int]:
    """(in, out) channels of the network of a full Config: the input layout's channels, and the
    prediction (eps, x0 or v) plus the variance interpolation when the variance is learned."""
    return len(InputLayout.of(cfg).names), 2 if cfg.diffusion.learn_sigma else 1
