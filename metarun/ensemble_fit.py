"""The super learner's arithmetic (van der Laan, Polley & Hubbard 2007, "Super Learner",
Stat. Appl. Genet. Mol. Biol. 6(1)): numpy in float64, no torch, no files.

The blend is a convex combination of the runs' per-query class probabilities,
``p_w = sum_r w_r p_r`` with ``w`` on the simplex, chosen to minimise the log-loss
``L(w) = -mean_i log p_w(y_i | x_i)`` over the validation queries. Only each run's probability of
the true class enters, ``z_ri = p_r(y_i | x_i)``, and ``L`` is convex in ``w``.

Fitting: the multiplicative update ``w_r <- w_r g_r(w)`` with ``g_r(w) = mean_i z_ri / (z w)_i``
(EM for mixture proportions; exponentiated gradient on the simplex with the step that keeps it
normalised), from uniform weights. Every step lowers ``L``, and Jensen's inequality gives a
certificate: ``L(w) - min L <= log max_r g_r(w)``; fitting stops when that bound is below
``tolerance``. A vertex (all weight on one run) is returned exactly when it is optimal, which
the update alone only approaches.

Cross-validation: K folds of whole validation tasks (queries of one task share a support set, so
they are not independent); the blend's CV log-loss is the log-loss of every held-out task under
weights fitted on the other folds. A single run fits nothing, so its CV log-loss is its
validation log-loss.

Probabilities are floored at ``PROBABILITY_FLOOR`` before any log, so a run that gave the true
class exactly 0 costs a large finite loss rather than an infinite one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROBABILITY_FLOOR = 1e-12


@dataclass
class Fit:
    """Weights on the simplex, their log-loss and the certified bound on its distance to optimal."""

    weights: np.ndarray
    log_loss: float
    gap_bound: float
    iterations: int


def true_class(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``[..., T, M, N]`` probabilities and ``[T, M]`` labels -> ``[..., T, M]``, floored."""
    index = np.broadcast_to(labels[..., None], (*probabilities.shape[:-1], 1))
    picked = np.take_along_axis(probabilities, index, axis=-1)[..., 0]
    return np.maximum(picked, PROBABILITY_FLOOR)


def task_log_loss(true_probabilities: np.ndarray) -> np.ndarray:
    """Per-task mean log-loss ``[..., T]`` of true-class probabilities ``[..., T, M]``."""
    return -np.log(np.maximum(true_probabilities, PROBABILITY_FLOOR)).mean(-1)


def task_accuracy(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-task accuracy ``[..., T]``: the argmax class against ``[T, M]`` labels."""
    return (probabilities.argmax(-1) == labels).mean(-1)


def blend(probabilities: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``sum_r w_r p_r`` of ``[R, T, M, N]`` probabilities: ``[T, M, N]``."""
    return np.tensordot(weights, probabilities, axes=1)


def _gradient_ratios(z: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``g_r(w) = mean_i z_ri / (z w)_i`` for ``z [R, S]``: minus the gradient of ``L``."""
    return (z / (weights @ z)).mean(1)


def fit_weights(
    true_probabilities: np.ndarray, tolerance: float = 1e-10, max_iterations: int = 20_000
) -> Fit:
    """Simplex weights minimising the log-loss of the blend on ``[R, ...]`` true-class
    probabilities (each run's probability of every query's true class)."""
    z = np.maximum(np.asarray(true_probabilities, dtype=np.float64), PROBABILITY_FLOOR)
    z = z.reshape(z.shape[0], -1)
    runs = z.shape[0]

    def loss(weights: np.ndarray) -> float:
        return float(-np.log(weights @ z).mean())

    # Only the best single run's vertex can be optimal; it is when no other run's direction
    # lowers the loss (g_r <= 1 for every r).
    best = int(np.argmin(-np.log(z).mean(1)))
    weights = np.eye(runs)[best]
    iterations = 0
    if _gradient_ratios(z, weights).max() > 1 + tolerance:
        weights = np.full(runs, 1.0 / runs)
        ratios = _gradient_ratios(z, weights)
        while math.log(ratios.max()) > tolerance and iterations < max_iterations:
            weights = weights * ratios
            weights /= weights.sum()  # 1 in exact arithmetic (sum w g = 1): rounding only
            ratios = _gradient_ratios(z, weights)
            iterations += 1
    bound = max(0.0, math.log(_gradient_ratios(z, weights).max()))
    return Fit(weights, loss(weights), bound, iterations)


def fold_tasks(tasks: int, folds: int) -> list[np.ndarray]:
    """Task indices of ``folds`` contiguous, near-equal folds (the tasks are drawn at random,
    so contiguous folds are random folds)."""
    if not 2 <= folds <= tasks:
        raise ValueError(f"{folds} folds need 2 to {tasks} tasks")
    return np.array_split(np.arange(tasks), folds)


@dataclass
class CrossValidation:
    blend_log_loss: float
    #: Each run's log-loss on the validation tasks (nothing fitted, so its CV log-loss too).
    run_log_loss: np.ndarray
    fold_weights: list[np.ndarray]


def cross_validate(true_probabilities: np.ndarray, folds: int) -> CrossValidation:
    """K-fold CV over tasks of the blend fitted on ``[R, T, M]`` true-class probabilities."""
    z = np.maximum(np.asarray(true_probabilities, dtype=np.float64), PROBABILITY_FLOOR)
    tasks = z.shape[1]
    held_out = np.empty(tasks)
    fold_weights = []
    for fold in fold_tasks(tasks, folds):
        train = np.setdiff1d(np.arange(tasks), fold)
        weights = fit_weights(z[:, train]).weights
        fold_weights.append(weights)
        held_out[fold] = task_log_loss(np.tensordot(weights, z[:, fold], axes=1))
    return CrossValidation(float(held_out.mean()), task_log_loss(z).mean(1), fold_weights)


def choose_per_task(held_out_loss: np.ndarray, fallback: int) -> np.ndarray:
    """Per task, the run with the lowest held-out support loss (``[R, T]``, NaN where none could
    be computed); ``fallback`` for tasks without any, and first among equals in run order."""
    losses = np.where(np.isnan(held_out_loss), np.inf, held_out_loss)
    chosen = losses.argmin(0)
    return np.where(np.isinf(losses.min(0)), fallback, chosen)
