#!/usr/bin/env bash
# GPU numbers for docs/PERFORMANCE.md on a lent device machine, in one prepared run.
#
# The device machine reaches no package registry and has Python 3.12 with torch, torchvision,
# cython, numpy, scipy and tensorboard already there, but not hydra-core, omegaconf, gym or
# learn2learn, nor the data. So it goes in two halves:
#
#   bash scripts/device_bench.sh prepare    # here: fills .device-bundle/ (git-ignored, ~25 MB)
#   bash scripts/device_bench.sh run        # there, e.g. through the device tool:
#       run(command="bash scripts/device_bench.sh run", carry=[".device-bundle"], timeout_s=540)
#
# prepare: wheels of the missing pure-Python packages (built here where only an sdist exists),
# learn2learn 0.2.0's source with its .pyx files re-cythonized (the shipped C does not build on
# Python >= 3.11: upstream issue #413), and a copy of the Omniglot zips from $METARUN_DATA.
# run: installs the wheels into /tmp/site, builds learn2learn there with the machine's compiler,
# checks that torch sees the GPU, then runs scripts/bench.py on cuda, the per-task loop (what
# `auto` picks) and vmap, each with the float64 gradient check; JSON and logs go to $OUT (or
# .device-bundle/out). Environment: METARUN_DATA (prepare; default ../shared/data), PYTHON
# (default python3), BENCH_ARGS (run; extra arguments for bench.py, e.g. "--repeat 2").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$REPO/.device-bundle"
PYTHON="${PYTHON:-python3}"
L2L_VERSION="0.2.0"
# The device machine's Python: every carried wheel must be pure Python to install there.
TARGET_PYTHON_VERSION="3.12"
PURE_PACKAGES=("hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"
               "gym==0.26.2" "gym-notices==0.1.0")
STARTED=$SECONDS
step() { printf '[device_bench %4ds] %s\n' "$((SECONDS - STARTED))" "$*"; }
fail() {
    echo "device_bench: error: $*" >&2
    exit 1
}
# shellcheck source=scripts/l2l_source.sh
source "$REPO/scripts/l2l_source.sh"

prepare() {
    local data="${METARUN_DATA:-$REPO/../shared/data}"
    [[ -f "$data/omniglot/images_background.zip" ]] \
        || fail "no omniglot/images_background.zip in $data; set METARUN_DATA"
    rm -rf "$BUNDLE"
    mkdir -p "$BUNDLE/wheels" "$BUNDLE/data/omniglot" "$BUNDLE/src"
    TOOLS="$(mktemp -d -t device-bench-tools.XXXXXX)"
    trap 'rm -rf "$TOOLS"' EXIT
    step "a throw-away venv with pip and cython"
    "$PYTHON" -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/python" -m pip install --quiet --upgrade pip cython setuptools wheel
    step "wheels: ${PURE_PACKAGES[*]}"
    # pip wheel builds the sdist-only ones (antlr4, gym) here; all are pure Python.
    "$TOOLS/venv/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$BUNDLE/wheels" \
        "${PURE_PACKAGES[@]}"
    for wheel in "$BUNDLE"/wheels/*.whl; do
        [[ "$wheel" == *-py3-none-any.whl || "$wheel" == *-py2.py3-none-any.whl ]] \
            || fail "$wheel is not pure Python: it would not install on Python $TARGET_PYTHON_VERSION"
    done
    step "learn2learn $L2L_VERSION source, .pyx re-cythonized"
    local l2l_dir
    l2l_dir="$(l2l_source "$TOOLS/venv/bin/python" "$TOOLS/venv/bin/cython" "$L2L_VERSION" \
        "$BUNDLE/src")" || fail "preparing learn2learn's source failed"
    rm -rf "$l2l_dir/docs" "$l2l_dir/examples"  # 7 MB the build does not read
    step "Omniglot zips and splits from $data"
    cp "$data"/omniglot/*.zip "$BUNDLE/data/omniglot/"
    [[ -d "$data/omniglot/splits" ]] && cp -r "$data/omniglot/splits" "$BUNDLE/data/omniglot/"
    [[ -f "$data/omniglot/MANIFEST.txt" ]] && cp "$data/omniglot/MANIFEST.txt" "$BUNDLE/data/omniglot/"
    step "done: $BUNDLE ($(du -sh "$BUNDLE" | cut -f1)); on the device: bash scripts/device_bench.sh run"
}

run() {
    [[ -d "$BUNDLE/wheels" ]] || fail "no $BUNDLE; run 'bash scripts/device_bench.sh prepare' here first and carry .device-bundle"
    local out="${OUT:-$BUNDLE/out}" site=/tmp/site
    mkdir -p "$out" "$site"
    step "python: $("$PYTHON" --version 2>&1); installing the carried wheels into $site"
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$BUNDLE"/wheels/*.whl
    step "building learn2learn $L2L_VERSION's C extensions"
    (cd /tmp && "$PYTHON" -m pip install --quiet --no-index --no-deps --no-build-isolation \
        --no-cache-dir --target "$site" "$BUNDLE/src/learn2learn-$L2L_VERSION") \
        >"$out/l2l-build.log" 2>&1 || { tail -n 30 "$out/l2l-build.log"; fail "learn2learn did not build"; }
    export PYTHONPATH="$site:$REPO" PYTHONUNBUFFERED=1 METARUN_DATA="$BUNDLE/data"
    "$PYTHON" - <<'EOF' | tee "$out/versions.txt"
import learn2learn, torch, torchvision
import metarun
assert torch.cuda.is_available(), "torch sees no GPU"
print("learn2learn", learn2learn.__version__, "torch", torch.__version__, "torchvision",
      torchvision.__version__, "gpu", torch.cuda.get_device_name(0))
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$out/versions.txt" 2>&1 || true
    read -r -a extra <<<"${BENCH_ARGS:-}"
    local cases=('maml-*' 'fomaml-*' 'protonet-*' 'grad-*')
    step "bench on cuda, metarun's default driver (auto)"
    "$PYTHON" "$REPO/scripts/bench.py" --device cuda --data "$BUNDLE/data" --repeat 5 --warmup 2 \
        --grad-meta-batch 8 --only "${cases[@]}" --json "$out/cuda-auto.json" "${extra[@]}" \
        2>&1 | tee "$out/cuda-auto.log"
    step "bench on cuda, metarun under vmap"
    "$PYTHON" "$REPO/scripts/bench.py" --device cuda --data "$BUNDLE/data" --repeat 5 --warmup 2 \
        --grad-meta-batch 8 --only 'maml-*' 'fomaml-*' 'grad-maml-*' 'grad-fomaml-*' \
        --task-batching vmap --json "$out/cuda-vmap.json" "${extra[@]}" \
        2>&1 | tee "$out/cuda-vmap.log"
    step "done: results in $out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) fail "usage: bash scripts/device_bench.sh prepare|run" ;;
esac
