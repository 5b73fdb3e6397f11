"""Command-line interface: a thin layer over the package (`brainpaint --help`).

`train`, `evaluate` and `export` import their modules when they run: those load torch (the
official metrics package does too), which takes seconds, while `--help`, `prepare` and the
harmonic fill of `infer` need none of it.
"""
from __future__ import annotations

import shutil
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer

from brainpaint.config.settings import Config, InferConfig, PrepareConfig, TrainConfig
from brainpaint.data.prepare import run_prepare
from brainpaint.errors import ConfigError, TrainError, one_line
from brainpaint.infer.batch import run_infer
from brainpaint.model.weights_path import WEIGHTS_ENV, default_weights

# Plain (click) help, wrapped to the terminal but at least 100 columns wide where there is no
# terminal (pipes, CI logs), so that option names and defaults are never cut off.
HELP_WIDTH = max(shutil.get_terminal_size((120, 24)).columns, 100)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings={"max_content_width": HELP_WIDTH, "terminal_width": HELP_WIDTH, "help_option_names": ["-h", "--help"]},
    help="Diffusion-model inpainting of healthy brain tissue (BraTS 2023 local synthesis).",
)

PARAMETERS_HELP = "Parameters YAML: any subset of the settings in brainpaint/config.py; options given here override it."


def _help(text: str, default) -> str:
    """Help text ending in its default the way click shows defaults."""
    return f"{text}  [default: {default}]"


def _setting(section, name: str, text: str, *names: str, shown=None):
    """An option for one setting, None unless given (so the parameters file can set it); its
    help shows the built-in default, which applies when neither sets it."""
    default = getattr(section, name) if shown is None else shown
    return typer.Option(None, *names, show_default=False, help=_help(text, default))


INFER, TRAIN, PREPARE = InferConfig(), TrainConfig(), PrepareConfig()


def _config(parameters_file: Optional[Path], overrides: dict) -> Config:
    try:
        cfg = Config.load(parameters_file)
        clean = {k: v for k, v in overrides.items() if v is not None}
        return cfg.override(clean) if clean else cfg
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)


def _parameters_option():
    return typer.Option(
        None, "--parameters-file", "--parameters_file", show_default=False, help=_help(PARAMETERS_HELP, "none, the built-in settings")
    )


@app.command()
def infer(
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="Folder of <ID>/ case folders."),
    output_path: Path = typer.Option(
        ..., "--output-path", "--output_path", help="Flat output folder for <ID>-t1n-inference.nii.gz (created)."
    ),
    parameters_file: Optional[Path] = _parameters_option(),
    weights: Optional[Path] = _setting(
        INFER, "weights", "safetensors weights: a file, or a folder holding model.safetensors.", "--weights",
        shown=f"${WEIGHTS_ENV} if set, else {default_weights()}",
    ),
    method: Optional[str] = _setting(INFER, "method", "diffusion | harmonic (classical fill, no network)."),
    sampler: Optional[str] = _setting(INFER, "sampler", "ddim | dpm2m | ddpm."),
    steps: Optional[int] = _setting(INFER, "steps", "Sampling steps (1: the conditional mean of x0/v weights; eps weights default to 16; ddpm with 1000 is the paper's path)."),
    ensemble: Optional[int] = _setting(INFER, "ensemble", "Samples averaged per case (with temperature > 0)."),
    temperature: Optional[float] = _setting(
        INFER, "temperature", "Noise scale: 0 = one deterministic fill near the conditional mean, 1 = samples."
    ),
    seed: Optional[int] = _setting(INFER, "seed", "Base seed (each case derives its own)."),
    device: Optional[str] = _setting(INFER, "device", "auto | cpu | cuda | cuda:N."),
    shard: Optional[str] = typer.Option(
        None, show_default=False,
        help=_help("i/n: process every n-th case starting at i (0-based).", "all cases (under torchrun: RANK/WORLD_SIZE)"),
    ),
    report_path: Optional[Path] = typer.Option(
        None, "--report-path", "--report_path", show_default=False,
        help=_help("Write QA PNGs (and std maps) here, outside the predictions.", "no reports"),
    ),
    overwrite: bool = typer.Option(False, help="Recompute cases whose output already exists (otherwise they are skipped)."),
    profile: bool = typer.Option(
        False, help="Add each case's stage times to its line and print a table of them at the end (stderr)."
    ),
) -> None:
    """Inpaint every case under DATA_PATH into OUTPUT_PATH/<ID>-t1n-inference.nii.gz.

    Settings: the options below, else the parameters file, else the built-in defaults shown.
    Exit status 0 when every case succeeded (warnings included), 1 when any failed on its input,
    2 when the run could not start, 3 when any case hit an internal error (a bug: its traceback
    is printed, the other cases still run).
    """
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
    code = run_infer(cfg, data_path, output_path, shard=shard, report_dir=report_path, overwrite=overwrite, profile=profile)
    raise typer.Exit(code)


