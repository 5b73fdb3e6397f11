"""Container entrypoint: translates MLCube/MedPerf task calls and BraTS orchestrator calls into
the brainpaint CLI.

MLCube runs the image as `mlcube.py <task> --name=/mlcube_ioN/... ...`, one option per
parameter declared in mlcube/mlcube.yaml:

    infer    --data_path=DIR --parameters_file=FILE --weights=DIR_OR_FILE --output_path=DIR
    evaluate --predictions=DIR --labels=DIR --parameters_file=FILE --output_path=FILE
    train    --data_path=DIR --parameters_file=FILE --output_path=DIR [--val_path=DIR]

The BraTS orchestrator (the `brats` package) starts algorithm containers in one of two ways:
for 2023/2024 algorithms with the same MLCube-style `infer` command line (its own mount points
/mlcube_io0..3), for 2025 and later with only `/input` and `/output` mounted and no command at
all. Without a command this entrypoint therefore runs `infer` on $BRAINPAINT_INPUT (default
/input) into $BRAINPAINT_OUTPUT (default /output), with the weights the image carries
($BRAINPAINT_WEIGHTS) and the built-in settings.

Each task becomes the matching `brainpaint` command, so the container behaves exactly like
the CLI on the host. Before that, this module makes the process independent of who runs it
and where: the container may run as any uid (often one with no home directory), its input
mounts are read-only and it has no network, so HOME, every cache and every temporary file are
pointed at a fresh private folder under the system temp directory, never at an input.
When no GPU is visible the run is switched to the CPU with a message saying so, instead of
failing on a `device: cuda` setting.
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

PROG = "brainpaint-mlcube"
# The container call without a command (BraTS orchestrator, 2025 and later): input and output
# folders, overridable for runs outside a container.
INPUT_ENV, OUTPUT_ENV = "BRAINPAINT_INPUT", "BRAINPAINT_OUTPUT"
DEFAULT_INPUT, DEFAULT_OUTPUT = "/input", "/output"

# Environment variables that tell libraries where they may write. All point into the run's
# private scratch folder so that nothing is written to $HOME, the image, or an input mount.
_CACHE_VARIABLES = {
    "XDG_CACHE_HOME": "cache",
    "XDG_CONFIG_HOME": "config",
    "TORCH_HOME": "cache/torch",
    "TORCHINDUCTOR_CACHE_DIR": "cache/torchinductor",
    "TRITON_CACHE_DIR": "cache/triton",
    "CUDA_CACHE_PATH": "cache/nv",
    "MPLCONFIGDIR": "config/matplotlib",
}


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def prepare_runtime(base: Optional[str] = None) -> Path:
    """Create the run's scratch folder and point HOME, caches and TMPDIR at it.

    `base` defaults to the system temp directory ($TMPDIR or /tmp), the one place a container
    user with an arbitrary uid can always write. The folder is removed when the process exits.
    Offline switches for libraries that would otherwise try the network are set as well.
    """
    scratch = Path(tempfile.mkdtemp(prefix="brainpaint-", dir=base))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    home = scratch / "home"
    home.mkdir()
    os.environ["HOME"] = str(home)
    for name, sub in _CACHE_VARIABLES.items():
        path = scratch / sub
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    tmp = scratch / "tmp"
    tmp.mkdir()
    os.environ["TMPDIR"] = str(tmp)
    tempfile.tempdir = str(tmp)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.dont_write_bytecode = True
    return scratch


def gpu_visible() -> bool:
    """Whether torch sees a CUDA device (false on CPU-only hosts and CPU builds of torch)."""
    # Imported here, after prepare_runtime: torch reads its cache locations when it is imported.
    import torch

    return bool(torch.cuda.is_available())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Container entrypoint of brainpaint (options as MLCube/MedPerf and the BraTS orchestrator pass them).",
        epilog=f"Without any argument: infer on ${INPUT_ENV} (default {DEFAULT_INPUT}) into ${OUTPUT_ENV} "
        f"(default {DEFAULT_OUTPUT}) with the image's weights and the built-in settings.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="{infer,evaluate,train}")

    def option(sub: argparse.ArgumentParser, name: str, required: bool, help_text: str) -> None:
        # MLCube writes --name=value with underscores; the dashed spelling is accepted too.
        sub.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, required=required, help=help_text)

    infer = tasks.add_parser("infer", help="Inpaint every case of data_path into output_path.")
    option(infer, "data_path", True, "Folder of <ID>/ case folders.")
    option(infer, "output_path", True, "Folder for <ID>-t1n-inference.nii.gz files.")
    option(infer, "parameters_file", False, "Parameters YAML (defaults when absent).")
    option(infer, "weights", False, "safetensors weights: a file, or a folder holding model.safetensors.")

    evaluate = tasks.add_parser("evaluate", help="Score predictions with the official metrics.")
    option(evaluate, "predictions", True, "Folder of <ID>-t1n-inference.nii.gz files.")
    option(evaluate, "labels", True, "Case folders with t1n, voided and mask-healthy images.")
    option(evaluate, "output_path", True, "Metrics file to write.")
    option(evaluate, "parameters_file", False, "Parameters YAML (defaults when absent).")

    train = tasks.add_parser("train", help="Train the diffusion model.")
    option(train, "data_path", True, "BraTS-layout training cases.")
    option(train, "output_path", True, "Checkpoints, logs and exported weights.")
    option(train, "parameters_file", False, "Parameters YAML (defaults when absent).")
    option(train, "val_path", False, "Validation cases.")
    return parser


def cli_arguments(args: argparse.Namespace, use_gpu: bool) -> list[str]:
    """The `brainpaint` command line equivalent to one parsed MLCube task call."""
    def pairs(*items: tuple[str, Optional[str]]) -> list[str]:
        out: list[str] = []
        for flag, value in items:
            if value is not None:
                out += [flag, value]
        return out

    if args.task == "infer":
        argv = ["infer"] + pairs(
            ("--data-path", args.data_path),
            ("--output-path", args.output_path),
            ("--parameters-file", args.parameters_file),
            ("--weights", args.weights),
        )
        # Without a visible GPU an explicit `device: cuda` setting would fail the task.
        return argv if use_gpu else argv + ["--device", "cpu"]
    if args.task == "evaluate":
        return ["evaluate"] + pairs(
            ("--predictions", args.predictions),
            ("--labels", args.labels),
            ("--output-file", args.output_path),
            ("--parameters-file", args.parameters_file),
        )
    if args.task == "train":
        argv = ["train"] + pairs(
            ("--data-path", args.data_path),
            ("--output-path", args.output_path),
            ("--parameters-file", args.parameters_file),
            ("--val-path", args.val_path),
        )
        return argv if use_gpu else argv + ["--device", "cpu"]
    raise ValueError(f"unknown task {args.task}")  # argparse already rejects these


def parse_call(argv: Sequence[str]) -> argparse.Namespace:
    """The task call: MLCube-style options, or (no arguments at all) inference from the input
    folder into the output folder, as the BraTS orchestrator starts 2025-style containers."""
    if argv:
        return _parser().parse_args(list(argv))
    data, out = os.environ.get(INPUT_ENV) or DEFAULT_INPUT, os.environ.get(OUTPUT_ENV) or DEFAULT_OUTPUT
    _say(f"no task given: inference on {data} into {out} (the input/output container contract)")
    return argparse.Namespace(task="infer", data_path=data, output_path=out, parameters_file=None, weights=None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_call(sys.argv[1:] if argv is None else argv)
    prepare_runtime()
    use_gpu = True
    if args.task in ("infer", "train"):
        use_gpu = gpu_visible()
        if use_gpu:
            import torch

            _say(f"task {args.task} on GPU {torch.cuda.get_device_name(0)}")
        else:
            _say(
                f"no GPU visible (torch.cuda.is_available() is False); running task {args.task} "
                "on the CPU, which is much slower. On a GPU host give the container the GPU "
                "(docker run --gpus=all; mlcube: platform.accelerator_count >= 1)."
            )
    cli_argv = cli_arguments(args, use_gpu)
    _say("running: brainpaint " + " ".join(cli_argv))

    from brainpaint.cli import app  # after prepare_runtime, like torch (see gpu_visible)

    try:
        app(args=cli_argv, prog_name="brainpaint", standalone_mode=True)
    except SystemExit as done:
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
