"""Fault-tolerant batch inference over a folder of BraTS cases.

For every case: load and validate it, run the predictor, and write exactly one
`<ID>-t1n-inference.nii.gz` flat in the output folder. The written volume is the voided input,
bit for bit, outside the mask and the prediction inside it, in the input's on-disk dtype (rounded
and clipped for integer types), with the input's affine and header.

A bad case costs one line on stderr and never stops the others; the run ends with a summary
table and a line such as "3 cases: 2 ok, 1 failed, 0 skipped". A case whose fill fell back on
something else (`Prediction.warnings`: atlas registration, solver tolerance, midline) is ok with
its warnings listed under its line, counted in the summary and written into its QA report. An
unexpected exception inside a case is a bug, not bad input: it is reported as an internal error
with its traceback, and the other cases still run. Exit status: 0 all ok, 1 some case failed
on its input, 2 the run could not start, 3 some case hit an internal error. The output folder
receives predictions only (atomic writes, no logs); it is checked up front, so an unusable
folder fails in one line before any work is done. Reports (uncertainty maps, QA PNGs) go to a
separate `report_dir`.

Sharding: with `shard="i/n"` the case folders, sorted by ID, are dealt round-robin and this run
takes those with index k % n == i, so n independent processes cover every case exactly once.
Without `shard`, a run under torchrun (RANK/WORLD_SIZE) takes shard RANK/WORLD_SIZE.

Resuming: a case whose prediction already exists is skipped (unless `overwrite`); a temporary
file left in the output folder by a killed run is removed when its case comes up again.

Overlap: while the predictor fills one case, the next case to inpaint is read and, for a
predictor with a `prepare` step (the diffusion model's harmonic fill, midline and atlas
registration), prepared in one background thread, so reading and preparing cost no time of
their own. Cases are still written one at a time, in order, each atomically.

Timing: every case's stages (`brainpaint.stages`: load, intensity, harmonic, midline,
registration, conditioning, network, write) are measured; `profile` adds them to the per-case
line and prints a table of them at the end, and a report folder gets `<ID>-stages.json`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from brainpaint.config.settings import Config
from brainpaint.errors import BatchSetupError, CaseError, InferenceSetupError, one_line
from brainpaint.infer.prediction import Prediction, Predictor
from brainpaint.infer.predictors import make_predictor
from brainpaint.infer.progress import CaseProgress, show_sampling_steps
from brainpaint.infer.report import write_qa_report
from brainpaint.io.atomic import temp_owner, write_text
from brainpaint.io.brats import CaseData, cast_to_dtype, discover_cases, load_case, prediction_name, warn, write_nifti_atomic
from brainpaint.model.weights_path import resolve_weights
from brainpaint.stages import STAGES, Stages


def case_seed(base_seed: int, case_id: str) -> int:
    """A per-case seed that is the same in every process and on every machine (unlike `hash()`,
    which is salted per process), so a case gives the same sample whichever shard runs it."""
    digest = hashlib.sha256(f"{int(base_seed)}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def parse_shard(shard: Optional[str]) -> Optional[tuple[int, int]]:
    if shard is None or shard == "":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
    if not match:
        raise BatchSetupError(f"invalid shard '{shard}': expected i/n with 0 <= i < n, e.g. 0/4")
    i, n = int(match.group(1)), int(match.group(2))
    if n < 1 or i >= n:
        raise BatchSetupError(f"invalid shard '{shard}': expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


def shard_from_environment() -> Optional[str]:
    """Under torchrun (RANK/WORLD_SIZE set, more than one process) each rank takes its shard."""
    world, rank = os.environ.get("WORLD_SIZE"), os.environ.get("RANK")
    if world and rank and world.strip() not in ("", "1"):
        return f"{rank.strip()}/{world.strip()}"
    return None


def in_shard(index: int, shard: Optional[tuple[int, int]]) -> bool:
    return shard is None or index % shard[1] == shard[0]


def check_output_dir(out_dir: Path) -> None:
    """Create the output folder if needed and prove it is writable, in one clear line if not.

    Besides `os.access`, a probe file is created and removed: permissions are not the whole story
    (read-only mounts, a file where a parent folder should be, running as root)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BatchSetupError(f"output folder {out_dir} cannot be created: a file is in the way")
    except OSError as exc:
        raise BatchSetupError(f"output folder {out_dir} cannot be created: {exc.strerror or exc}")
    if not out_dir.is_dir():
        raise BatchSetupError(f"output folder {out_dir} is not a folder")
    if not os.access(out_dir, os.R_OK | os.W_OK | os.X_OK):
        raise BatchSetupError(f"output folder {out_dir} is not readable and writable")
    try:
        fd, probe = tempfile.mkstemp(prefix=".brainpaint-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BatchSetupError(f"output folder {out_dir} is not writable: {exc.strerror or exc}")


def remove_stale_temporaries(out_dir: Path, case_id: str) -> None:
    """Delete temporary files that a killed earlier run left for this case.

    Temporaries are recognised by the naming of `atomic.atomic_write`. Only this run's cases are
    touched (shards never share a case), and a file whose writer process is still alive on this
    machine is left alone."""
    name = prediction_name(case_id)
    for path in out_dir.glob(f".{glob.escape(name)}*"):
        pid = temp_owner(path, name)
        if pid is None or (pid != os.getpid() and _process_alive(pid)):
            continue
        with contextlib.suppress(OSError):
            path.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def compose_output(data: CaseData, prediction: Prediction) -> np.ndarray:
    """The voided image exactly outside the mask, the prediction inside, in the on-disk dtype."""
    volume = np.asarray(prediction.volume)
    if volume.shape != data.mask.shape:
        raise CaseError(data.id, f"predictor returned shape {volume.shape}, expected {data.mask.shape}")
    inside = volume[data.mask]
    if not np.all(np.isfinite(inside)):
        raise CaseError(data.id, "predictor returned NaN/Inf inside the mask")
    base = data.voided_disk if data.voided_disk is not None else cast_to_dtype(data.voided, data.dtype)
    output = np.array(base, dtype=data.dtype, copy=True)
    output[data.mask] = cast_to_dtype(inside, data.dtype)
    return output


def _write_reports(data: CaseData, output: np.ndarray, prediction: Prediction, report_dir: Path) -> None:
    """Uncertainty map and QA picture (with the case's warnings); a file system error here is
    only a warning, the prediction is still written."""
    try:
        report_dir.mkdir(parents=True, exist_ok=True)
        if prediction.std is not None:
            write_nifti_atomic(prediction.std, data.header, data.affine, report_dir / f"{data.id}-std.nii.gz", np.float32)
        write_qa_report(data, output, report_dir / f"{data.id}-qa.png", prediction.warnings)
    except OSError as exc:
        warn(f"{data.id}: report not written: {type(exc).__name__}: {one_line(exc)}")


OK, FAILED, INTERNAL, SKIPPED = "ok", "failed", "internal", "skipped"
EXIT_FAILED, EXIT_SETUP, EXIT_INTERNAL = 1, 2, 3


@dataclass
class CaseRow:
    """How one case of a run ended: status OK, FAILED (its input), INTERNAL (a bug) or SKIPPED."""

    id: str
    status: str
    seconds: float = 0.0
    slices: int = 0
    warnings: list[str] = field(default_factory=list)
    problem: str = ""  # FAILED, INTERNAL: one line
    traceback: str = ""  # INTERNAL
    stages: Optional[Stages] = None  # OK: where its seconds went


def _write_stages(case_id: str, stages: Stages, report_dir: Path) -> None:
    """`<ID>-stages.json` in the report folder: the case's stage seconds and counts."""
    try:
        write_text(report_dir / f"{case_id}-stages.json", json.dumps(stages.as_dict(), indent=1) + "\n")
    except OSError as exc:
        warn(f"{case_id}: stage times not written: {one_line(exc)}")


def print_summary(rows: list[CaseRow], stream=None) -> None:
    stream = stream or sys.stderr
    if rows:
        width = max(len("case"), *(len(r.id) for r in rows))
        print(f"{'case':<{width}}  {'status':<8}  {'seconds':>8}  {'slices':>6}  {'warnings':>8}", file=stream)
        for r in rows:
            print(f"{r.id:<{width}}  {r.status:<8}  {r.seconds:>8.1f}  {r.slices:>6d}  {len(r.warnings):>8d}", file=stream)
    count = lambda status: sum(1 for r in rows if r.status == status)  # noqa: E731
    warned = sum(1 for r in rows if r.warnings)
    internal = count(INTERNAL)
    print(
        f"{len(rows)} cases: {count(OK)} ok" + (f" ({warned} with warnings)" if warned else "")
        + f", {count(FAILED)} failed" + (f", {internal} internal error{'s' * (internal > 1)}" if internal else "")
        + f", {count(SKIPPED)} skipped",
        file=stream,
    )


def exit_status(rows: list[CaseRow]) -> int:
    """3 when some case hit an internal error, else 1 when some case failed, else 0."""
    statuses = {r.status for r in rows}
    return EXIT_INTERNAL if INTERNAL in statuses else EXIT_FAILED if FAILED in statuses else 0


def print_stage_table(stages: dict[str, Stages], wall: float, stream=None) -> None:
    """The stage seconds of every case that ran (one row each, `other` the rest of its seconds),
    their medians, and the run's wall time per case (cases overlap: see the module doc)."""
    stream = stream or sys.stderr
    if not stages:
        return
    seen = [name for st in stages.values() for name in st.names()]
    names = [s for s in STAGES if s in seen] + list(dict.fromkeys(s for s in seen if s not in STAGES)) + ["total"]
    width = max(len("case"), *(len(c) for c in stages))
    print(f"{'case':<{width}}  " + "  ".join(f"{n:>12}" for n in names) + "  windows  passes", file=stream)
    table = {cid: [st.seconds.get(n, 0.0) for n in names[:-1]] + [sum(st.seconds.values())] for cid, st in stages.items()}
    for cid, row in table.items():
        counts = stages[cid].counts
        print(f"{cid:<{width}}  " + "  ".join(f"{v:>12.2f}" for v in row)
              + f"  {counts.get('windows', 0):>7d}  {counts.get('passes', 0):>6d}", file=stream)
    median = np.median(np.array(list(table.values())), axis=0)
    print(f"{'median':<{width}}  " + "  ".join(f"{v:>12.2f}" for v in median), file=stream)
    print(f"{len(stages)} cases inpainted in {wall:.1f} s wall, {wall / len(stages):.2f} s per case", file=stream)


def run_infer(
    cfg: Config,
    data_dir: str | Path,
    out_dir: str | Path,
    shard: Optional[str] = None,
    report_dir: Optional[str | Path] = None,
    overwrite: bool = False,
    predictor: Optional[Predictor] = None,
    profile: bool = False,
) -> int:
    """Inpaint every case under `data_dir` into `out_dir`; returns the process exit code
    (0 all good, 1 some case failed on its input, 2 the run could not start, 3 some case hit an
    internal error). `predictor` overrides `make_predictor(cfg)` (tests, custom methods);
    `profile` prints every case's stage times.

    Everything that can stop the whole run is checked before the output folder is created or
    touched: the shard, the data folder, and the predictor (weights, device), which is built
    only when some case is left to do. Then one or two lines say which settings run."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    try:
        entries = _entries(data_dir, out_dir, shard, report_dir)
        todo = [case for _, case in entries if not isinstance(case, CaseError) and (overwrite or not _done(out_dir, case.id))]
        if todo and predictor is None:
            predictor = _setup_predictor(cfg)
        check_output_dir(out_dir)
    except (BatchSetupError, InferenceSetupError, OSError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return EXIT_SETUP
    for line in settings_lines(cfg, predictor if todo else None):
        print(line, file=sys.stderr)
    start = time.perf_counter()
    with CaseProgress(len(entries), "infer") as progress:
        if todo and progress.enabled:
            show_sampling_steps(predictor)
        rows = _run_cases(entries, {case.id for case in todo}, predictor, cfg.infer.seed, out_dir, report_dir,
                          progress, profile)
    rows.sort(key=lambda r: r.id)
    if profile:
        print_stage_table({r.id: r.stages for r in rows if r.status == OK}, time.perf_counter() - start)
    print_summary(rows)
    return exit_status(rows)


def _done(out_dir: Path, case_id: str) -> bool:
    return (out_dir / prediction_name(case_id)).exists()


def _setup_predictor(cfg: Config) -> Predictor:
    """`make_predictor(cfg)`; a missing package or unreadable file as one InferenceSetupError line
    naming the method (weights and device problems are InferenceSetupErrors already)."""
    if cfg.infer.method == "diffusion":
        resolve_weights(cfg.infer.weights)  # a missing file is named before torch loads
    try:
        return make_predictor(cfg)
    except (ImportError, OSError) as exc:
        raise InferenceSetupError(f"cannot set up infer.method '{cfg.infer.method}': {one_line(exc)}") from exc


def settings_lines(cfg: Config, predictor: Optional[Predictor]) -> list[str]:
    """What runs, in one or two lines: the sampler settings, then the device and weights file
    of the predictor that was built (none is built when every case is already done)."""
    inf = getattr(predictor, "infer", None) or cfg.infer  # what the predictor runs (eps weights: more steps)
    if inf.method == "harmonic":
        return ["infer: method harmonic (classical 3D fill, no network), device cpu"]
    lines = [
        f"infer: method diffusion, sampler {inf.sampler}, {inf.steps} steps, eta {inf.eta:g}, "
        f"temperature {inf.temperature:g}, ensemble {inf.ensemble}, "
        + (f"filter sigma {inf.smoothing_sigma:g}" if inf.smoothing_sigma > 0 else "no filter")
        + f", seed {inf.seed}"
    ]
    device, weights = getattr(predictor, "device", None), getattr(predictor, "weights", None)
    if device is not None and weights is not None:
        lines.append(f"infer: device {device}, weights {weights}")
    return lines


def _entries(data_dir: Path, out_dir: Path, shard: Optional[str], report_dir) -> list[tuple[str, object]]:
    """(case id, Case or CaseError) of this shard, sorted; BatchSetupError/OSError when the run cannot start."""
    if shard is None:
        shard = shard_from_environment()
    shard_ix = parse_shard(shard)
    cases, errors = discover_cases(data_dir, labels=False)
    if report_dir is not None and Path(report_dir).resolve() == out_dir.resolve():
        raise BatchSetupError("the report folder must differ from the output folder (predictions only there)")
    # Bad folders take part in the sharding like good ones, so each is reported by one shard.
    entries = sorted([(c.id, c) for c in cases] + [(e.case_id, e) for e in errors], key=lambda item: item[0])
    entries = [item for k, item in enumerate(entries) if in_shard(k, shard_ix)]
    if not entries:
        print(f"warning: no cases found in {data_dir}" + (f" for shard {shard}" if shard else ""), file=sys.stderr)
    return entries


def _load_and_prepare(case, predictor) -> tuple[CaseData, object, Stages, float]:
    """Read a case and, if the predictor has a `prepare` step, prepare it: the prefetch
    thread's work. Returns (data, prepared or None, the load stage's time, wall seconds)."""
    start, stages = time.perf_counter(), Stages()
    with stages.time("load"):
        data = load_case(case)
    prepare = getattr(predictor, "prepare", None)
    prepared = prepare(data) if prepare is not None else None
    return data, prepared, stages, time.perf_counter() - start


def _run_cases(entries, todo: set, predictor, seed: int, out_dir: Path, report_dir, progress: CaseProgress,
               profile: bool) -> list[CaseRow]:
    """Every entry of the run, in order. While a case is filled, the next one is read and
    prepared in a background thread."""
    ahead = [item for case_id, item in entries if case_id in todo]
    fetched: dict[str, Optional[Future]] = {}
    rows = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainpaint-prefetch")
    try:
        for case_id, item in entries:
            if case_id in todo:  # this case (unless already under way) and the next
                n = ahead.index(item)
                for later in ahead[n : n + 2]:
                    if later.id not in fetched:
                        fetched[later.id] = pool.submit(_load_and_prepare, later, predictor)
            future = fetched[case_id] if case_id in todo else None
            rows.append(_case_row(case_id, item, future, predictor, seed, out_dir, report_dir, progress, profile))
            fetched[case_id] = None  # done: let its data go
    finally:  # an interrupted run does not wait for cases it will not fill
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def _case_row(case_id: str, item, fetched: Optional[Future], predictor, seed: int, out_dir: Path, report_dir,
              progress: CaseProgress, profile: bool) -> CaseRow:
    """One entry of the run: a bad case folder, a finished case to skip, or a case to inpaint
    (`fetched`: its `_load_and_prepare`, under way)."""
    remove_stale_temporaries(out_dir, case_id)
    if isinstance(item, CaseError):
        progress.finished(f"error: {item}")
        return CaseRow(case_id, FAILED)
    if fetched is None:
        progress.finished(f"{case_id}: {prediction_name(case_id)} exists, skipped (use --overwrite to recompute)")
        return CaseRow(case_id, SKIPPED)
    row = _run_case(item, fetched, predictor, seed, out_dir, report_dir)
    if row.status == OK:
        count = len(row.warnings)
        warned = f", {count} warning{'s' * (count > 1)}" if count else ""
        timed = f"; {row.stages.line()}" if profile and row.stages is not None else ""
        progress.finished(f"{case_id}: ok ({row.seconds:.1f} s, {row.slices} slices{warned}){timed}")
        for line in row.warnings:
            progress.say(f"warning: {case_id}: {line}")
    elif row.status == FAILED:
        progress.finished(f"error: {case_id}: {row.problem}")
    else:
        progress.finished(f"error: {case_id}: internal error, not a problem of the input: {row.problem}")
        progress.say(row.traceback)  # for a bug report
    return row


def _run_case(case, fetched: Future, predictor: Predictor, seed: int, out_dir: Path, report_dir) -> CaseRow:
    """Predict, compose and write one case. Its input's problems (CaseError, and OSError such
    as a full disk) fail the case in one line; any other exception is an internal error, with
    its traceback. The prediction is written last, so a case that fails leaves none. Its
    seconds are its own: reading and preparing it (in the background) and the rest."""
    start, before = time.perf_counter(), 0.0
    try:
        data, prepared, stages, before = fetched.result()
        start = time.perf_counter()
        seed = case_seed(seed, case.id)
        prediction = predictor(data, seed) if prepared is None else predictor(data, seed, prepared)
        if prediction.stages is not None:
            stages.merge(prediction.stages)
        with stages.time("write"):
            output = compose_output(data, prediction)
        if report_dir is not None:
            with stages.time("report"):
                _write_reports(data, output, prediction, Path(report_dir))
            _write_stages(data.id, stages, Path(report_dir))
        with stages.time("write"):
            write_nifti_atomic(output, data.header, data.affine, out_dir / prediction_name(case.id), data.dtype)
        return CaseRow(case.id, OK, before + time.perf_counter() - start, int(prediction.slices),
                       list(prediction.warnings), stages=stages)
    except CaseError as exc:
        return CaseRow(case.id, FAILED, before + time.perf_counter() - start, problem=exc.problem)
    except OSError as exc:
        return CaseRow(case.id, FAILED, before + time.perf_counter() - start,
                       problem=f"{type(exc).__name__}: {one_line(exc)}")
    except Exception as exc:  # a bug: reported as one, with its traceback; the other cases still run
        return CaseRow(case.id, INTERNAL, before + time.perf_counter() - start,
                       problem=f"{type(exc).__name__}: {one_line(exc)}", traceback=traceback.format_exc().rstrip())
