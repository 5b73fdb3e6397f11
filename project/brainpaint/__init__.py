"""brainpaint: denoising-diffusion inpainting of healthy brain tissue (BraTS 2023).

`from brainpaint import Inpainter` is the Python API (`brainpaint.api`); `brainpaint --help`
the command line (`brainpaint.cli`).
"""

__version__ = "0.1.0"

from brainpaint.api import Inpainter  # noqa: E402  (torch-free: the network loads when an Inpainter is made)

__all__ = ["Inpainter", "__version__"]
