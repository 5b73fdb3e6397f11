"""The diffusion process (`process`), sampling noise (`noise`) and the samplers (`samplers`)."""
