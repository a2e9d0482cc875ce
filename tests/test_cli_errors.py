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
        (["trainer.max_iters=abc"], ["trainer.max_iters=abc", "must be an integer"]),
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


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["trainer.max_iters=1e9"],
            "trainer.max_iters=1e9 is not allowed: trainer.max_iters must be an integer, "
            "e.g. trainer.max_iters=1000000000",
        ),
        (["task.ways=five"], "task.ways=five is not allowed: task.ways must be an integer"),
        (
            ["trainer.progress=maybe"],
            "trainer.progress=maybe is not allowed: trainer.progress must be true or false",
        ),
        (["threads=auto"], "threads=auto is not allowed: threads must be an integer or null"),
        (["-m", "seed=0,1,two"], "seed=two is not allowed: seed must be an integer"),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(tmp_path, overrides, expected):
    proc = run_metarun(*overrides, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"metarun: error: {expected}"), proc.stderr
    assert proc.stdout == ""
    assert not list(tmp_path.iterdir())  # refused before Hydra made any folder


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


@pytest.mark.parametrize(
    "override",
    [
        "trainer=paper",  # a config group, not a value
        "task.ways='5'",  # the schema converts it, as Hydra does
        "trainer.max_iters=${oc.env:MAX_ITERS,5}",
        "threads=null",
        "trainer.progress=false",
        "algo.inner_lr=abc",  # untyped: the algorithm checks it when built
        "+trainer.extra=1",
        "~threads",
    ],
)
def test_values_the_schema_takes_pass_the_type_check(override):
    from metarun.config import check_override_types

    check_override_types([override])
