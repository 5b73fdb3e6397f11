#!/usr/bin/env bash
# Real-container smoke test: the MLCube's infer and evaluate tasks in a real Docker container.
#
# On a machine without a Docker engine (CI), this script
#   1. unpacks Debian's docker.io/containerd/runc/tini packages into a cache folder and starts
#      a private dockerd (own data-root, exec-root, pidfile and socket; no iptables, no bridge),
#   2. builds a Debian bookworm base image with debootstrap + `docker import` (no registry),
#   3. builds the project image from the top-level Dockerfile with that base, offline, from a
#      local wheel folder (`--network=none`, OFFLINE=1),
#   4. runs `mlcube run --mlcube=... --task=infer -Pplatform.accelerator_count=0` and then
#      `--task=evaluate` on a tiny synthetic case with a tiny random model, as uid 1000 with
#      --network=none, and checks the output (name, shape, affine, known voxels, metrics),
#   5. runs the image the two ways the BraTS orchestrator (`brats` package) does, as uid 1000
#      with --network=none and --shm-size=4gb on a two-case input folder laid out as it writes
#      one: the 2023/2024 MLCube-style `infer --data_path=/mlcube_io0 --output_path=/mlcube_io2`
#      with its four mounts, and the 2025 call with only /input and /output mounted and no
#      command (the image's own weights), and checks both output folders,
#   6. stops the daemon it started, by PID, and removes its temporary files.
# Downloads, the base image, the wheels and the image layers are cached between runs in
# $BRAINPAINT_SMOKE_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/brainpaint-smoke).
# Needs root (dockerd), apt-get (Debian/Ubuntu host) and the package registries.
# Prints PASS or FAIL last; exit status 0 only on PASS.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${BRAINPAINT_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/brainpaint-smoke}
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
MIRROR=${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE_IMAGE=brainpaint-base:$SUITE
IMAGE=brainpaint/mlcube:smoke
SMOKE_UID=${SMOKE_UID:-1000}
START=$(date +%s)

log() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - START))" "$*"; }
fail() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "needs root to start a private dockerd (run as root, e.g. in CI)"
command -v apt-get >/dev/null || fail "needs apt-get (Debian/Ubuntu host) to fetch the Docker engine"
[ -x "$PYTHON" ] || fail "no Python at $PYTHON (run 'make setup' or set PYTHON)"
mkdir -p "$CACHE"

# One smoke run at a time per cache: two daemons must never share a data-root.
exec 9>"$CACHE/lock"
flock -w 1800 9 || fail "another smoke run holds $CACHE/lock"

