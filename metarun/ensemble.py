"""`metarun-ensemble`: a super learner over finished runs of one task shape.

    metarun-ensemble multirun/2026-12-02/10-00-00 [more sweep or run folders]
        [--out FOLDER] [--val-tasks 300] [--test-tasks 600] [--folds 5] [--method blend|loo]

Every run is rebuilt from the config saved in its ``checkpoints/best.pt`` and gives its per-query
class probabilities (``MetaAlgorithm.query_probabilities``) on fixed meta-validation and
meta-test tasks, the same for every run. On the validation tasks the super learner (van der Laan,
Polley & Hubbard 2007) fits the convex combination of the runs' probabilities with the lowest
log-loss and reports its K-fold cross-validated log-loss beside each run's (``ensemble_fit``).
``--method loo`` also picks one run per test task by leave-one-shot-out on that task's support
set (``ensemble_runs.leave_one_shot_out``; 1-shot tasks have no shot to spare and use the
validation-best run). Meta-test accuracy ± 95% CI of the blend, of the choice, of the best single
run (lowest validation log-loss) and of every run, all on the same tasks, go to ``ensemble.json``
and ``ensemble.md`` in the folder given (or ``--out``), and the table is printed.

Runs that are not finished or have no best.pt are skipped, saying so; runs of different task
shapes or datasets are refused in one line. The parts: ``ensemble_runs`` (finding, rebuilding,
evaluating), ``ensemble_fit`` (the arithmetic), ``ensemble_report`` (json and table).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from metarun.errors import MetarunError

#: The fixed tasks' seeds: not the trainer's (it chose best.pt on its meta-validation tasks).
VAL_SEED = 3_000_017
TEST_SEED = 4_000_037
METHODS = ("blend", "loo")


def output_folder(paths: list[str], out: str | None) -> Path:
    """The folder given, or ``./ensemble`` when several are (as metarun-compare does)."""
    if out is not None:
        return Path(out)
    return Path(paths[0]) if len(paths) == 1 else Path("ensemble")


def ensemble(args: argparse.Namespace) -> str:
    """Evaluate, fit, write; return what to print."""
    # Imported here: `metarun-ensemble --help` and argument errors answer without torch.
    import numpy as np
    import torch
    from tqdm import tqdm

    from metarun.build import resolve_device
    from metarun.ensemble_report import Scores, markdown, summarise
    from metarun.ensemble_runs import (
        TASK_SHAPE,
        EnsembleError,
        check_same_tasks,
        evaluate_member,
        find_members,
        rebuild,
    )
    from metarun.logging import write_json

    if args.batch_size < 1:
        raise EnsembleError(f"--batch-size {args.batch_size} must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise EnsembleError(f"--threads {args.threads} must be at least 1")
        torch.set_num_threads(args.threads)
    if args.folds < 2 or args.val_tasks < args.folds:
        raise EnsembleError(
            f"--folds {args.folds} with --val-tasks {args.val_tasks}: cross-validation needs at "
            "least 2 folds and a validation task in each"
        )
    if args.test_tasks < 2:
        raise EnsembleError("--test-tasks must be at least 2 for a confidence interval")
    members, skipped = find_members(args.paths)
    for item in skipped:
        print(f"metarun-ensemble: skipped {item['run']}: {item['reason']}", file=sys.stderr)
    check_same_tasks(members)
    device = resolve_device(args.device)
    counts = {"val": args.val_tasks, "test": args.test_tasks}
    seeds = {"val": args.val_seed, "test": args.test_seed}
    leave_out = args.method == "loo"
    evaluations = []
    show = not args.no_progress
    with tqdm(members, desc="runs", disable=not show) as runs_bar:
        for member in runs_bar:
            runs_bar.set_postfix_str(member.label)
            algorithm, samplers = rebuild(member, str(device), args.data_root)
            with tqdm(total=sum(counts.values()), desc="tasks", leave=False,
                      disable=not show) as tasks_bar:
                evaluation = evaluate_member(algorithm, samplers, counts, seeds,
                                             args.batch_size, device, leave_out, tasks_bar)
            del algorithm, samplers
            first = evaluations[0] if evaluations else evaluation
            same = all(np.array_equal(evaluation.labels[s], first.labels[s]) for s in counts)
            if evaluation.fingerprint != first.fingerprint or not same:
                raise EnsembleError(
                    f"runs {members[0].label} and {member.label} drew different tasks from the "
                    "same dataset settings; do their data files differ? pass --data-root to "
                    "read one copy"
                )
            evaluations.append(evaluation)
    scores = Scores(
        {s: np.stack([e.probabilities[s] for e in evaluations]) for s in counts},
        evaluations[0].labels,
        np.stack([e.held_out for e in evaluations]) if leave_out else None,
    )
    config = members[0].config
    report: dict[str, Any] = {
        "task": {key: config.task[key] for key in TASK_SHAPE},
        "dataset": str(config.dataset.get("_target_", "")).rsplit(".", 1)[-1],
        "tasks": {**counts, "val_seed": args.val_seed, "test_seed": args.test_seed},
        **summarise([m.label for m in members], scores, args.folds, args.method),
        "paths": {m.label: str(m.path) for m in members},
        "skipped": skipped,
    }
    table = markdown(report)
    folder = output_folder(args.paths, args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "ensemble.json", report)
        (folder / "ensemble.md").write_text(table + "\n")
    except OSError as err:
        raise EnsembleError(
            f"cannot write the ensemble to {folder}: {err.strerror or err}; pass another folder "
            "with --out"
        ) from err
    wrote = [f"wrote {folder / name}" for name in ("ensemble.json", "ensemble.md")]
    return "\n".join([table, "", *wrote])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarun-ensemble",
        description="Blend finished metarun runs of one task shape into a super learner: the "
        "convex combination of their per-query class probabilities with the lowest "
        "cross-validated log-loss on fixed validation tasks, reported on fixed test tasks "
        "beside each run and the best run.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="run or sweep folders")
    parser.add_argument("--out", help="folder for ensemble.{json,md}; default: the folder "
                        "given, or ./ensemble when several are")
    parser.add_argument("--val-tasks", type=int, default=300,
                        help="validation tasks the blend is fitted on (default 300)")
    parser.add_argument("--test-tasks", type=int, default=600,
                        help="meta-test tasks every learner is scored on (default 600)")
    parser.add_argument("--folds", type=int, default=5,
                        help="folds of validation tasks for the CV log-loss (default 5)")
    parser.add_argument("--method", choices=METHODS, default="blend",
                        help="blend: the super learner; loo: also choose one run per test task "
                        "by leave-one-shot-out on its support set")
    parser.add_argument("--val-seed", type=int, default=VAL_SEED,
                        help=f"seed of the validation tasks (default {VAL_SEED})")
    parser.add_argument("--test-seed", type=int, default=TEST_SEED,
                        help=f"seed of the test tasks (default {TEST_SEED})")
    parser.add_argument("--batch-size", type=int, default=25,
                        help="tasks evaluated at once (memory only: the tasks stay the same)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--data-root", help="dataset.root for every run (default: each run's own)")
    parser.add_argument("--threads", type=int,
                        help="torch's intra-op threads (default: torch's, every usable core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        print(ensemble(args))
    except MetarunError as err:
        print(f"metarun-ensemble: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
