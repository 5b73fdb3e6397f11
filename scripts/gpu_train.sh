#!/usr/bin/env bash
# Train a recipe for a fixed few minutes on one lent GPU and bring the weights back.
#
# The GPU machine reaches nothing outside itself and receives at most 64 MiB per call (working
# tree included), so the training brains travel packed, in parts (scripts/gpu_bundle.py), one
# part per call, and are kept on the machine between calls while it stays warm:
#
#   here:    python scripts/gpu_bundle.py pack --data ../shared/data/healthy-t1 --out .gpu
#            pip download --no-deps --only-binary=:all: -d .gpu/wheels nibabel==5.4.2
#   device:  run(command="bash scripts/gpu_train.sh stage", carry=[".gpu/part1", ".gpu/manifest.json", ".gpu/wheels"])
#            run(command="bash scripts/gpu_train.sh train configs/gpu_wide.yaml 6", carry=[".gpu/part2", ".gpu/manifest.json", ".gpu/wheels"])
#
# Each call unpacks the part it was sent and prepares its brains with the masks of the CPU
# recipe (6 uniformly placed masks per subject, seed 1). `train CONFIG MINUTES` then checks that
# every packed subject is there, measures the seconds per
# step with a short run, sets train.max_steps so that the learning-rate schedule ends inside
# MINUTES, trains, and copies the exported weights, the training log and the run's parameters
# to $OUT (the device tool brings $OUT back). A recipe with the atlas (configs/gpu_wide.yaml)
# builds it from the prepared brains before its first step, in the timing run and again in the
# run (one registration per subject, about 2 CPU seconds each; MINUTES counts only the steps),
# so leave the call that much room beyond MINUTES. Score the weights here with
# `python benchmarks/validation_table.py --weights <files_at>/model.safetensors`.
#
# Environment: DEVICE (default cuda; cpu for a dry run here), BUNDLE (default .gpu), KEEP (default
# /tmp/brainpaint-gpu: what stays between calls), STEPS (skip the timing run and train this
# many steps), EXTRA (a YAML file laid over the recipe, e.g. a tiny preset for a dry run).
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=${KEEP:-/tmp/brainpaint-gpu}
BUNDLE=${BUNDLE:-.gpu}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$PWD/runs/gpu_out}
PY=${PYTHON:-python3}
mode=${1:?usage: gpu_train.sh stage | train CONFIG MINUTES}

mkdir -p "$KEEP/train" "$OUT"
if [ "$mode" != stage ] && [ "$mode" != train ]; then
    echo "error: unknown mode '$mode' (stage | train CONFIG MINUTES)" >&2; exit 2
fi
if [ "$mode" = train ]; then
    config=${2:?usage: gpu_train.sh train CONFIG MINUTES}
    minutes=${3:?usage: gpu_train.sh train CONFIG MINUTES}
    [ -f "$config" ] || { echo "error: no parameters file $config" >&2; exit 2; }
fi