WORK=$(mktemp -d /tmp/brainpaint-smoke.XXXXXX)
DOCKERD_PID=""
cleanup() {
    local status=$?
    if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping dockerd (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 1; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            log "dockerd did not stop in 30 s; killing pid $DOCKERD_PID"
            kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        fi
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    if [ "$status" != 0 ] && [ -f "$WORK/dockerd.log" ]; then
        echo "---- last lines of dockerd.log ----"; tail -n 20 "$WORK/dockerd.log" || true
    fi
    # Containers ran as another uid and the exec-root may hold mounts: unmount before removing.
    grep -o " $WORK[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$WORK"
    if [ "$status" = 0 ]; then
        log "PASS: container smoke test ($(($(date +%s) - START)) s)"
    else
        log "FAIL: container smoke test (exit $status)"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. the Docker engine
ENGINE=$CACHE/engine
if [ ! -f "$ENGINE/.complete" ]; then
    log "fetching Debian's docker.io, containerd, runc and tini packages"
    rm -rf "$ENGINE" "$CACHE/debs"; mkdir -p "$CACHE/debs" "$ENGINE"
    apt-get update -qq
    (cd "$CACHE/debs" && apt-get download -qq docker.io containerd runc tini 2>&1 | grep -v "unsandboxed" || true)
    ls "$CACHE"/debs/*.deb >/dev/null 2>&1 || fail "apt-get download fetched no packages"
    for deb in "$CACHE"/debs/*.deb; do dpkg-deb -x "$deb" "$ENGINE"; done
    touch "$ENGINE/.complete"
fi
export PATH="$ENGINE/usr/sbin:$ENGINE/usr/bin:$PATH"
missing=$(ldd "$ENGINE/usr/sbin/dockerd" "$ENGINE/usr/bin/containerd" "$ENGINE/usr/sbin/runc" 2>/dev/null | grep -c "not found" || true)
if [ "$missing" != 0 ]; then
    log "installing the engine's shared libraries"
    apt-get update -qq && apt-get install -y -qq libdevmapper1.02.1 libseccomp2 >/dev/null
fi

SOCK=$WORK/docker.sock
export DOCKER_HOST=unix://$SOCK
unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH
mkdir -p "$CACHE/docker"
log "starting a private dockerd ($(dockerd --version))"
dockerd --data-root "$CACHE/docker" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    -H "$DOCKER_HOST" --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false \
    --bridge=none --storage-driver=overlay2 >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    kill -0 "$DOCKERD_PID" 2>/dev/null || fail "dockerd exited during start-up"
    sleep 1
done
docker version --format 'engine {{.Server.Version}}, API {{.Server.APIVersion}}' || fail "dockerd did not answer in 60 s"

# ---------------------------------------------------------------- 2. the base image
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    log "debootstrap $SUITE (minbase + python3, python3-venv) from $MIRROR"
    ROOTFS=$WORK/rootfs
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$ROOTFS" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -n 20 "$WORK/debootstrap.log"; fail "debootstrap failed"; }
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    log "docker import -> $BASE_IMAGE"
    tar -C "$ROOTFS" --numeric-owner -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$ROOTFS"
fi
log "base image $BASE_IMAGE: $(docker run --rm --network=none "$BASE_IMAGE" python3 --version)"

# ---------------------------------------------------------------- 3. wheels and the project image
WHEELS=$CACHE/wheels
REQ_HASH=$(sha256sum "$REPO/requirements.txt" | cut -c1-16)
if [ "$(cat "$WHEELS/.requirements" 2>/dev/null)" != "$REQ_HASH" ]; then
    host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    base_py=$(docker run --rm --network=none "$BASE_IMAGE" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$host_py" = "$base_py" ] || fail "host Python $host_py differs from the base image's $base_py: wheels would not match"
    log "downloading wheels for requirements.txt into $WHEELS"
    rm -rf "$WHEELS"; mkdir -p "$WHEELS"
    "$PYTHON" -m pip download -q --only-binary=:all: -d "$WHEELS" -r "$REPO/requirements.txt" 'setuptools>=64' \
        2> >(grep -v "is ignored: it is neither" >&2) || fail "pip download failed"
    echo "$REQ_HASH" >"$WHEELS/.requirements"
fi
log "wheels: $(find "$WHEELS" -name '*.whl' | wc -l) files, $(du -sh "$WHEELS" | cut -f1), torch: $(cd "$WHEELS" && ls torch-*.whl)"

# The build context is the repository's recipe inputs plus the cached wheels (hard links),
# so the checkout itself is never written to.
CTX=$WORK/context
mkdir -p "$CTX/project" "$CTX/wheels"
cp -a "$REPO/Dockerfile" "$REPO/.dockerignore" "$REPO/requirements.txt" "$REPO/pyproject.toml" "$CTX/"
cp -a "$REPO/project/brainpaint" "$REPO/project/mlcube.py" "$CTX/project/"
mkdir -p "$CTX/workspace/additional_files"
cp -a "$REPO/workspace/additional_files/model.safetensors" "$CTX/workspace/additional_files/"
cp -al "$WHEELS"/*.whl "$CTX/wheels/" 2>/dev/null || cp -a "$WHEELS"/*.whl "$CTX/wheels/"
log "docker build $IMAGE (offline: --network=none, OFFLINE=1, BASE_IMAGE=$BASE_IMAGE)"
BUILD_ARGS=(--network=none --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg OFFLINE=1 --build-arg TORCH_CUDA_ARCH=)
# The build stage is tagged too: untagged, its layers (the slow pip install) would be pruned
# below as dangling images, and the next run would rebuild them.
for target in build final; do
    if [ "$target" = build ]; then tag=(--target build -t "$IMAGE-build"); else tag=(-t "$IMAGE"); fi
    if ! docker build "${BUILD_ARGS[@]}" "${tag[@]}" "$CTX" >"$WORK/build-$target.log" 2>&1; then
        tail -n 40 "$WORK/build-$target.log"; fail "docker build ($target stage) failed"
    fi
done
grep -h -E "^Step [0-9]+/|^torch " "$WORK/build-final.log" | cut -c1-110
log "build steps taken from the layer cache: $(cat "$WORK"/build-*.log | grep -c "Using cache")"
docker image prune -f >/dev/null
log "image $IMAGE: $(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# ---------------------------------------------------------------- 4. mlcube on a tiny case
MLCUBE_VENV=$CACHE/mlcube-venv
if [ ! -x "$MLCUBE_VENV/bin/mlcube" ]; then
    log "installing mlcube 0.0.9 and mlcube-docker 0.0.9 into $MLCUBE_VENV"
    # A separate venv: mlcube 0.0.9 pins old dependencies that must not meet the project's.
    rm -rf "$MLCUBE_VENV"
    python3 -m venv "$MLCUBE_VENV"
    "$MLCUBE_VENV/bin/pip" install -q 'pip<24.1'
    "$MLCUBE_VENV/bin/pip" install -q mlcube==0.0.9 mlcube-docker==0.0.9 2>&1 | grep -v -e "DEPRECATION" -e "is ignored" || true
    "$MLCUBE_VENV/bin/mlcube" --help >/dev/null || fail "mlcube did not install"
fi
MLCUBE=$MLCUBE_VENV/bin/mlcube
export MLCUBE_SYSTEM_SETTINGS=$WORK/mlcube-system-settings.yaml

# A private copy of the MLCube: the repository's mlcube.yaml with the container user set to a
# non-root uid (a -P value containing the letter h, such as --shm-size, would make `mlcube run`
# print its help instead, so the uid goes into the copy), and a workspace with the tiny case.
CUBE=$WORK/cube
mkdir -p "$CUBE"
"$PYTHON" - "$REPO/mlcube/mlcube.yaml" "$CUBE/mlcube.yaml" "$SMOKE_UID" <<'EOF'
import sys, yaml
src, dst, uid = sys.argv[1:]
cube = yaml.safe_load(open(src))
cube["docker"]["cpu_args"] += f" -u {uid}:{uid}"
cube["docker"]["gpu_args"] += f" -u {uid}:{uid}"
open(dst, "w").write(yaml.safe_dump(cube, sort_keys=False))
EOF
"$PYTHON" "$REPO/scripts/smoke_case.py" make "$CUBE/workspace"
# Inputs only readable by others, as a hospital share would be; outputs writable by the uid.
chmod -R a+rX "$CUBE/workspace"
mkdir -p "$CUBE/workspace/predictions" "$CUBE/workspace/metrics"
chown "$SMOKE_UID:$SMOKE_UID" "$CUBE/workspace/predictions" "$CUBE/workspace/metrics"

"$MLCUBE" describe --mlcube="$CUBE" | sed 's/^/  /'
"$MLCUBE" show_config --mlcube="$CUBE" --platform=docker -Pplatform.accelerator_count=0 -Pdocker.image="$IMAGE" \
    --resolve >"$WORK/show_config.yaml" || fail "mlcube show_config failed"
grep -q "image: $IMAGE" "$WORK/show_config.yaml" || fail "show_config does not show the image override"

run_task() {
    local task=$1
    log "mlcube run --task=$task -Pplatform.accelerator_count=0 -Pdocker.image=$IMAGE"
    if ! (cd "$WORK" && "$MLCUBE" --log-level=info run --mlcube="$CUBE" --task="$task" --platform=docker \
            -Pplatform.accelerator_count=0 -Pdocker.image="$IMAGE") >"$WORK/$task.log" 2>&1; then
        cat "$WORK/$task.log"; fail "mlcube task $task failed"
    fi
    grep -v -e "mlcube.shell.*Command='docker inspect" "$WORK/$task.log" | grep -v "^\s*$" | sed 's/^/  | /'
    local line
    line=$(grep -o "Command='docker run [^']*'" "$WORK/$task.log") || fail "no 'docker run' line in the mlcube log"
    log "docker run line composed by mlcube for $task, as it was run:"
    echo "    ${line#Command=}"
    for expected in "--network=none" "-u $SMOKE_UID:$SMOKE_UID" "--shm-size=" "--rm" ":ro"; do
        [[ $line == *"$expected"* ]] || fail "the docker run line lacks '$expected'"
    done
}
run_task infer
grep -q "no GPU visible" "$WORK/infer.log" || fail "infer did not report the CPU fallback"
run_task evaluate
"$PYTHON" "$REPO/scripts/smoke_case.py" check "$CUBE/workspace" || fail "output checks failed"
owner=$(stat -c %u "$CUBE/workspace/predictions/BraTS-GLI-00042-000-t1n-inference.nii.gz")
[ "$owner" = "$SMOKE_UID" ] || fail "prediction owned by uid $owner, expected the container uid $SMOKE_UID"
log "prediction written by uid $owner (not root)"

# ---------------------------------------------------------------- 5. the BraTS orchestrator's two calls
# As brats.core.docker.run_container starts containers: every folder mounted read-write, the
# calling uid (here the smoke uid), no network, its 4 GB shm; the input folder as the
# orchestrator writes it (BraTS-GLI-0000k-000/<ID>-t1n-voided.nii.gz, <ID>-mask.nii.gz).
BRATS=$WORK/brats
brats_run() {
    local name=$1; shift
    log "docker run as the BraTS orchestrator starts $name algorithms:"
    echo "    docker run --rm --network=none --shm-size=4gb -u $SMOKE_UID:$SMOKE_UID $*"
    if ! docker run --rm --network=none --shm-size=4gb -u "$SMOKE_UID:$SMOKE_UID" "$@" >"$WORK/$name.log" 2>&1; then
        cat "$WORK/$name.log"; fail "the $name container call failed"
    fi
    sed 's/^/  | /' "$WORK/$name.log"
}
brats_folders() {  # input, output (and any further empty folders), the output writable by the uid
    "$PYTHON" "$REPO/scripts/smoke_case.py" brats-input "$1"
    shift
    mkdir -p "$@"
    chmod -R a+rX "$BRATS"
    chown "$SMOKE_UID:$SMOKE_UID" "$1"
}

# 2023/2024: MLCube-style command line; data, additional files (the tiny weights), output,
# parameters at /mlcube_io0..3.
M=$BRATS/mlcube
brats_folders "$M/data" "$M/output" "$M/additional_files" "$M/parameters"
cp "$CUBE/workspace/additional_files/model.safetensors" "$M/additional_files/"
chmod a+r "$M/additional_files/model.safetensors"
brats_run 2024-style -v "$M/data:/mlcube_io0:rw" -v "$M/additional_files:/mlcube_io1:rw" \
    -v "$M/output:/mlcube_io2:rw" -v "$M/parameters:/mlcube_io3:rw" \
    "$IMAGE" infer --data_path=/mlcube_io0 --output_path=/mlcube_io2 --weights=/mlcube_io1
"$PYTHON" "$REPO/scripts/smoke_case.py" check-output "$M/data" "$M/output" || fail "2024-style output checks failed"

# 2025: only /input and /output, no command: the entrypoint reads /input with the image's weights.
N=$BRATS/2025
brats_folders "$N/input" "$N/output"
brats_run 2025-style -v "$N/input:/input:rw" -v "$N/output:/output:rw" "$IMAGE"
grep -q "no task given: inference on /input into /output" "$WORK/2025-style.log" || fail "the 2025 call did not run on /input"
grep -q "weights /opt/brainpaint/model.safetensors" "$WORK/2025-style.log" || fail "the 2025 call did not use the image's weights"
"$PYTHON" "$REPO/scripts/smoke_case.py" check-output "$N/input" "$N/output" || fail "2025-style output checks failed"
owner=$(stat -c %u "$N/output/BraTS-GLI-00000-000-t1n-inference.nii.gz")
[ "$owner" = "$SMOKE_UID" ] || fail "2025-style prediction owned by uid $owner, expected $SMOKE_UID"
