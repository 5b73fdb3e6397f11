"""Training data: `prepare` (cases from brains), `masks` (healthy masks), `augment`, `slices`
(training pairs), `stream` (the loader's walk over them), `atlas_build` (the population atlas)."""