# nibabel is the one dependency the GPU image lacks; the rest (torch, scipy, typer, ...) is there.
export PYTHONPATH="$PWD/project:$KEEP/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import nibabel" 2>/dev/null; then
    ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1 || { echo "error: nibabel is missing and no wheel was sent in $BUNDLE/wheels" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KEEP/site" "$BUNDLE"/wheels/*.whl
fi

# Every call prepares the brains it brought (a subject's masks depend only on the seed and the
# subject number, so part by part gives the cases one whole `prepare` would) and links them in.
start=$(date +%s)
if [ -f "$BUNDLE/manifest.json" ]; then cp "$BUNDLE/manifest.json" "$KEEP/manifest.json"; fi
call="$KEEP/call-$(date +%s%N)"
mkdir -p "$call/packed"
for f in "$BUNDLE"/part*/*.brain.npz; do
    [ -e "$f" ] || continue
    cp "$f" "$call/packed/"
done
if [ -n "$(ls "$call/packed")" ]; then
    "$PY" scripts/gpu_bundle.py unpack --packed "$call/packed" --out "$call/raw"
    "$PY" -m brainpaint prepare --input-path "$call/raw" --output-path "$call/prepared" \
        --masks-per-subject 6 --seed 1 --placement uniform --val-subjects none > "$call/prepare.log" 2>&1 \
        || { tr '\r' '\n' < "$call/prepare.log" | grep -v "^prepare: " | tail -5 >&2; exit 1; }
    for d in "$call"/prepared/train/*/; do ln -sfn "$d" "$KEEP/train/$(basename "$d")"; done
    rm -rf "$call/raw"
fi
subjects=$(ls "$KEEP/train" | sed 's/-[0-9]*$//' | sort -u | wc -l)
echo "$subjects subjects prepared in $KEEP/train ($(ls "$KEEP/train" | wc -l) cases), this call $(( $(date +%s) - start )) s"
[ "$mode" = stage ] && exit 0

[ -f "$KEEP/manifest.json" ] || { echo "error: no $BUNDLE/manifest.json was sent (carry it)" >&2; exit 2; }
expected=$("$PY" -c "import json, sys; print(len(json.load(open(sys.argv[1]))['subjects']))" "$KEEP/manifest.json")
if [ "$subjects" -ne "$expected" ]; then
    echo "error: $subjects of the $expected packed subjects are on this machine: stage every part first (a machine given back loses them)" >&2
    exit 2
fi

params="$KEEP/params.yaml"
{
    echo "extends: $PWD/$config"
    echo "data:"
    echo "  cache_dir: $KEEP/cache"
    echo "train:"
    echo "  max_cpu_minutes: null"
    echo "  device: $DEVICE"
} > "$params"
if [ -n "${EXTRA:-}" ]; then
    # Lay EXTRA over the recipe: the generated file extends it, and EXTRA's sections win.
    "$PY" - "$params" "$EXTRA" <<'EOF'
import sys, yaml
from brainpaint.config import merge_parameters
base = yaml.safe_load(open(sys.argv[1]))
over = yaml.safe_load(open(sys.argv[2])) or {}
over.pop("extends", None)
yaml.safe_dump(merge_parameters(base, over), open(sys.argv[1], "w"), sort_keys=False)
EOF
fi

train() {  # train OUTPUT MAX_STEPS MAX_MINUTES
    "$PY" -m brainpaint train --data-path "$KEEP/train" --output-path "$1" \
        --parameters-file "$params" --device "$DEVICE" --max-steps "$2" --max-minutes "$3" --no-resume
}

steps=${STEPS:-}
if [ -z "$steps" ]; then
    # Seconds per step from a short run (its first steps also fill the harmonic-fill cache).
    rm -rf "$KEEP/timing"
    train "$KEEP/timing" 60 3 > "$KEEP/timing.log" 2>&1 || { tail -20 "$KEEP/timing.log" >&2; exit 1; }
    steps=$("$PY" - "$KEEP/timing/train_log.csv" "$minutes" <<'EOF'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("loss")]
if len(rows) < 2:
    sys.exit("error: the timing run logged fewer than two steps")
a, b = rows[len(rows) // 2], rows[-1]
per_step = (float(b["time_s"]) - float(a["time_s"])) / (int(b["step"]) - int(a["step"]))
print(max(1, int(0.9 * 60 * float(sys.argv[2]) / per_step)))
EOF
)
    echo "timing run: $steps steps fit in $minutes min"
fi

# The step count sets the schedule; MINUTES (plus a margin) only guards against a slower run.
t0=$(date +%s)
rm -rf "$KEEP/run"
guard=$("$PY" -c "print(1.2 * float('$minutes') + 1)")
set +e
train "$KEEP/run" "$steps" "$guard" > "$KEEP/run.log" 2>&1
rc=$?
set -e
tr '\r' '\n' < "$KEEP/run.log" | grep -v "^train: " | tail -25
[ "$rc" -eq 0 ] && [ -f "$KEEP/run/model.safetensors" ] || { echo "error: training failed (exit $rc), see above" >&2; exit 1; }
cp "$KEEP/run/model.safetensors" "$KEEP/run/train_log.csv" "$KEEP/run/parameters.yaml" "$OUT/"
{
    echo "device: $DEVICE"
    [ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    echo "steps: $steps"
    echo "training wall seconds: $(( $(date +%s) - t0 ))"
    echo "total wall seconds: $(( $(date +%s) - start ))"
} | tee "$OUT/gpu_run.txt"
