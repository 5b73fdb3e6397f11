"""Command-line interface: a thin layer over the package (`brainpaint --help`).

`train`, `evaluate` and `export` import their modules when they run: those load torch (the
official metrics package does too), which takes seconds, while `--help`, `prepare` and the
harmonic fill of `infer` need none of it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .batch import run_infer
from .config import Config
from .errors import ConfigError
from .prepare import run_prepare

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Diffusion-model inpainting of healthy brain tissue (BraTS 2023 local synthesis).",
)


def _config(parameters_file: Optional[Path], overrides: dict) -> Config:
    try:
        cfg = Config.load(parameters_file)
        clean = {k: v for k, v in overrides.items() if v is not None}
        return cfg.override(clean) if clean else cfg
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


@app.command()
def infer(
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="Folder of <ID>/ case folders."),
    output_path: Path = typer.Option(..., "--output-path", "--output_path", help="Flat output folder."),
    parameters_file: Optional[Path] = typer.Option(None, "--parameters-file", "--parameters_file"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="safetensors weights (file or folder)."),
    method: Optional[str] = typer.Option(None, help="diffusion | harmonic"),
    sampler: Optional[str] = typer.Option(None, help="ddim | dpm2m | ddpm"),
    steps: Optional[int] = typer.Option(None, help="Sampling steps."),
    ensemble: Optional[int] = typer.Option(None, help="Samples averaged per case."),
    temperature: Optional[float] = typer.Option(
        None, help="Noise scale: 0 = one deterministic fill near the conditional mean, 1 = samples."
    ),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    shard: Optional[str] = typer.Option(None, help="i/n: process every n-th case starting at i (0-based)."),
    report_path: Optional[Path] = typer.Option(
        None, "--report-path", "--report_path", help="Write QA PNGs (and std maps) here, outside the predictions."
    ),
    overwrite: bool = typer.Option(False, help="Recompute cases whose output already exists."),
) -> None:
    """Inpaint every case under DATA_PATH into OUTPUT_PATH/<ID>-t1n-inference.nii.gz."""
    cfg = _config(
        parameters_file,
        {
            "infer.method": method,
            "infer.sampler": sampler,
            "infer.steps": steps,
            "infer.ensemble": ensemble,
            "infer.temperature": temperature,
            "infer.seed": seed,
            "infer.device": device,
            "infer.weights": str(weights) if weights else None,
        },
    )
    code = run_infer(cfg, data_path, output_path, shard=shard, report_dir=report_path, overwrite=overwrite)
    raise typer.Exit(code)


@app.command()
def evaluate(
    predictions: Path = typer.Option(..., "--predictions", "--predictions_path", help="Folder of <ID>-t1n-inference.nii.gz."),
    labels: Path = typer.Option(..., "--labels", "--labels_path", help="BraTS case folders with t1n, voided and mask-healthy."),
    output_file: Path = typer.Option(..., "--output-file", "--output_file", help="Per-case CSV; a summary YAML is written beside it."),
    parameters_file: Optional[Path] = typer.Option(None, "--parameters-file", "--parameters_file"),
) -> None:
    """Score predictions with the official BraTS 2023 inpainting metrics."""
    cfg = _config(parameters_file, {})
    from .evaluate import run_evaluate  # loads torch: see the module doc

    raise typer.Exit(run_evaluate(cfg, predictions, labels, output_file))


@app.command()
def train(
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="BraTS-layout training cases."),
    output_path: Path = typer.Option(..., "--output-path", "--output_path", help="Checkpoints, logs, exported weights."),
    parameters_file: Optional[Path] = typer.Option(None, "--parameters-file", "--parameters_file"),
    val_path: Optional[Path] = typer.Option(None, "--val-path", "--val_path", help="Validation cases (optional)."),
    resume: bool = typer.Option(True, help="Continue from the newest checkpoint in OUTPUT_PATH."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Train the diffusion model (single process, or under torchrun for DDP)."""
    cfg = _config(
        parameters_file, {"train.max_steps": max_steps, "train.max_minutes": max_minutes, "train.device": device}
    )
    from .train import run_train  # loads torch: see the module doc

    raise typer.Exit(run_train(cfg, data_path, output_path, val_dir=val_path, resume=resume))


@app.command()
def prepare(
    input_path: Path = typer.Option(..., "--input-path", "--input_path", help="Folder of healthy skull-stripped T1 NIfTI files."),
    output_path: Path = typer.Option(..., "--output-path", "--output_path", help="Where BraTS-layout cases are written."),
    parameters_file: Optional[Path] = typer.Option(None, "--parameters-file", "--parameters_file", help="Its prepare section."),
    masks_per_subject: Optional[int] = typer.Option(None, help="Cases (masks) per subject (default 1)."),
    val_subjects: Optional[str] = typer.Option(
        None,
        help="Validation subjects: comma-separated names (sub-49,sub-50), a count N (the last N), 'none', "
        "or empty for the last seventh (sub-49..sub-56 of the 56 shared brains).",
    ),
    seed: Optional[int] = typer.Option(None),
) -> None:
    """Build BraTS-layout training/validation cases with tumour-shaped healthy masks."""
    options = _config(
        parameters_file,
        {"prepare.masks_per_subject": masks_per_subject, "prepare.val_subjects": val_subjects, "prepare.seed": seed},
    ).prepare
    raise typer.Exit(
        run_prepare(
            input_path, output_path, masks_per_subject=options.masks_per_subject, val_subjects=options.val_subjects,
            seed=options.seed,
        )
    )


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Training output folder or one checkpoint folder."),
    output: Path = typer.Argument(..., help="safetensors file to write (EMA weights + config metadata)."),
) -> None:
    """Export the EMA weights of a training checkpoint for inference."""
    from .weights import export_weights  # loads torch: see the module doc

    export_weights(checkpoint, output)


def main() -> None:  # console-script entry
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
