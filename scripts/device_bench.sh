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
# checks that torch sees the GPU, then runs these parts (PARTS, in this order; default all):
#   tests  tests/test_gpu.py: meta-gradients on cuda against CPU float64, bf16/fp16 against them,
#          short `python -m metarun trainer.device=cuda` runs, 2 NCCL processes when 2+ GPUs;
#   bench  scripts/bench.py on cuda, the per-task loop (what `auto` picks) and vmap, each with
#          the float64 gradient check;
#   pair   MAML Omniglot 5-way 1-shot in fp32 and in bf16 at the same small budget (PAIR_ITERS
#          meta-iterations, default 300): the meta-test accuracies side by side;
#   ddp    the same experiment (DDP_ITERS, default 100) on every GPU of the machine, started by
#          torchrun (`python -m torch.distributed.run --standalone --nproc_per_node=<GPUs>`).
# Each part has a time limit and records its exit status, so one failing or slow part does not
# take the others' results with it. JSON and logs go to $OUT (or .device-bundle/out), with
# summary.json last. Environment: METARUN_DATA (prepare; default ../shared/data), PYTHON
# (default python3), PARTS, PAIR_ITERS, DDP_ITERS, BENCH_ARGS (run; extra arguments for
# bench.py, e.g. "--repeat 2").
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUNDLE="$REPO/.device-bundle"
PYTHON="${PYTHON:-python3}"
L2L_VERSION="0.2.0"
# The device machine's Python: every carried wheel must be pure Python to install there.
TARGET_PYTHON_VERSION="3.12"
PURE_PACKAGES=("hydra-core==1.3.2" "omegaconf==2.3.0" "antlr4-python3-runtime==4.9.3"
               "gym==0.26.2" "gym-notices==0.1.0"
               # pytest for tests/test_gpu.py and what it needs (the project's pytest settings
               # name pytest-timeout's options)
               "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4"
               "pygments==2.21.0" "pytest-timeout==2.4.0")
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
    local out="${OUT:-$BUNDLE/out}" site=/tmp/site part started status
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
import learn2learn, pytest, torch, torchvision
import metarun
assert torch.cuda.is_available(), "torch sees no GPU"
print("learn2learn", learn2learn.__version__, "torch", torch.__version__, "torchvision",
      torchvision.__version__, "pytest", pytest.__version__, "gpus", torch.cuda.device_count(),
      "gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$out/versions.txt" 2>&1 || true
    : >"$out/parts.tsv"
    for part in ${PARTS:-tests bench pair ddp}; do
        case "$part" in
            tests|bench|pair|ddp) ;;
            *) fail "PARTS: unknown part '$part' (tests, bench, pair, ddp)" ;;
        esac
        started=$SECONDS
        status=0
        "part_$part" "$out" || status=$?
        printf '%s\t%s\t%s\n' "$part" "$status" "$((SECONDS - started))" >>"$out/parts.tsv"
        step "$part: exit status $status"
    done
    summarize "$out"
    step "done: results in $out (summary.json)"
}

# limited SECONDS COMMAND...: COMMAND, sent SIGTERM after SECONDS (metarun then saves the run
# and writes an incomplete results.json) and killed 30 s later.
limited() {
    local seconds="$1"
    shift
    timeout --signal=TERM --kill-after=30 "$seconds" "$@"
}

part_tests() {
    local out="$1"
    (cd "$REPO" && limited 300 "$PYTHON" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider \
        --junitxml "$out/test_gpu.xml") 2>&1 | tee "$out/test_gpu.log"
}

