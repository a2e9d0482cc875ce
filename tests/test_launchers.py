"""Hydra launchers for real: joblib and submitit_local sweeps run here; SLURM through fakes.

SLURM cannot run here, so `sbatch`, `srun`, `sacct` and `scancel` are small fakes on PATH:
sbatch keeps the batch script that submitit wrote and runs its array tasks on this machine, the
way SLURM would (environment, array throttle, log files); sacct reports their states. The real
submitit and the real batch script do the rest, so the sweep ends only if the script works.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from datetime import datetime
from pathlib import Path

import pytest

from metarun.errors import ConfigError
from metarun.threads import apply_threads, choose_threads, joblib_parallel_jobs
from tests.runs import check_ok, read_results, run_metarun

#: Smaller than SINUSOID_TINY: these tests are about processes, not learning.
TINY = [
    "trainer.max_iters=10",
    "trainer.val_every=10",
    "trainer.val_episodes=10",
    "trainer.test_episodes=10",
    "trainer.log_every=10",
    "trainer.ckpt_every=10",
    "trainer.eval_batch_size=10",
    "trainer.progress=false",
]
#: Every job's log lines start with the process id and the time, to tell jobs apart.
LOG_FORMAT = "hydra.job_logging.formatters.simple.format='%(process)d %(asctime)s %(message)s'"
LOG_LINE = re.compile(r"^(\d+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (.*)$")
#: Each job's torch on one thread, as a test on a shared machine should.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def job_log(job_dir: Path) -> list[tuple[int, datetime, str]]:
    """``(pid, time, message)`` for each line of the job's log (written with LOG_FORMAT)."""
    lines = []
    for line in (job_dir / "cli.log").read_text().splitlines():
        match = LOG_LINE.match(line)
        if match:
            time = datetime.strptime(match[2], "%Y-%m-%d %H:%M:%S,%f")
            lines.append((int(match[1]), time, match[3]))
    return lines


def assert_jobs_finished(sweep: Path, count: int) -> list[Path]:
    jobs = job_dirs(sweep)
    assert [p.name for p in jobs] == [str(n) for n in range(count)]
    for job in jobs:
        assert read_results(job)["complete"] is True
    return jobs


# --- the threads rule ----------------------------------------------------------------------------

JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
BASIC = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


@pytest.mark.parametrize(
    ("n_jobs", "cores", "threads"),
    [(-1, 8, 1), (2, 8, 4), (3, 8, 2), (16, 8, 1), (-2, 8, 1), (-7, 8, 4), (None, 8, 8), (1, 2, 2)],
)
def test_joblib_jobs_share_the_usable_cores(n_jobs, cores, threads):
    choice = choose_threads(None, {"_target_": JOBLIB, "n_jobs": n_jobs}, True, cores)
    assert choice.threads == threads


def test_joblib_counts_jobs_as_joblib_does():
    counts = [joblib_parallel_jobs(n, 8) for n in (-1, -2, -8, -20, 1, 5, None)]
    assert counts == [8, 7, 1, 1, 1, 5, 1]


def test_threads_setting_wins_and_single_runs_keep_torch_default():
    assert choose_threads(3, {"_target_": JOBLIB, "n_jobs": -1}, True, 8).threads == 3
    # A single run ignores hydra/launcher: it runs in this process, alone.
    assert choose_threads(None, {"_target_": JOBLIB, "n_jobs": 4}, False, 8).threads is None
    assert choose_threads(None, {"_target_": BASIC}, True, 8).threads is None
    assert choose_threads(None, {"_target_": SLURM, "cpus_per_task": 6}, True, 64).threads == 6
    unset = {"_target_": SLURM, "cpus_per_task": None}
    assert choose_threads(None, unset, True, 64).threads is None
    with pytest.raises(ConfigError, match="threads must be an integer >= 1"):
        choose_threads(0, None, False, 8)


def test_apply_threads_sets_torch():
    import torch

    before = torch.get_num_threads()
    try:
        assert apply_threads(2, None, False) == 2
        assert torch.get_num_threads() == 2
        assert apply_threads(None, {"_target_": JOBLIB, "n_jobs": 10**6}, True) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# --- joblib ----------------------------------------------------------------------------------


