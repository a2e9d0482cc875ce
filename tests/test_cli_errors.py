"""Every config a user can get wrong fails before training, in one line, with no traceback."""

from __future__ import annotations

import pytest

from tests.runs import run_metarun


def assert_refused(proc, *expected: str) -> None:
    assert proc.returncode != 0, proc.stdout[-2000:]
    for text in expected:
        assert text in proc.stderr, f"{text!r} not in:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["algo=mamll"], ["Could not find 'algo/mamll'", "maml"]),
        (["trainer.max_iters=abc"], ["trainer.max_iters", "could not be converted to Integer"]),
        (["task.shots=0"], ["task.shots=0 is not allowed"]),
        (["task.meta_batch_size=-3"], ["task.meta_batch_size=-3 is not allowed"]),
        (["optimizer.lr=-1"], ["optimizer.lr=-1", "positive"]),
        (["optimizer.lr=0"], ["optimizer.lr=0", "positive"]),
        (["algo.inner_lr=abc"], ["algo.inner_lr"]),
        (["backbone=conv4"], ["conv4", "use backbone=mlp"]),
        (["trainer.device=gpu7"], ["trainer.device='gpu7'"]),
    ],
)
def test_bad_config_is_refused_with_its_message(tmp_path, overrides, expected):
    proc = run_metarun(*overrides, cwd=tmp_path, timeout=120)
    assert_refused(proc, *expected)
    # Nothing half-written: a refused run leaves no output folder.
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))
    assert not list(tmp_path.glob("outputs/*/*"))


def test_resume_of_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    proc = run_metarun(f"resume={tmp_path / 'not_a_run'}", cwd=tmp_path, timeout=120)
    assert_refused(proc, "not a metarun run folder")
    assert list((tmp_path / "not_a_run").iterdir()) == []


def test_resume_refuses_to_change_the_experiment(tmp_path):
    from tests.runs import SINUSOID_TINY, check_ok

    check_ok(run_metarun(*SINUSOID_TINY, "trainer.max_iters=2", "hydra.run.dir=run", cwd=tmp_path))
    proc = run_metarun(f"resume={tmp_path / 'run'}", "algo.inner_lr=0.5", cwd=tmp_path)
    assert_refused(
        proc,
        "cannot change algo.inner_lr when resuming",
        "saved with algo.inner_lr=0.01",
        "gives algo.inner_lr=0.5",
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["task.ways=1000"], ["task.ways=1000", "688"]),
        (["task.shots=10", "task.queries=15"], ["20 images per class"]),
    ],
)
def test_impossible_omniglot_task_is_refused(
    tmp_path, shared_data_root, omniglot_cache_dir, overrides, expected
):
    proc = run_metarun(
        "dataset=omniglot",
        f"dataset.root={shared_data_root}",
        f"dataset.cache_dir={omniglot_cache_dir}",
        *overrides,
        cwd=tmp_path,
        timeout=120,
    )
    assert_refused(proc, *expected)
