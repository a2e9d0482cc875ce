"""The three phases of a run: meta-train (with periodic meta-validation), then meta-test.

The trainer knows the `MetaAlgorithm` interface and nothing of any algorithm's internals. Every
source of randomness is an explicit generator seeded from the run's seed, and the validation and
test episodes are fixed sets, so the same seed on the same machine gives the same numbers, and a
resumed run continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from metarun.algorithms.base import MetaAlgorithm
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.data.episodes import EpisodeSampler, TaskBatch
from metarun.distributed import Parallel
from metarun.errors import MetarunError
from metarun.logging import RunLogger, format_metric, mean_and_ci95, write_json
from metarun.precision import Precision

log = logging.getLogger("metarun")

#: Fixed seeds of the meta-validation and meta-test episode sets: every run of every algorithm
#: is scored on the same tasks, so comparisons between runs are paired.
VAL_EPISODE_SEED = 1_000_003
TEST_EPISODE_SEED = 2_000_003


class NumericalError(MetarunError):
    """The meta-loss became NaN or infinite."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the run stopped at a safe point with its state saved."""

    def __init__(self, signum: int, iteration: int) -> None:
        super().__init__(f"stopped by signal {signum} at iteration {iteration}")
        self.signum = signum
        self.iteration = iteration


@dataclass
class TrainerSettings:
    max_iters: int
    val_every: int
    val_episodes: int
    test_episodes: int
    log_every: int
    ckpt_every: int
    eval_batch_size: int
    progress: bool = True
    skip_non_finite: bool = False
    #: fp32, bf16 or fp16 (metarun/precision.py).
    precision: str = "fp32"


