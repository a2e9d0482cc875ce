"""The `metarun` command: Hydra composes the config, `build` makes the run, the trainer runs it.

Heavy imports (torch, tensorboard) happen inside the job, so a mistyped option fails at once.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from metarun import sweep
from metarun.config import check_override_types, register_configs
from metarun.errors import MetarunError

log = logging.getLogger("metarun")


def _is_run(folder: str | None) -> bool:
    return bool(folder) and (Path(str(folder)) / "checkpoints" / "last.pt").is_file()


def run_dir_for(resume: str | None, fresh_dir: str) -> str:
    """Resolver for ``hydra.run.dir``: a resumed run keeps writing into its own folder.

    A ``resume`` that is not a run gets a fresh folder (removed again when the run is refused),
    so a mistyped path never has folders created in it.
    """
    return str(resume) if _is_run(resume) else fresh_dir


def hydra_subdir_for(resume: str | None) -> str:
    """Resolver for ``hydra.output_subdir``: resuming must not overwrite the original config."""
    if not _is_run(resume):
        return ".hydra"
    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def _register_resolvers() -> None:
    OmegaConf.register_new_resolver("metarun_run_dir", run_dir_for, replace=True)
    OmegaConf.register_new_resolver("metarun_hydra_subdir", hydra_subdir_for, replace=True)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        from metarun.threads import apply_threads

        apply_threads(cfg.get("threads"), hydra_cfg.launcher, multirun)
        _place_on_gpu(cfg, hydra_cfg, multirun)

        from metarun.build import make_trainer
        from metarun.trainer import RunInterrupted

        log.info("run folder: %s", run_dir)
        trainer = make_trainer(cfg, run_dir, dict(hydra_cfg.runtime.choices))
        try:
            results = trainer.run()
        except RunInterrupted as stop:
            print(
                f"metarun: {stop}; the run is saved. Resume it with:\n"
                f"  metarun resume={run_dir}",
                file=sys.stderr,
            )
            sys.exit(128 + stop.signum)
    except MetarunError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"metarun: error: {err}", file=sys.stderr)
        if not multirun:
            _discard_if_empty(run_dir)
            sys.exit(2)
        # In a sweep, one job's mistake must not hide the others: record it, carry on.
        sweep.record_failure(run_dir, err)
        return None
    except Exception as err:
        if multirun:
            sweep.record_failure(run_dir, err)
        raise
    log.info("results: %s", run_dir / "results.json")
    return sweep.objective(results)


def _place_on_gpu(cfg: DictConfig, hydra_cfg: Any, multirun: bool) -> None:
    """A job of a parallel sweep on a machine with several GPUs gets its own (threads.py)."""
    import torch

    from metarun.threads import sweep_device, usable_cores

    if not torch.cuda.is_available():
        return
    placed = sweep_device(str(cfg.trainer.device), hydra_cfg.launcher, multirun,
                          int(hydra_cfg.job.num), torch.cuda.device_count(), usable_cores())
    if placed is not None:
        cfg.trainer.device, reason = placed
        log.info("device: %s (%s)", cfg.trainer.device, reason)


def _discard_if_empty(run_dir: Path) -> None:
    """A run refused before it started leaves no folder behind, only its error message."""
    if (run_dir / "checkpoints").exists() or (run_dir / "results.json").exists():
        return
    leftovers = [p for p in run_dir.iterdir() if p.name != ".hydra" and p.suffix != ".log"]
    if not leftovers:
        logging.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)


def _check_command_line(argv: list[str]) -> None:
    """Refuse a value of the wrong type in one line, before Hydra composes (and dumps) it."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return  # Hydra's own report, with its stack trace, was asked for
    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:
        return  # a malformed command line: Hydra says what is wrong with it
    try:
        check_override_types(args.overrides)
    except MetarunError as err:
        print(f"metarun: error: {err}", file=sys.stderr)
        sys.exit(2)


def _follower_overrides() -> list[str]:
    """Under torchrun or SLURM, processes other than rank 0 write nothing: Hydra's folder,
    config copy and log go to a temporary folder (removed at exit), and they log warnings only.
    Rank 0 keeps the run folder the user sees."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID")
    if not rank or rank == "0" or int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return []
    scratch = tempfile.mkdtemp(prefix=f"metarun-rank{rank}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    logging.getLogger("metarun").setLevel(logging.WARNING)
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null",
            "hydra.job_logging.root.level=WARNING"]


def main() -> None:
    _check_command_line(sys.argv[1:])
    sys.argv += _follower_overrides()
    register_configs()
    _register_resolvers()
    code: int | str | None = 1
    try:
        _run()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        if "torch.distributed" in sys.modules:
            from metarun.distributed import stop

            stop(all_finished=code == 0)
    failed_jobs = sweep.report()
    sys.exit(1 if failed_jobs and not code else code)


if __name__ == "__main__":
    main()