def test_joblib_sweep_runs_jobs_side_by_side_one_thread_each(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_metarun(
        "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *TINY, LOG_FORMAT,
        "hydra.sweep.dir=sweep", cwd=tmp_path, env=ONE_THREAD,
    )
    check_ok(proc)
    assert "2 of 2 jobs finished" in proc.stdout
    logs = [job_log(job) for job in assert_jobs_finished(tmp_path / "sweep", 2)]
    pids = [{pid for pid, _, _ in log} for log in logs]
    # Each job in a worker process of its own ...
    assert all(len(job_pids) == 1 for job_pids in pids)
    assert len(pids[0] | pids[1]) == 2
    # ... at the same time: each job started before the other one ended.
    (start_0, end_0), (start_1, end_1) = [(log[0][1], log[-1][1]) for log in logs]
    assert start_0 < end_1 and start_1 < end_0
    cores = len(os.sched_getaffinity(0))
    expected = f"threads: {max(1, cores // 2)} (joblib: 2 jobs at once on {cores} usable cores)"
    for log in logs:
        assert [msg for _, _, msg in log if msg.startswith("threads:")] == [expected]


# --- submitit_local ----------------------------------------------------------------------------


def test_submitit_local_sweep_runs_each_job_in_its_own_process(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    proc = run_metarun(
        "-m", "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1", "seed=0,1",
        *TINY, LOG_FORMAT, "hydra.sweep.dir=sweep", cwd=tmp_path, env=ONE_THREAD,
    )
    check_ok(proc)
    jobs = assert_jobs_finished(tmp_path / "sweep", 2)
    pids = [{pid for pid, _, _ in job_log(job)} for job in jobs]
    assert len(pids[0] | pids[1]) == 2
    for job in jobs:
        assert "threads: 1 (submitit: cpus_per_task=1)" in (job / "cli.log").read_text()
    # submitit's own files: a folder per job with its result and its output.
    submitit = tmp_path / "sweep" / ".submitit"
    assert len(list(submitit.glob("*/*_0_result.pkl"))) == 2
    outputs = "".join(path.read_text() for path in submitit.glob("*/*_0_log.out"))
    for job in jobs:
        assert f"run folder: {job.resolve()}" in outputs


# --- SLURM, through fakes ----------------------------------------------------------------------

FAKE_SBATCH = r'''
"""sbatch: keep the script, answer with a job id, run the array's tasks in the background."""
import os, re, shlex, subprocess, sys, time
from pathlib import Path

state = Path(os.environ["FAKE_SLURM_DIR"])

def expand(path, job, task):
    return (path.replace("%A", job).replace("%a", str(task)).replace("%j", f"{job}_{task}")
            .replace("%t", "0"))

def run_array(job, script):
    text = script.read_text()
    found = re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M)
    options = {key: shlex.split(value)[0] for key, value in found}
    first, last, throttle = re.fullmatch(r"(\d+)-(\d+)%(\d+)", options["array"]).groups()
    pending = list(range(int(first), int(last) + 1))
    running = {}
    while pending or running:
        while pending and len(running) < int(throttle):
            task = pending.pop(0)
            env = dict(os.environ, SLURM_JOB_ID=f"{job}{task:03d}", SLURM_ARRAY_JOB_ID=job,
                       SLURM_ARRAY_TASK_ID=str(task), SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1",
                       SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0",
                       SLURM_JOB_NODELIST="localhost")
            out = open(expand(options["output"], job, task), "ab")
            err = open(expand(options["error"], job, task), "ab")
            running[task] = subprocess.Popen(["bash", str(script)], env=env, stdout=out, stderr=err)
            (state / f"{job}_{task}.state").write_text("RUNNING")
        for task, process in list(running.items()):
            if process.poll() is not None:
                result = "COMPLETED" if process.returncode == 0 else "FAILED"
                (state / f"{job}_{task}.state").write_text(result)
                del running[task]
        time.sleep(0.1)

if sys.argv[1] == "--run":
    run_array(sys.argv[2], Path(sys.argv[3]))
    sys.exit(0)
job = str(1000 + len(list(state.glob("job-*.sh"))))
script = state / f"job-{job}.sh"
script.write_text(Path(sys.argv[-1]).read_text())
array = re.search(r"^#SBATCH --array=(\d+)-(\d+)", script.read_text(), re.M)
if array is None:
    sys.exit("fake sbatch: runs job arrays only (a sweep of two jobs or more)")
for task in range(int(array[1]), int(array[2]) + 1):
    (state / f"{job}_{task}.state").write_text("PENDING")
runner = subprocess.Popen([sys.executable, __file__, "--run", job, str(script)],
                          start_new_session=True, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
(state / f"runner-{job}.pid").write_text(str(runner.pid))
print(f"Submitted batch job {job}")
'''

FAKE_SRUN = r'''
"""srun: one task on this node, its output and error into the files named by the flags."""
import os, subprocess, sys
args, files = sys.argv[1:], {"--output": os.devnull, "--error": os.devnull}
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in files:
        files[flag] = args.pop(0)
job, task = os.environ["SLURM_ARRAY_JOB_ID"], os.environ["SLURM_ARRAY_TASK_ID"]
def expand(path):
    return (path.replace("%A", job).replace("%a", task).replace("%j", f"{job}_{task}")
            .replace("%t", "0"))
with open(expand(files["--output"]), "ab") as out, open(expand(files["--error"]), "ab") as err:
    sys.exit(subprocess.call(args, stdout=out, stderr=err))
'''

FAKE_SACCT = r'''
"""sacct -o JobID,State,NodeList --parsable2 -j ID ...: the states the fake sbatch wrote."""
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"])
jobs = [sys.argv[i + 1] for i, arg in enumerate(sys.argv) if arg == "-j"]
print("JobID|State|NodeList")
for job in jobs:
    for path in sorted(state.glob(f"{job}_*.state")):
        print(f"{path.name.removesuffix('.state')}|{path.read_text()}|localhost")
'''

FAKE_SCANCEL = r'''
"""scancel: nothing to cancel here; noted, so a test can see it was asked."""
import os, sys
from pathlib import Path
with open(Path(os.environ["FAKE_SLURM_DIR"]) / "scancel.log", "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\n")
'''


@pytest.fixture
def fake_slurm(tmp_path):
    """A bin folder with fake SLURM commands and the folder they keep their state in."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir, state = tmp_path / "fake-slurm-bin", tmp_path / "fake-slurm-state"
    bin_dir.mkdir()
    state.mkdir()
    for name, source in [
        ("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", FAKE_SACCT),
        ("scancel", FAKE_SCANCEL),
    ]:
        command = bin_dir / name
        command.write_text(f"#!{sys.executable}\n{source}")
        command.chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state)}
    yield state, env
    for pid_file in state.glob("runner-*.pid"):  # a failed test leaves no job running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


def test_slurm_sweep_submits_our_settings_and_runs_each_job(tmp_path, fake_slurm):
    state, env = fake_slurm
    proc = run_metarun(
        "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
        "hydra.launcher.cpus_per_task=1", "hydra.launcher.array_parallelism=1",
        "hydra.launcher.setup=['touch setup-ran-$SLURM_ARRAY_TASK_ID']",
        "seed=0,1", *TINY, "hydra.sweep.dir=sweep", cwd=tmp_path, env={**env, **ONE_THREAD},
    )
    check_ok(proc)
    (script_path,) = state.glob("job-*.sh")
    script = script_path.read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, re.M))
    # The command line's settings ...
    assert sbatch["partition"] == "debug"
    assert sbatch["cpus-per-task"] == "1"
    assert sbatch["array"] == "0-1%1"
    # ... and the documented defaults of configs/hydra/launcher/slurm.yaml.
    assert sbatch["time"] == "720"
    assert sbatch["gpus-per-node"] == "1"
    assert sbatch["mem"] == "16GB"
    assert sbatch["job-name"] == "metarun"
    assert sbatch["signal"] == "USR2@120"
    assert sbatch["output"].startswith(str(tmp_path / "sweep" / ".submitit"))
    assert "touch setup-ran-$SLURM_ARRAY_TASK_ID" in script
    # The script ran as SLURM would run it: its setup lines, then the job, for each task.
    assert sorted(p.name for p in tmp_path.glob("setup-ran-*")) == ["setup-ran-0", "setup-ran-1"]
    jobs = assert_jobs_finished(tmp_path / "sweep", 2)
    job_id = script_path.stem.removeprefix("job-")
    for task, job in enumerate(jobs):
        assert "threads: 1 (submitit: cpus_per_task=1)" in (job / "cli.log").read_text()
        logs = tmp_path / "sweep" / ".submitit" / f"{job_id}_{task}"
        assert "run folder:" in (logs / f"{job_id}_{task}_0_log.out").read_text()
        assert (logs / f"{job_id}_{task}_0_result.pkl").is_file()
    assert not (state / "scancel.log").exists()


def test_parallel_sweep_jobs_get_their_own_gpu_and_never_share_one_unasked():
    from metarun.errors import ConfigError
    from metarun.threads import sweep_device

    joblib = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
              "n_jobs": 4}
    placed = [sweep_device("auto", joblib, True, job, gpus=4, cores=16)[0] for job in range(8)]
    assert placed == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"] * 2
    with pytest.raises(ConfigError, match="4 jobs at once on 2 GPUs.*n_jobs=2"):
        sweep_device("cuda", joblib, True, 0, gpus=2, cores=16)
    assert sweep_device("cuda:1", joblib, True, 0, gpus=2, cores=16) is None  # asked to share
    assert sweep_device("auto", joblib, False, 0, gpus=4, cores=16) is None  # a single run
    assert sweep_device("auto", joblib, True, 3, gpus=1, cores=16) is None  # one GPU
    submitit = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher."
                            "SlurmLauncher"}
    assert sweep_device("auto", submitit, True, 3, gpus=4, cores=16) is None  # SLURM places it