class Trainer:
    def __init__(
        self,
        algorithm: MetaAlgorithm,
        optimizer: torch.optim.Optimizer,
        training_batches: Callable[[torch.Generator], Any],
        samplers: dict[str, EpisodeSampler],
        settings: TrainerSettings,
        run_dir: Path,
        seed: int,
        device: torch.device,
        config_yaml: str,
        run_info: dict[str, Any] | None = None,
        hparams: dict[str, Any] | None = None,
        parallel: Parallel | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.optimizer = optimizer
        #: Steps ``optimizer``'s learning rate once per meta-iteration; None: a constant rate.
        self.scheduler = scheduler
        self.training_batches = training_batches
        self.samplers = samplers
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.device = device
        self.config_yaml = config_yaml
        self.run_info = run_info or {}
        self.hparams = hparams or {}
        #: Where this process stands in a torch.distributed run (one process: Parallel()).
        self.parallel = parallel or Parallel()
        #: Autocast for the forward passes and, for fp16, the loss scaler.
        self.precision = Precision(settings.precision, device)
        self.agreed_stop: int | None = None
        self.train_generator = torch.Generator().manual_seed(seed)
        self.iteration = 0
        self.best_value: float | None = None
        self.best_iteration: int | None = None
        self.elapsed_before_resume = 0.0
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.skip_non_finite = settings.skip_non_finite
        self.skipped_batches = 0
        # Metrics summed since the last log point: part of the saved state, so a run resumed
        # between two log points logs exactly what the uninterrupted run logs.
        self.window: dict[str, float] = {}
        self.window_count = 0
        self.window_skipped = 0
        self.stop_signal: int | None = None
        self.pending_validation = False
        self.testing = False

    # ----------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "iteration": self.iteration,
            "best_value": self.best_value,
            "best_iteration": self.best_iteration,
            "train_generator": self.train_generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "elapsed_s": self.elapsed_before_resume + self._session_elapsed(),
            "config": self.config_yaml,
            "run_info": self.run_info,
            "window": self.window,
            "window_count": self.window_count,
            "window_skipped": self.window_skipped,
            "skipped_batches": self.skipped_batches,
            "pending_validation": self.pending_validation,
            "precision": self.precision.state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            # Checkpoints from before schedules have no "scheduler"; their saved config has no
            # schedule either, so only a checkpoint of another configuration gets here without one.
            if state.get("scheduler") is None:
                raise KeyError("scheduler")
            self.scheduler.load_state_dict(state["scheduler"])
        self.iteration = int(state["iteration"])
        self.best_value = state["best_value"]
        self.best_iteration = state["best_iteration"]
        self.train_generator.set_state(state["train_generator"])
        torch.set_rng_state(state["torch_rng"])
        self.elapsed_before_resume = float(state.get("elapsed_s", 0.0))
        self.window = dict(state["window"])
        self.window_count = int(state["window_count"])
        self.window_skipped = int(state["window_skipped"])
        self.skipped_batches = int(state["skipped_batches"])
        self.pending_validation = bool(state["pending_validation"])
        self.precision.restore(state.get("precision"))  # none before precisions existed

    # ----------------------------------------------------------------------------- phases
    def run(self) -> dict[str, Any]:
        """Meta-train, then meta-test; on SIGINT/SIGTERM save the state and raise RunInterrupted."""
        self._session_start = time.perf_counter()
        resumed_from = self.iteration if self.iteration > 0 else None
        purge_step = None if resumed_from is None else resumed_from + 1
        self.logger = (RunLogger(self.run_dir, purge_step=purge_step) if self.parallel.is_main
                       else _Silent())
        previous_handlers = _catch_stop_signals(self._on_signal)
        try:
            if resumed_from is not None:
                log.info("resuming from iteration %d", resumed_from)
            elif self.hparams:
                self.logger.hparams_start(self.hparams, group=_configuration_id(self.hparams))
            if self.pending_validation:
                self._validate()
                self._save("last.pt")
            self._meta_train()
            results = self._meta_test()
        except RunInterrupted as stop:
            if not self.testing:  # during meta-test the weights are best.pt's; last.pt is final
                self._save("last.pt")
            self._write_results(complete=False, interrupted_by=signal.Signals(stop.signum).name)
            raise
        finally:
            _restore_signals(previous_handlers)
            self.logger.close()
        return results

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.stop_signal = signum
        log.warning(
            "%s received: stopping after the current iteration and saving the run",
            signal.Signals(signum).name,
        )

    def _meta_train(self) -> None:
        s = self.settings
        metric = self.algorithm.primary_metric
        if self.iteration >= s.max_iters:
            return
        window_start = time.perf_counter()
        bar = tqdm(
            total=s.max_iters,
            initial=self.iteration,
            desc="meta-train",
            disable=not (s.progress and self.parallel.is_main),
            dynamic_ncols=True,
        )
        self.algorithm.train()
        while self.iteration < s.max_iters:
            self._stop_if_asked(agreed=True)
            # Every process draws the whole meta-batch (the same one) and keeps its share.
            batch, share = self.parallel.shard(self.training_batches(self.train_generator))
            with self.precision.forward():
                loss, metrics = self.algorithm.meta_train_step(batch.to(self.device))
            self.iteration += 1
            self.agreed_stop, any_non_finite = self.parallel.agree(
                self.stop_signal, not torch.isfinite(loss.detach()).item())
            finite = stepped = not any_non_finite
            if not finite and self.precision.inner_overflow_possible:
                # fp16: a loss-scaled inner-loop gradient overflowed (the same on every rank:
                # same scale, same algorithm), as the scaler skips any overflowing step.
                self.precision.skip_overflow(self.optimizer)
                self.window_skipped += 1
                metrics = {}
            elif not finite:
                self._non_finite(loss)
                metrics = {}
            else:
                stepped, norm = meta_update(loss, share, self.algorithm, self.optimizer,
                                            self.precision, self.parallel)
                metrics = self.parallel.reduce_metrics(metrics, share)
                if norm is not None and math.isfinite(norm):  # an fp16 overflow has no norm
                    metrics["meta_grad_norm"] = norm
            self._advance_schedule(skipped=not stepped)
            for name, value in metrics.items():
                self.window[name] = self.window.get(name, 0.0) + value
            self.window_count += 1
            bar.update(1)
            if self.iteration % s.log_every == 0 or self.iteration == s.max_iters:
                now = time.perf_counter()
                averaged = self._flush_window(now - window_start)
                bar.set_postfix(_postfix(averaged, metric), refresh=False)
                window_start = now
            if self.iteration % s.val_every == 0 or self.iteration == s.max_iters:
                self._validate()
                self._save("last.pt")
            elif self.iteration % s.ckpt_every == 0:
                self._save("last.pt")
        bar.close()

    def _advance_schedule(self, skipped: bool) -> None:
        """One schedule step per meta-iteration, a skipped non-finite batch's (or fp16 step's)
        included.

        ``step_size`` and ``T_max`` count meta-iterations as ``max_iters`` and ``val_every`` do,
        skipped ones too, so the learning rate is a function of the iteration alone: skipped
        batches never shift a run's schedule.
        """
        if self.scheduler is None:
            return
        if not skipped:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            # torch warns when a schedule moves before the optimizer's first step, as it does
            # when the first batch is skipped: here that is intended.
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()

    def _flush_window(self, seconds: float) -> dict[str, float]:
        """Log the metrics averaged since the last log point (over the finite iterations).

        ``lr`` is the optimizer's after this iteration's schedule step, the one the next update
        uses: a step schedule shows its cut at multiples of ``step_size``, a cosine reaches
        ``eta_min`` at ``T_max``.
        """
        finite = self.window_count - self.window_skipped
        averaged = {name: total / max(finite, 1) for name, total in self.window.items()}
        averaged["iters_per_sec"] = self.window_count / max(seconds, 1e-9)
        averaged["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.skip_non_finite:
            averaged["skipped_batches"] = float(self.skipped_batches)
        averaged.update(self.precision.log_values())
        self.logger.scalars("meta_train", averaged, self.iteration)
        self.window, self.window_count, self.window_skipped = {}, 0, 0
        return averaged

    def _non_finite(self, loss: Tensor) -> None:
        """A NaN/inf meta-loss: stop with the last good checkpoint, or skip the batch."""
        if not self.skip_non_finite:
            last = self.checkpoint_dir / "last.pt"
            kept = f"{last} is the last good checkpoint" if last.exists() else "no checkpoint yet"
            raise NumericalError(
                f"the meta-training loss became {loss.item()} at iteration {self.iteration}; "
                f"{kept}. Lower optimizer.lr or the inner learning rate, or set "
                "trainer.skip_non_finite=true to skip such batches"
            )
        self.skipped_batches += 1
        self.window_skipped += 1
        log.warning("skipped a non-finite loss at iteration %d", self.iteration)

    def _stop_if_asked(self, agreed: bool = False) -> None:
        """Stop at a safe point. Several processes stop only where they agreed to (between
        iterations), so that none is left waiting in a collective for the others."""
        if not self.parallel.active:
            signum = self.stop_signal
        else:
            signum = self.agreed_stop if agreed else None
        if signum is not None:
            raise RunInterrupted(signum, self.iteration)

    def _validate(self) -> None:
        s = self.settings
        # Saved as pending if a signal interrupts it, so a resumed run validates this iteration.
        self.pending_validation = True
        scores = self._evaluate("val", s.val_episodes, VAL_EPISODE_SEED)
        metric = self.algorithm.primary_metric
        mean, ci95 = mean_and_ci95(scores[metric])
        summary = {name: mean_and_ci95(values)[0] for name, values in scores.items()}
        summary[f"{metric}_ci95"] = ci95
        self.logger.scalars("meta_val", summary, self.iteration)
        self.logger.flush()
        improved = self.best_value is None or (
            mean > self.best_value if self.algorithm.higher_is_better else mean < self.best_value
        )
        self.pending_validation = False
        if improved:
            self.best_value, self.best_iteration = mean, self.iteration
            self._save("best.pt")
        log.info(
            "meta-val @ %d: %s%s",
            self.iteration,
            format_metric(metric, mean, ci95),
            " (best)" if improved else "",
        )
        self.algorithm.train()

    def _meta_test(self) -> dict[str, Any]:
        s = self.settings
        self.testing = True
        best_path = self.checkpoint_dir / "best.pt"
        if self.parallel.is_main and best_path.exists():
            self.algorithm.load_state_dict(load_checkpoint(best_path)["algorithm"])
        self.parallel.broadcast_module(self.algorithm)
        scores = self._evaluate("test", s.test_episodes, TEST_EPISODE_SEED)
        metric = self.algorithm.primary_metric
        mean, ci95 = mean_and_ci95(scores[metric])
        summary = {name: mean_and_ci95(values)[0] for name, values in scores.items()}
        summary[f"{metric}_ci95"] = ci95
        self.logger.scalars("meta_test", summary, self.iteration)
        meta_test = {
            "metric": metric,
            "mean": mean,
            "ci95": ci95,
            "episodes": len(scores[metric]),
            "loss": summary["loss"],
        }
        results = self._write_results(complete=True, meta_test=meta_test)
        self.logger.hparams_end(complete=True)
        log.info(
            "meta-test (%d episodes, best checkpoint from iteration %s): %s",
            len(scores[metric]),
            self.best_iteration,
            format_metric(metric, mean, ci95),
        )
        return results

    # ----------------------------------------------------------------------------- helpers
    def _write_results(self, complete: bool, **extra: Any) -> dict[str, Any]:
        """results.json; an interrupted run writes one too, marked incomplete."""
        results = {
            **self.run_info,
            "best_val": {
                "metric": self.algorithm.primary_metric,
                "value": self.best_value,
                "iteration": self.best_iteration,
            },
            "iterations": self.iteration,
            "skipped_batches": self.skipped_batches,
            "wall_time_s": self.elapsed_before_resume + self._session_elapsed(),
            "complete": complete,
            **extra,
        }
        if self.parallel.is_main:
            write_json(self.run_dir / "results.json", results)
        return results

    def _evaluate(self, split: str, episodes: int, seed: int) -> dict[str, list[float]]:
        self.algorithm.eval()
        batches = episode_batches(
            self.samplers[split], episodes, self.settings.eval_batch_size, seed
        )
        desc = "meta-val" if split == "val" else "meta-test"
        show = self.settings.progress and self.parallel.is_main
        # Several processes deal the batches out and gather the scores back in batch order.
        local: list[tuple[int, dict[str, list[float]]]] = []
        with tqdm(total=episodes, desc=desc, leave=False, disable=not show) as bar:
            for index, batch in enumerate(batches):
                if self.parallel.mine(index):
                    self._stop_if_asked()
                    with self.precision.autocast():
                        metrics = self.algorithm.evaluate(batch.to(self.device))
                    local.append((index, {name: values.double().cpu().tolist()
                                          for name, values in metrics.items()}))
                bar.update(batch.meta_batch_size)
        return self.parallel.gather_scores(local)

    def _save(self, name: str) -> None:
        if not self.parallel.is_main:
            return
        save_checkpoint(self.checkpoint_dir / name, self.state(), keep_previous=name == "last.pt")

    def _session_elapsed(self) -> float:
        start = getattr(self, "_session_start", None)
        return 0.0 if start is None else time.perf_counter() - start


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _catch_stop_signals(handler: Callable[[int, Any], None]) -> dict[int, Any] | None:
    """Route SIGINT/SIGTERM to ``handler`` (main thread only: elsewhere signals can't be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {signum: signal.signal(signum, handler) for signum in _STOP_SIGNALS}


def _restore_signals(previous: dict[int, Any] | None) -> None:
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def _configuration_id(hparams: dict[str, Any]) -> str:
    """Names a configuration regardless of its seed, so seeds form one HParams session group."""
    settings = {key: value for key, value in hparams.items() if key != "seed"}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def meta_update(loss: Tensor, share: float, algorithm: MetaAlgorithm,
                optimizer: torch.optim.Optimizer, precision: Precision,
                parallel: Parallel) -> tuple[bool, float | None]:
    """One optimizer step from this process's meta-loss on its ``share`` of the meta-batch:
    whether it was taken (fp16 skips overflowing steps) and the norm ``clip_meta_gradient`` saw.

    fp16: the scaled gradients are reduced, so every rank's scaler sees the same ones and skips
    (an overflow: not a non-finite loss) or steps with the others. The clip comes after the
    reduction and the unscale, so it bounds the whole meta-batch's true gradient.
    """
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    parallel.reduce_gradients(algorithm.parameters(), share)
    norm = clip_meta_gradient(algorithm, optimizer, precision)
    return precision.step(optimizer), norm


def clip_meta_gradient(algorithm: MetaAlgorithm, optimizer: torch.optim.Optimizer,
                       precision: Precision) -> float | None:
    """Clip the gradients to the algorithm's ``meta_grad_clip`` as ``clip_grad_norm_`` does, and
    return their global norm before clipping (None: the algorithm asks for no clip).

    Called on the summed gradients of every process (each rank clips the same ones: the update is
    one process's with the whole meta-batch) and, under fp16, after the loss scale is divided out,
    so the bound applies to the true meta-gradient. An inf/NaN gradient gives an infinite or NaN
    norm; the scaler has already seen it and skips the step.
    """
    max_norm = algorithm.meta_grad_clip
    if max_norm is None:
        return None
    precision.unscale(optimizer)
    gradients = [p for p in algorithm.parameters() if p.grad is not None]
    if not gradients:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(gradients, max_norm))


def episode_batches(
    sampler: EpisodeSampler, episodes: int, batch_size: int, seed: int
) -> Iterator[TaskBatch]:
    """The same ``episodes`` tasks for a given seed, drawn lazily in batches (never all held)."""
    generator = torch.Generator().manual_seed(seed)
    remaining = episodes
    while remaining > 0:
        size = min(batch_size, remaining)
        yield sampler.sample(size, generator)
        remaining -= size


def _postfix(averaged: dict[str, float], metric: str) -> dict[str, str]:
    """The progress bar's numbers; none for a window whose batches were all skipped."""
    shown = {"loss": f"{averaged['loss']:.3f}"} if "loss" in averaged else {}
    if metric == "accuracy" and "accuracy" in averaged:
        shown["acc"] = f"{100 * averaged['accuracy']:.1f}%"
    elif metric in averaged:
        shown[metric] = f"{averaged[metric]:.3f}"
    return shown


class _Silent:
    """The logger of a process that is not rank 0: it writes nothing."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None
