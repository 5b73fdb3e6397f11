#!/usr/bin/env bash
# A fresh `pip install .` (and `pip install -e .`) gives a working `brainpaint` command.
#
# In a new virtual environment outside the checkout: torch first, at the version requirements.txt
# pins (so a local wheel, e.g. a CPU build, is used when pip can find one), then the package
# with the dependencies pyproject.toml declares; then, from a folder outside the checkout,
# `brainpaint --help`, `python -c "from brainpaint import Inpainter"` and
# `brainpaint infer --method harmonic` on a tiny synthetic case, whose output is checked. The
# same again after `pip install -e .`. The checkout is never written to (the package is built
# from a copy). Needs the package registries (or a local wheel folder pip is configured with).
# Prints PASS or FAIL last; exit status 0 only on PASS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=$(mktemp -d /tmp/brainpaint-install.XXXXXX)
START=$(date +%s)
log() { printf '[install %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
cleanup() {
    local status=$?
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then log "PASS: pip install . and -e . give a working brainpaint"; else log "FAIL (exit $status)"; fi
}
trap cleanup EXIT

mkdir -p "$WORK/src/project"
cp -a "$REPO/pyproject.toml" "$WORK/src/"
cp -a "$REPO/project/brainpaint" "$WORK/src/project/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +

log "new virtual environment ($("$PYTHON" --version))"
"$PYTHON" -m venv "$WORK/venv"
BIN=$WORK/venv/bin
TORCH=$(grep -E '^torch==' "$REPO/requirements.txt")
log "pip install $TORCH"
"$BIN/pip" install -q "$TORCH" 2> >(grep -v "is ignored: it is neither" >&2) || fail "pip install $TORCH"

# A tiny case, made with the fresh environment's own numpy/nibabel/scipy (tests/synth.py only).
PYTHONPATH=$REPO/tests  # synth.py; the package itself must come from the installed copy

check_installed() {
    local how=$1
    cd "$WORK"
    [ "$("$BIN/python" -c 'import brainpaint, os; print(os.path.dirname(brainpaint.__file__))')" != "$REPO/project/brainpaint" ] \
        || fail "$how: brainpaint imported from the checkout, not the installed copy"
    "$BIN/brainpaint" --help >/dev/null || fail "$how: brainpaint --help"
    "$BIN/python" -c "from brainpaint import Inpainter" || fail "$how: from brainpaint import Inpainter"
    rm -rf "$WORK/data" "$WORK/out"
    PYTHONPATH=$PYTHONPATH "$BIN/python" -c "import synth; synth.write_case('data', 'BraTS-GLI-00001-000', labels=False)"
    PATH="$BIN:$PATH" brainpaint infer --data-path data --output-path out --method harmonic \
        || fail "$how: brainpaint infer --method harmonic"
    PYTHONPATH=$PYTHONPATH "$BIN/python" - <<'PY' || fail "$how: the harmonic prediction is wrong"
import nibabel as nib, numpy as np
case = "data/BraTS-GLI-00001-000/BraTS-GLI-00001-000"
voided = np.asanyarray(nib.load(f"{case}-t1n-voided.nii.gz").dataobj)
mask = np.asanyarray(nib.load(f"{case}-mask.nii.gz").dataobj) > 0
out = np.asanyarray(nib.load("out/BraTS-GLI-00001-000-t1n-inference.nii.gz").dataobj)
assert out.dtype == voided.dtype and out[~mask].tobytes() == voided[~mask].tobytes() and (out[mask] > 0).all()
print("prediction ok: known voxels bit-exact, mask filled")
PY
    # The diffusion method needs weights: without any, one clear line and exit status 2.
    local status=0
    env -u BRAINPAINT_WEIGHTS "$BIN/brainpaint" infer --data-path data --output-path out2 2>"$WORK/err.txt" || status=$?
    [ "$status" = 2 ] && grep -q "^error: weights file not found: .*--weights or \$BRAINPAINT_WEIGHTS" "$WORK/err.txt" \
        && [ ! -e out2 ] || { cat "$WORK/err.txt"; fail "$how: infer without weights did not fail in one clear line"; }
    log "$how: brainpaint --help, the Python API import and a harmonic run work; no weights is one error line"
}

log "pip install . (dependencies from pyproject.toml)"
"$BIN/pip" install -q "$WORK/src" 2> >(grep -v "is ignored: it is neither" >&2) || fail "pip install ."
check_installed "pip install ."
log "pip install -e ."
"$BIN/pip" install -q -e "$WORK/src" 2> >(grep -v "is ignored: it is neither" >&2) || fail "pip install -e ."
check_installed "pip install -e ."
