"""From a composed config to live objects: dataset, samplers, backbone, algorithm, optimizer and
its learning-rate schedule.

Every component is built by `hydra.utils.instantiate` from its config's ``_target_``: adding an
algorithm, dataset or backbone is one module and one yaml file, never a branch here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metarun import __version__, distributed
from metarun.algorithms.base import MetaAlgorithm
from metarun.checkpoint import load_checkpoint, previous_path
from metarun.config import validate
from metarun.data.episodes import EpisodeSampler
from metarun.errors import CheckpointError, ConfigError, MetarunError
from metarun.logging import flat_hparams
from metarun.precision import check_precision
from metarun.resume import RECORDED_GROUPS, resumed_config, saved_choices
from metarun.trainer import Trainer, TrainerSettings

log = logging.getLogger("metarun")

EVAL_SPLITS = ("val", "test")


@dataclass
class Components:
    algorithm: MetaAlgorithm
    optimizer: torch.optim.Optimizer
    #: Steps the optimizer's learning rate once per meta-iteration; None: a constant rate.
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    #: Meta-training draws (as the algorithm asks for them) and the meta-val/test samplers.
    training_batches: Callable[[torch.Generator], Any]
    samplers: dict[str, EpisodeSampler]
    device: torch.device


def build(cfg: DictConfig) -> Components:
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    check_precision(_precision(cfg), device)  # before the data loads
    torch.manual_seed(cfg.seed)
    dataset = _instantiate(cfg.dataset, "dataset")
    place_on = getattr(dataset, "place_on", None)
    if place_on is not None:  # image datasets: their uint8 store on the device when it fits
        place_on(device)
    task = cfg.task
    samplers = {
        split: dataset.sampler(split, task.ways, task.shots, task.queries) for split in EVAL_SPLITS
    }
    model = _instantiate(
        cfg.backbone,
        "backbone",
        input_shape=tuple(dataset.input_shape),
        out_features=dataset.output_size(task.ways),
    )
    algorithm = _instantiate(cfg.algo, "algo", model=model, task_type=dataset.task_type)
    training_batches = algorithm.training_batches(
        dataset, task.ways, task.shots, task.queries, task.meta_batch_size
    )
    algorithm.to(device)
    optimizer = _instantiate(cfg.optimizer, "optimizer")(params=algorithm.parameters())
    scheduler = build_scheduler(cfg.get("scheduler"), optimizer)
    return Components(algorithm, optimizer, scheduler, training_batches, samplers, device)


def build_scheduler(
    node: DictConfig | None, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The schedule on the meta-optimizer, whoever computes its gradient; None for
    ``scheduler=none`` (an empty node) and for configs saved before schedules existed."""
    if not node:
        return None
    return _instantiate(node, "scheduler")(optimizer=optimizer)


#: Config keys that say where things are or how a run is displayed, not how it learns: left out
#: of TensorBoard's HParams table.
NOT_HYPERPARAMETERS = frozenset(
    {
        "resume",
        "threads",
        "dataset.root",
        "dataset.cache_dir",
        "dataset.download",
        "dataset.in_memory",
        "dataset.on_device",
        "dataset.path",
        "dataset.split_lists",
        "trainer.progress",
        "trainer.log_every",
        "trainer.ckpt_every",
        "trainer.eval_batch_size",
    }
)


def run_hparams(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """The run's settings for TensorBoard's HParams tab: the options picked and every value."""
    picked = {group: choices[group] for group in RECORDED_GROUPS if choices.get(group)}
    values = OmegaConf.to_container(cfg, resolve=True)
    return {**picked, **flat_hparams(values, skip=NOT_HYPERPARAMETERS)}


def make_trainer(cfg: DictConfig, run_dir: Path, choices: dict[str, str]) -> Trainer:
    """Build the run; with ``resume`` set, restore it from ``<run dir>/checkpoints/last.pt``.

    ``choices`` are the config group options picked (``{"algo": "fomaml", ...}``): they name the
    run in results.json.
    """
    resume_state = None
    run_info = {
        **{group: choices.get(group) for group in RECORDED_GROUPS},
        "metarun_version": __version__,
    }
    if cfg.resume:
        last = Path(cfg.resume) / "checkpoints" / "last.pt"
        if not last.is_file():
            raise CheckpointError(
                f"resume={cfg.resume} is not a metarun run folder (no checkpoints/last.pt); "
                "pass the run folder that metarun printed when the run started"
            )
        resume_state = _load_resume_state(last)
        saved_run_info = resume_state.get("run_info", run_info)
        cfg = resumed_config(
            resume_state["config"], cfg, saved_choices(Path(cfg.resume), saved_run_info)
        )
        run_info = dict(saved_run_info)
    parts = build(cfg)
    parallel = distributed.start(parts.device.type)
    settings = TrainerSettings(
        max_iters=cfg.trainer.max_iters,
        val_every=cfg.trainer.val_every,
        val_episodes=cfg.trainer.val_episodes,
        test_episodes=cfg.trainer.test_episodes,
        log_every=cfg.trainer.log_every,
        ckpt_every=cfg.trainer.ckpt_every,
        eval_batch_size=cfg.trainer.eval_batch_size,
        progress=cfg.trainer.progress,
        skip_non_finite=cfg.trainer.skip_non_finite,
        precision=_precision(cfg),
    )
    run_info["task"] = OmegaConf.to_container(cfg.task)
    run_info["seed"] = cfg.seed
    trainer = Trainer(
        parts.algorithm,
        parts.optimizer,
        parts.training_batches,
        parts.samplers,
        settings,
        run_dir=run_dir,
        seed=cfg.seed,
        device=parts.device,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        run_info=run_info,
        hparams=run_hparams(cfg, choices),
        scheduler=parts.scheduler,
        parallel=parallel,
    )
    if resume_state is not None:
        try:
            trainer.restore(resume_state)
        except (KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(
                f"{cfg.resume}/checkpoints/last.pt does not match this run's model, optimizer or "
                f"schedule ({type(err).__name__}); it was written by a different configuration"
            ) from err
    return trainer


def _load_resume_state(last: Path) -> dict[str, Any]:
    """``last.pt``, or the checkpoint it replaced when ``last.pt`` is corrupt (saying so)."""
    try:
        return load_checkpoint(last)
    except CheckpointError as err:
        previous = previous_path(last)
        if not previous.is_file():
            raise
        state = load_checkpoint(previous)
        log.warning(
            "%s; resuming from the previous checkpoint %s (iteration %d) instead",
            err,
            previous.name,
            state["iteration"],
        )
        return state


def _precision(cfg: DictConfig) -> str:
    """trainer.precision; float32 for a config saved before it existed (a resumed run's)."""
    return str(cfg.trainer.get("precision", "fp32"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process under torchrun
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; use auto or cpu")
    return device


def _instantiate(node: DictConfig, group: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, MetarunError):
            cause = cause.__cause__
        if isinstance(cause, MetarunError):
            raise cause from None
        raise ConfigError(f"could not build {group}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
