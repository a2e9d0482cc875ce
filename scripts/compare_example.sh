#!/usr/bin/env bash
# The README's comparison picture, docs/img/compare_example.png: a small real sweep on sinusoid
# regression (MAML against first-order MAML, three seeds each, 3000 iterations), then
# metarun-compare on it. Each job trains for about 15 s on an idle core (MAML measured alone:
# 14 s), so one to two minutes in all on 2 idle cores; far longer when the cores are busy.
# JOBS=1 runs the jobs one at a time.
#
#   scripts/compare_example.sh
#
# The sweep, its log and the comparison's tables stay in a temporary folder (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
WORK=$(mktemp -d -t metarun-compare-example.XXXXXX)
SWEEP=$WORK/sweep
export OMP_NUM_THREADS=1  # one thread per job: torch's default threads stall when jobs share cores

echo "sweep: 2 algorithms x 3 seeds into $SWEEP (log: $WORK/sweep.log)"
if ! "$BIN/metarun" -m hydra/launcher=joblib hydra.launcher.n_jobs="${JOBS:-2}" \
    algo=maml,fomaml seed=0,1,2 \
    trainer.max_iters=3000 trainer.val_every=250 trainer.val_episodes=100 trainer.log_every=50 \
    trainer.progress=false hydra.sweep.dir="$SWEEP" >"$WORK/sweep.log" 2>&1; then
    tail -n 30 "$WORK/sweep.log"
    exit 1
fi
"$BIN/metarun-compare" "$SWEEP" --out "$WORK/compare"
mkdir -p docs/img
cp "$WORK/compare/compare.png" docs/img/compare_example.png
echo "copied to docs/img/compare_example.png ($(du -k docs/img/compare_example.png | cut -f1) KB)"
