"""What `metarun-ensemble` reports: the blend, the leave-one-shot-out choice, the best single run
and every run, from their probabilities on the fixed tasks; as ensemble.json and a Markdown table.

Meta-test accuracy is quoted as few-shot papers quote it, mean ± 95% CI over the test tasks
(``metarun.logging.mean_and_ci95``). The best single run is the one with the lowest log-loss on
the validation tasks: the criterion the blend minimises, and the discrete super learner's choice
(a single run fits nothing, so its cross-validated log-loss is its validation log-loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from metarun.compare_table import format_value
from metarun.ensemble_fit import (
    blend,
    choose_per_task,
    cross_validate,
    fit_weights,
    task_accuracy,
    task_log_loss,
    true_class,
)
from metarun.logging import mean_and_ci95


@dataclass
class Scores:
    """Per-run arrays: probabilities ``[R, T, M, N]`` and labels ``[T, M]`` for each split, and
    the per-task held-out support loss ``[R, T_test]`` when the leave-one-shot-out choice is
    asked for."""

    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    held_out: np.ndarray | None


def _test_summary(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    accuracy, ci95 = mean_and_ci95(task_accuracy(probabilities, labels).tolist())
    log_loss = float(task_log_loss(true_class(probabilities, labels)).mean())
    return {"accuracy": accuracy, "ci95": ci95, "log_loss": log_loss}


def summarise(labels: list[str], scores: Scores, folds: int, method: str) -> dict[str, Any]:
    """Everything ensemble.json holds about the learners (the caller adds where and what)."""
    val_p, test_p = scores.probabilities["val"], scores.probabilities["test"]
    val_y, test_y = scores.labels["val"], scores.labels["test"]
    val_true = true_class(val_p, val_y)  # [R, T, M]
    fit = fit_weights(val_true)
    cv = cross_validate(val_true, folds)
    runs = []
    for index, label in enumerate(labels):
        runs.append(
            {
                "run": label,
                "weight": float(fit.weights[index]),
                "val_log_loss": float(cv.run_log_loss[index]),
                "val_accuracy": float(task_accuracy(val_p[index], val_y).mean()),
                "test": _test_summary(test_p[index], test_y),
            }
        )
    best = int(np.argmin(cv.run_log_loss))
    blended_val = blend(val_p, fit.weights)
    summary: dict[str, Any] = {
        "method": method,
        "runs": runs,
        "blend": {
            "weights": {label: float(w) for label, w in zip(labels, fit.weights, strict=True)},
            "val_log_loss": fit.log_loss,
            "cv_log_loss": cv.blend_log_loss,
            "folds": folds,
            "fold_weights": [w.tolist() for w in cv.fold_weights],
            "optimality_gap_bound": fit.gap_bound,
            "iterations": fit.iterations,
            "val_accuracy": float(task_accuracy(blended_val, val_y).mean()),
            "test": _test_summary(blend(test_p, fit.weights), test_y),
        },
        "best_run": {
            "run": labels[best],
            "chosen_by": "lowest validation log-loss",
            "test": runs[best]["test"],
        },
    }
    if scores.held_out is not None:
        chosen = choose_per_task(scores.held_out, fallback=best)
        picked = test_p[chosen, np.arange(len(chosen))]  # [T, M, N]
        fell_back = int(np.isnan(scores.held_out).all(0).sum())
        summary["loo"] = {
            "rule": "per test task, the run with the lowest leave-one-shot-out log-loss on the "
            "support set; the validation-best run where no shot can be left out (1 shot)",
            "fallback": labels[best],
            "fallback_tasks": fell_back,
            "chosen": {label: int((chosen == i).sum()) for i, label in enumerate(labels)},
            "test": _test_summary(picked, test_y),
        }
    return summary


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def _test_cells(test: dict[str, float]) -> list[str]:
    return [format_value("accuracy", test["accuracy"], test["ci95"]), f"{test['log_loss']:.4f}"]


def markdown(report: dict[str, Any]) -> str:
    """The table of ensemble.md (and of the console)."""
    shape, tasks = report["task"], report["tasks"]
    blend_row, best = report["blend"], report["best_run"]
    folds = blend_row["folds"]
    header = [
        "learner", "weight", "val log-loss", f"{folds}-fold CV log-loss", "val accuracy",
        "meta-test accuracy", "meta-test log-loss",
    ]
    rows = [
        [
            "super learner (blend)", "1", f"{blend_row['val_log_loss']:.4f} (fitted)",
            f"{blend_row['cv_log_loss']:.4f}", format_value("accuracy", blend_row["val_accuracy"]),
            *_test_cells(blend_row["test"]),
        ]
    ]
    if "loo" in report:
        loo_test = report["loo"]["test"]
        rows.append(["leave-one-shot-out choice", "", "", "", "", *_test_cells(loo_test)])
    rows.append([f"best run: {best['run']}", "", "", "", "", *_test_cells(best["test"])])
    for run in report["runs"]:
        loss = f"{run['val_log_loss']:.4f}"
        rows.append(
            [
                run["run"], f"{run['weight']:.4f}", loss, loss,
                format_value("accuracy", run["val_accuracy"]), *_test_cells(run["test"]),
            ]
        )
    intro = (
        f"{len(report['runs'])} runs, {shape['ways']}-way {shape['shots']}-shot "
        f"({shape['queries']} queries a class), {report['dataset']}. Blend weights fitted on "
        f"{tasks['val']} validation tasks (seed {tasks['val_seed']}), {folds}-fold CV over those "
        f"tasks; meta-test on {tasks['test']} tasks (seed {tasks['test_seed']}), the same for "
        f"every learner. Best run: lowest validation log-loss."
    )
    notes = []
    if "loo" in report:
        loo = report["loo"]
        chosen = ", ".join(f"{label} {count}" for label, count in loo["chosen"].items())
        notes.append(f"Leave-one-shot-out choice: tasks per run: {chosen}.")
        if loo["fallback_tasks"]:
            notes.append(
                f"{loo['fallback_tasks']} test tasks had no shot to leave out (1 shot) and use "
                f"the validation-best run, {loo['fallback']}."
            )
    if report.get("skipped"):
        skipped = "; ".join(f"{item['run']}: {item['reason']}" for item in report["skipped"])
        notes.append(f"Skipped: {skipped}.")
    return "\n".join([intro, "", *_table(header, rows), *([""] + notes if notes else [])])