part_bench() {
    local out="$1" status=0
    read -r -a extra <<<"${BENCH_ARGS:-}"
    local cases=('maml-*' 'fomaml-*' 'protonet-*' 'grad-*')
    step "bench on cuda, metarun's default driver (auto)"
    "$PYTHON" "$REPO/scripts/bench.py" --device cuda --data "$BUNDLE/data" --repeat 5 --warmup 2 \
        --grad-meta-batch 8 --only "${cases[@]}" --json "$out/cuda-auto.json" "${extra[@]}" \
        2>&1 | tee "$out/cuda-auto.log" || status=$?
    step "bench on cuda, metarun under vmap"
    "$PYTHON" "$REPO/scripts/bench.py" --device cuda --data "$BUNDLE/data" --repeat 5 --warmup 2 \
        --grad-meta-batch 8 --only 'maml-*' 'fomaml-*' 'grad-maml-*' 'grad-fomaml-*' \
        --task-batching vmap --json "$out/cuda-vmap.json" "${extra[@]}" \
        2>&1 | tee "$out/cuda-vmap.log" || status=$?
    return "$status"
}

# omniglot_run ITERS RUN_DIR [OVERRIDES...]: the overrides, one a line, of the paper's MAML
# Omniglot 5-way 1-shot experiment cut to ITERS meta-iterations (one validation, at the end).
omniglot_run() {
    local iters="$1" run_dir="$2"
    shift 2
    printf '%s\n' experiment=maml_omniglot_5w1s trainer.device=cuda "trainer.max_iters=$iters" \
        "trainer.val_every=$iters" trainer.val_episodes=100 trainer.test_episodes=600 \
        trainer.eval_batch_size=100 trainer.log_every=50 trainer.progress=false "$@" \
        "hydra.run.dir=$run_dir"
}

part_pair() {
    local out="$1" iters="${PAIR_ITERS:-300}" precision status=0
    local -a overrides
    for precision in fp32 bf16; do
        step "MAML Omniglot 5w1s, $iters meta-iterations, trainer.precision=$precision"
        mapfile -t overrides < <(omniglot_run "$iters" "$out/omniglot-$precision" \
            "trainer.precision=$precision")
        (cd /tmp && limited 180 "$PYTHON" -m metarun "${overrides[@]}") \
            >"$out/omniglot-$precision.log" 2>&1 || status=$?
        tail -n 3 "$out/omniglot-$precision.log"
    done
    return "$status"
}

part_ddp() {
    local out="$1" iters="${DDP_ITERS:-100}" gpus status=0
    local -a overrides
    gpus="$(nvidia-smi -L | wc -l)"
    step "MAML Omniglot 5w1s, $iters meta-iterations, torchrun on $gpus GPU(s)"
    mapfile -t overrides < <(omniglot_run "$iters" "$out/ddp-$gpus-gpus")
    (cd /tmp && METARUN_DIST_TIMEOUT=120 limited 180 "$PYTHON" -m torch.distributed.run \
        --standalone --nproc_per_node="$gpus" -m metarun "${overrides[@]}") \
        >"$out/ddp.log" 2>&1 || status=$?
    tail -n "$([[ $status == 0 ]] && echo 3 || echo 20)" "$out/ddp.log"
    return "$status"
}

# summarize OUT: OUT/summary.json: each part's exit status and seconds, the pair's meta-test
# accuracies (and bf16's difference in points), the DDP run's.
summarize() {
    "$PYTHON" - "$1" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, seconds = line.split("\t")
    parts[name] = {"exit_status": int(status), "seconds": int(seconds)}


def run(folder):
    path = out / folder / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    test = results.get("meta_test") or {}
    return {"complete": results.get("complete"), "iterations": results.get("iterations"),
            "accuracy": test.get("mean"), "ci95": test.get("ci95"),
            "episodes": test.get("episodes"), "wall_time_s": results.get("wall_time_s")}


summary = {"parts": parts, "versions": (out / "versions.txt").read_text().splitlines()}
pair = {precision: run(f"omniglot-{precision}") for precision in ("fp32", "bf16")}
if any(pair.values()):
    if all(r and r["accuracy"] is not None for r in pair.values()):
        pair["bf16_minus_fp32_points"] = 100 * (pair["bf16"]["accuracy"] - pair["fp32"]["accuracy"])
    summary["precision_pair"] = pair
for folder in sorted(out.glob("ddp-*-gpus")):
    summary["ddp"] = {"gpus": int(folder.name.split("-")[1]), **(run(folder.name) or {})}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
EOF
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) fail "usage: bash scripts/device_bench.sh prepare|run" ;;
esac
