"""`metarun-compare`: fake run folders with real event files, then a real sweep end to end."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import yaml
from PIL import Image

from metarun.compare import main
from metarun.compare_plot import aggregate
from metarun.compare_runs import read_runs
from tests.runs import SINUSOID_TINY, check_ok, read_results, run_metarun

COMPARE = str(Path(sys.executable).with_name("metarun-compare"))
REPO_ROOT = Path(__file__).resolve().parents[1]
#: matplotlib's first three default colours: one per configuration of the fake sweep.
TAB10 = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]


def fake_run(
    folder: Path,
    overrides: list[str],
    scalars: dict[str, list[tuple[int, float]]],
    results: dict | None,
) -> Path:
    """A run folder as metarun leaves it: overrides, real TensorBoard events, results.json."""
    from torch.utils.tensorboard import SummaryWriter

    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
    for tag, series in scalars.items():
        for step, value in series:
            writer.add_scalar(tag, value, global_step=step)
    writer.close()
    if results is not None:
        (folder / "results.json").write_text(json.dumps(results))
    return folder


def finished(metric: str, mean: float, seed: int, ci95: float = 0.01) -> dict:
    test = {"metric": metric, "mean": mean, "ci95": ci95, "episodes": 600, "loss": mean}
    return {
        "complete": True,
        "seed": seed,
        "iterations": 40,
        "wall_time_s": 75.0,
        "best_val": {"metric": metric, "value": mean, "iteration": 40},
        "meta_test": test,
    }


def regression_curves(offset: float, last: int = 40) -> dict[str, list[tuple[int, float]]]:
    steps = [step for step in (10, 20, 30, 40) if step <= last]
    return {
        "meta_train/loss": [(step, 4.0 - step / 20 + offset) for step in steps],
        "meta_val/mse": [(step, 3.0 - step / 20 + offset) for step in steps if step % 20 == 0],
        "meta_val/mse_ci95": [(step, 0.1) for step in steps if step % 20 == 0],
    }


def build_fake_sweep(tmp_path: Path) -> Path:
    """Two configurations x two seeds (one seed still running) and one classification run
    that logs other tags and no meta_train/loss."""
    root = tmp_path / "multirun" / "2026-11-25" / "10-00-00"
    common = ["optimizer.lr=0.001", "trainer.max_iters=40"]
    jobs = [
        (["algo=maml", "seed=0"], regression_curves(0.0), finished("mse", 0.5, 0)),
        (["algo=maml", "seed=1"], regression_curves(0.2), finished("mse", 0.7, 1)),
        (["algo=fomaml", "seed=0"], regression_curves(0.5), finished("mse", 0.9, 0)),
        (["algo=fomaml", "seed=1"], regression_curves(0.6, last=20), None),
        (
            ["algo=protonet", "dataset=omniglot", "seed=0"],
            {"meta_val/accuracy": [(20, 0.5), (40, 0.55)], "meta_val/accuracy_ci95": [(40, 0.01)]},
            finished("accuracy", 0.55, 0),
        ),
    ]
    for number, (own, scalars, results) in enumerate(jobs):
        fake_run(root / str(number), own[:1] + common + own[1:], scalars, results)
    return root


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    return build_fake_sweep(tmp_path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def colour_pixels(image: Image.Image, colour: tuple[int, int, int]) -> int:
    return sum(count for count, pixel in image.getcolors(1 << 20) if pixel[:3] == colour)


def test_table_columns_values_and_aggregation(sweep, capsys):
    main([str(sweep)])
    printed = capsys.readouterr().out

    rows = read_csv(sweep / "compare.csv")
    assert [row["run"] for row in rows] == ["0", "1", "2", "3", "4"]
    # Only what differs between runs is a column; the seed has its own; lr is the same in all.
    assert list(rows[0])[:4] == ["run", "algo", "dataset", "seed"]
    assert "optimizer.lr" not in rows[0] and "trainer.max_iters" not in rows[0]
    assert [row["algo"] for row in rows] == ["maml", "maml", "fomaml", "fomaml", "protonet"]
    assert [row["dataset"] for row in rows] == ["", "", "", "", "omniglot"]
    assert [row["seed"] for row in rows] == ["0", "1", "0", "1", "0"]
    assert [row["status"] for row in rows] == ["done", "done", "done", "running", "done"]
    assert [row["metric"] for row in rows] == ["mse", "mse", "mse", "mse", "accuracy"]
    assert [float(row["mean"]) for row in rows if row["mean"]] == [0.5, 0.7, 0.9, 0.55]
    assert rows[3]["mean"] == "" and rows[3]["iterations"] == "20"  # last step it logged

    markdown = (sweep / "compare.md").read_text()
    assert markdown in printed  # the terminal shows the same table
    assert "| 0 | maml | (default) | 0 | mse 0.5000 ± 0.0100 | 40 | 1.2 min | done |" in markdown
    assert "| 3 | fomaml | (default) | 1 | — | 20 |  | running |" in markdown
    assert "accuracy 55.00% ± 1.00" in markdown
    # Seeds aggregated per configuration: mean ± std of the finished seeds' means.
    assert "| algo=maml dataset=(default) | 2 of 2 | mse 0.6000 ± 0.1414 |" in markdown
    assert "| algo=fomaml dataset=(default) | 1 of 2 | mse 0.9000 (one seed) |" in markdown

    # The classification run has no meta_train/loss: plotted without it, and said so.
    assert "note: no meta_train/loss in 1 of 5 runs: 4" in printed
    assert f"wrote {sweep / 'compare.png'}" in printed

    with Image.open(sweep / "compare.png") as image:
        assert image.format == "PNG"
        width, height = image.size
        assert width >= 1000 and height >= 350  # three panels side by side, legend below
        rgb = image.convert("RGB")
    for colour in TAB10:  # each configuration's line was drawn
        assert colour_pixels(rgb, colour) > 100, colour


def test_aggregate_mean_and_min_max_over_seeds():
    steps, mean, low, high = aggregate([[(10, 1.0), (20, 3.0)], [(10, 2.0)], [(10, float("nan"))]])
    assert steps == [10, 20]
    assert mean == [1.5, 3.0] and low == [1.0, 3.0] and high == [2.0, 3.0]


def test_svg_and_chosen_scalars_report_what_is_missing(sweep, tmp_path, capsys):
    out = tmp_path / "plots" / "sweep.svg"
    main([str(sweep), "--out", str(out), "--scalars", "meta_val/accuracy", "meta_train/loss"])
    printed = capsys.readouterr().out
    assert ElementTree.parse(out).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert (tmp_path / "plots" / "sweep.csv").exists() and (
        tmp_path / "plots" / "sweep.md"
    ).exists()
    assert "note: no meta_val/accuracy in 4 of 5 runs: 0, 1, 2, 3 (running)" in printed

    main([str(sweep / "0"), str(sweep / "4"), "--out", str(tmp_path / "two"), "--format", "svg"])
    assert ElementTree.parse(tmp_path / "two" / "compare.svg").getroot().tag.endswith("svg")
    rows = read_csv(tmp_path / "two" / "compare.csv")
    assert [(row["algo"], row["metric"]) for row in rows] == [
        ("maml", "mse"),
        ("protonet", "accuracy"),
    ]


def test_interrupted_and_failed_runs_are_listed_not_refused(tmp_path):
    interrupted = finished("mse", 0.5, 0) | {"complete": False, "interrupted_by": "SIGTERM"}
    interrupted.pop("meta_test")
    fake_run(tmp_path / "a", ["seed=0"], regression_curves(0.0), interrupted)
    failed = fake_run(tmp_path / "b", ["seed=1"], {}, None)
    (failed / "error.json").write_text(json.dumps({"error": "DataError", "message": "no data"}))
    runs = read_runs([tmp_path])
    assert [run.status for run in runs] == ["incomplete (SIGTERM)", "failed: DataError: no data"]
    assert all(run.meta_test is None for run in runs)


def test_a_path_without_runs_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, message in (
        (tmp_path / "empty", "holds no metarun run"),
        (tmp_path / "missing", "does not exist"),
    ):
        proc = subprocess.run([COMPARE, str(path)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2
        assert proc.stderr.startswith("metarun-compare: error: ") and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not (path / "compare.png").exists()


def test_results_table_script_prints_the_same_table(sweep):
    script = REPO_ROOT / "scripts" / "results_table.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(sweep)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 1 | maml | (default) | 1 | mse 0.7000 ± 0.0100 | 40 | 1.2 min | done |" in proc.stdout


def test_real_sweep_end_to_end(tmp_path):
    """The issue's check: a real 2x2 multirun with the joblib launcher, then metarun-compare."""
    sweep_dir = tmp_path / "sweep"
    proc = run_metarun(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "algo=maml,fomaml",
        "optimizer.lr=1e-3,3e-4",
        f"hydra.sweep.dir={sweep_dir}",
        *SINUSOID_TINY,
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    check_ok(proc)
    compared = subprocess.run(
        [COMPARE, str(sweep_dir)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert compared.returncode == 0, compared.stderr

    png = sweep_dir / "compare.png"
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] >= 800 and image.size[1] >= 300

    rows = read_csv(sweep_dir / "compare.csv")
    assert len(rows) == 4
    assert {"algo", "optimizer.lr", "seed", "mean", "ci95"} <= set(rows[0])
    for row in rows:
        job = sweep_dir / row["run"]
        saved = dict(
            line.split("=", 1)
            for line in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        )
        assert (row["algo"], row["optimizer.lr"]) == (saved["algo"], saved["optimizer.lr"])
        test = read_results(job)["meta_test"]
        assert row["metric"] == "mse" and row["status"] == "done"
        assert math.isclose(float(row["mean"]), test["mean"], rel_tol=1e-12)
        assert math.isclose(float(row["ci95"]), test["ci95"], rel_tol=1e-12)
    assert {(row["algo"], float(row["optimizer.lr"])) for row in rows} == {
        (algo, lr) for algo in ("maml", "fomaml") for lr in (1e-3, 3e-4)
    }
    assert (sweep_dir / "compare.md").read_text() in compared.stdout
