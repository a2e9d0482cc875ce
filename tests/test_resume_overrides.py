"""A requeued job re-runs its original command with resume= appended: equal values resume, a real
change is refused naming the key, the saved value and the new one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from metarun.errors import ConfigError
from metarun.resume import resumed_config
from tests.runs import SINUSOID_TINY, check_ok, read_results, read_scalars, run_metarun
from tests.test_cli_errors import assert_refused

#: The job's command, as a SLURM script would hold it (trainer.max_iters=40 from SINUSOID_TINY).
ORIGINAL = [
    "experiment=maml_sinusoid_k10",
    "seed=3",
    "optimizer.lr=0.001",
    "algo.inner_steps=1",
    "task.shots=10",
    *SINUSOID_TINY,
]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory) -> Path:
    """The job's first attempt, stopped at iteration 20 of 40 (as by a preemption)."""
    root = tmp_path_factory.mktemp("preempted")
    check_ok(run_metarun(*ORIGINAL, "trainer.max_iters=20", "hydra.run.dir=run", cwd=root))
    return root / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_requeued_command_resumes_from_the_checkpoint(preempted, tmp_path):
    run_dir = _copy(preempted, tmp_path)
    # The same values as the first attempt, written differently (1e-3 for 0.001, 1.0 for 1).
    requeued = [o for o in ORIGINAL if not o.startswith(("optimizer.lr", "algo.inner_steps"))]
    proc = run_metarun(
        *requeued, "optimizer.lr=1e-3", "algo.inner_steps=1.0", f"resume={run_dir}", cwd=tmp_path
    )
    check_ok(proc)
    assert "resuming from iteration 20" in proc.stdout + proc.stderr
    results = read_results(run_dir)
    assert results["iterations"] == 40 and results["complete"]
    steps = [step for step, _ in read_scalars(run_dir)["meta_train/loss"]]
    assert steps == [10, 20, 30, 40]
    assert not list(tmp_path.glob("outputs"))  # it wrote into the run, not a new folder


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("seed=4", ["cannot change seed when resuming", "seed=3", "seed=4"]),
        ("optimizer.lr=3e-4", ["cannot change optimizer.lr", "=0.001", "=0.0003"]),
        ("task.shots=5", ["cannot change task.shots", "task.shots=10", "task.shots=5"]),
        ("algo=fomaml", ["cannot change algo when resuming", "algo=maml", "algo=fomaml"]),
        (
            "experiment=maml_omniglot_5w1s",
            ["cannot change experiment", "experiment=maml_sinusoid_k10", "maml_omniglot_5w1s"],
        ),
    ],
)
def test_requeue_with_a_changed_value_is_refused(preempted, tmp_path, change, expected):
    key = change.split("=", 1)[0]
    command = [o for o in ORIGINAL if o.split("=", 1)[0] != key] + [change]
    checkpoint = (preempted / "checkpoints" / "last.pt").read_bytes()
    proc = run_metarun(*command, f"resume={preempted}", cwd=tmp_path)
    assert_refused(proc, *expected)
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1
    assert (preempted / "checkpoints" / "last.pt").read_bytes() == checkpoint
    assert read_results(preempted)["iterations"] == 20


def test_a_group_choice_the_run_folder_no_longer_records_is_refused(preempted, tmp_path):
    run_dir = _copy(preempted, tmp_path)
    (run_dir / ".hydra" / "hydra.yaml").unlink()
    proc = run_metarun(*ORIGINAL, f"resume={run_dir}", cwd=tmp_path)
    assert_refused(proc, "cannot check experiment=maml_sinusoid_k10", "drop experiment=")


SAVED = """
seed: 3
optimizer: {lr: 0.001}
algo: {inner_steps: 1, first_order: false}
backbone: {hidden: [40, 40]}
task: {shots: 10}
trainer: {max_iters: 20, progress: true}
resume: null
threads: null
"""


def _current(**changes) -> DictConfig:
    current = OmegaConf.create(SAVED)
    for key, value in changes.items():
        OmegaConf.update(current, key.replace("__", "."), value, merge=True)
    return current


def _resume(overrides: list[str], current: DictConfig) -> DictConfig:
    choices = {"algo": "maml", "experiment": None}
    return resumed_config(SAVED, current, choices, overrides, choices)


@pytest.mark.parametrize(
    ("override", "value"),
    [
        ("optimizer.lr=1e-3", 1e-3),
        ("task.shots=10.0", 10.0),
        ("seed=3", 3),
        ("backbone.hidden=[40.0,40]", [40.0, 40]),
        ("algo.first_order=false", False),
    ],
)
def test_equal_values_of_another_type_count_as_equal(override, value):
    key = override.split("=", 1)[0]
    current = _current(**{key.replace(".", "__"): value}, trainer__max_iters=40)
    resumed = _resume([override, "trainer.max_iters=40"], current)
    assert resumed.trainer.max_iters == 40  # trainer.* still applies
    assert OmegaConf.select(resumed, key) == OmegaConf.select(OmegaConf.create(SAVED), key)


@pytest.mark.parametrize(
    ("override", "value", "expected"),
    [
        ("algo.first_order=0", 0, "algo.first_order=false, this command gives algo.first_order=0"),
        ("task.shots='10'", "10", "task.shots=10, this command gives task.shots='10'"),
        ("~algo.inner_steps", None, "algo.inner_steps=1, this command removes algo.inner_steps"),
        ("+algo.extra=1", 1, "saved without algo.extra, this command gives algo.extra=1"),
    ],
)
def test_a_different_type_or_a_removed_key_is_a_change(override, value, expected):
    key = override.lstrip("~+").split("=", 1)[0]
    current = _current(**{key.replace(".", "__"): value})
    if override.startswith("~"):
        current.algo.pop("inner_steps")
    with pytest.raises(ConfigError, match=expected.replace("+", r"\+")) as refused:
        _resume([override], current)
    assert "\n" not in str(refused.value)
