"""Everything the network sees, for training and inference alike.

`intensity` (the metric's [0, 1] map), `harmonic` (the 3D harmonic prior), `geometry`
(in-plane windows, slice planes, midline and mirror), `atlas` (placing the population atlas on
a case and its residual), `inputs` (one volume's network inputs and a slice's conditioning),
`target` (diffusion-space target encoding and decoding), `layout` (the input channels, by name).
"""