@app.command()
def evaluate(
    predictions: Path = typer.Option(..., "--predictions", "--predictions_path", help="Folder of <ID>-t1n-inference.nii.gz."),
    labels: Path = typer.Option(..., "--labels", "--labels_path", help="BraTS case folders with t1n, voided and mask-healthy."),
    output_file: Path = typer.Option(..., "--output-file", "--output_file", help="Per-case CSV; a summary YAML is written beside it."),
    parameters_file: Optional[Path] = _parameters_option(),
) -> None:
    """Score predictions with the official BraTS 2023 inpainting metrics (and the stripe index)."""
    cfg = _config(parameters_file, {})
    from brainpaint.evaluate import run_evaluate  # loads torch: see the module doc

    raise typer.Exit(run_evaluate(cfg, predictions, labels, output_file))


@app.command()
def train(
    data_path: Path = typer.Option(..., "--data-path", "--data_path", help="BraTS-layout training cases."),
    output_path: Path = typer.Option(..., "--output-path", "--output_path", help="Checkpoints, logs, exported weights."),
    parameters_file: Optional[Path] = _parameters_option(),
    val_path: Optional[Path] = typer.Option(
        None, "--val-path", "--val_path", show_default=False, help=_help("Validation cases.", "no validation")
    ),
    resume: bool = typer.Option(True, help="Continue from the newest checkpoint in OUTPUT_PATH."),
    max_steps: Optional[int] = _setting(TRAIN, "max_steps", "Stop after this many steps.", "--max-steps"),
    max_minutes: Optional[float] = _setting(
        TRAIN, "max_minutes", "Stop (with a checkpoint) after this wall time.", "--max-minutes", shown="no limit"
    ),
    device: Optional[str] = _setting(TRAIN, "device", "auto | cpu | cuda | cuda:N."),
) -> None:
    """Train the diffusion model (single process, or under torchrun for DDP)."""
    cfg = _config(
        parameters_file, {"train.max_steps": max_steps, "train.max_minutes": max_minutes, "train.device": device}
    )
    from brainpaint.train.trainer import run_train  # loads torch: see the module doc

    raise typer.Exit(run_train(cfg, data_path, output_path, val_dir=val_path, resume=resume))


@app.command()
def prepare(
    input_path: Path = typer.Option(..., "--input-path", "--input_path", help="Folder of healthy skull-stripped T1 NIfTI files."),
    output_path: Path = typer.Option(..., "--output-path", "--output_path", help="Where BraTS-layout cases are written."),
    parameters_file: Optional[Path] = _parameters_option(),
    masks_per_subject: Optional[int] = _setting(PREPARE, "masks_per_subject", "Cases (tumour-shaped masks) per subject."),
    val_subjects: Optional[str] = _setting(
        PREPARE, "val_subjects", "Validation subjects: comma-separated names (sub-49,sub-50), a count N (the last N), "
        "'none', or empty for the last seventh (sub-49..sub-56 of the 56 shared brains).", shown="empty",
    ),
    seed: Optional[int] = _setting(PREPARE, "seed", "Seed of the masks."),
    placement: Optional[str] = _setting(
        PREPARE, "placement", "Mask centres: 'central' (best brain overlap of 12 candidates) or 'uniform' (any valid position)."
    ),
    image_suffix: Optional[str] = _setting(PREPARE, "image_suffix", "Input images are the files whose name ends so (e.g. _t1), also one folder down."),
    lesion_suffix: Optional[str] = _setting(
        PREPARE, "lesion_suffix", "Tumour brains: the lesion segmentation beside each image, named with this suffix instead (e.g. _seg)."
    ),
    lesion_margin: Optional[int] = _setting(PREPARE, "lesion_margin", "Voxels the voided tumour is grown by."),
) -> None:
    """Build BraTS-layout training/validation cases with tumour-shaped healthy masks."""
    options = _config(
        parameters_file,
        {
            "prepare.masks_per_subject": masks_per_subject, "prepare.val_subjects": val_subjects,
            "prepare.seed": seed, "prepare.placement": placement, "prepare.image_suffix": image_suffix,
            "prepare.lesion_suffix": lesion_suffix, "prepare.lesion_margin": lesion_margin,
        },
    ).prepare
    raise typer.Exit(
        run_prepare(
            input_path, output_path, masks_per_subject=options.masks_per_subject, val_subjects=options.val_subjects,
            seed=options.seed, placement=options.placement, image_suffix=options.image_suffix,
            lesion_suffix=options.lesion_suffix, lesion_margin=options.lesion_margin,
        )
    )


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="Training output folder or one checkpoint folder."),
    output: Path = typer.Argument(..., help="safetensors file to write (EMA weights + config metadata)."),
) -> None:
    """Export the EMA weights of a training checkpoint for inference.

    Exit status 0 when the weights were written, 1 with a one-line error otherwise.
    """
    from brainpaint.train.export import export_weights  # loads torch: see the module doc

    try:
        export_weights(checkpoint, output)
    except TrainError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(1)


def main() -> None:  # console-script entry
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a bug, not bad input: say so under its traceback, with its own status
        traceback.print_exc()
        print(f"error: internal error ({type(exc).__name__}), a bug in brainpaint: please report it with the "
              "traceback above", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
