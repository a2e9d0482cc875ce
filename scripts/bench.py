"""metarun vs learn2learn, side by side in one process on the same torch, same tasks, same network.

Set-up once (a separate venv with learn2learn 0.2.0 and torch 2.14.1; ~6 GB; the project's own
.venv never needs learn2learn), then run from the repository root::

    bash scripts/setup_bench_env.sh
    OMP_NUM_THREADS=1 .bench-venv/bin/python scripts/bench.py --threads 1 --json bench.json
    .bench-venv/bin/python scripts/bench.py --only 'grad-*'              # gradient agreement
    .bench-venv/bin/python scripts/bench.py --only 'maml-5w1s-*' --repeat 10
    .bench-venv/bin/python scripts/bench.py --list                       # the case names

Cases (``--only`` takes shell-style patterns of their names):

- ``ready``: Omniglot ready time: metarun cold (decode all 32,460 drawings into an empty
  temporary cache) and warm (load that cache); learn2learn cold (its MetaDataset reads every
  image once) and warm (its bookkeeping file exists).
- ``sample-*``: meta-training episodes per second, metarun's sampler vs learn2learn's TaskDataset
  over Omniglot with its benchmark transforms.
- ``maml-*``, ``fomaml-*``, ``protonet-5w5s``: seconds per meta-iteration (forward, backward and
  an Adam step; median of ``--repeat`` after ``--warmup``, the libraries interleaved), and the
  peak memory one iteration adds (see bench_measure.py for how).
- ``train-*``: a whole meta-training iteration with the data included: each library samples
  its own meta-batch with its own pipeline, then the MAML step (see bench_train.py).
- ``grad-*``: float64 meta-gradients of both libraries on the same weights and tasks; the largest
  absolute difference (target <= 1e-6).
- ``miniimagenet``: mini-ImageNet-sized data (synthetic pickles of the real shapes, 1.3 GB in a
  temporary folder): metarun's cache build, warm ready time, episodes/s and peak memory against
  learn2learn's benchmark pipeline on the same files, each side in its own process
  (bench_images.py; also runs alone).

What is held equal and why: bench_steps.py. Timings on a machine running something else are
noisy: prefer OMP_NUM_THREADS=1 with --threads 1 there, and read the load average in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import json
import os
import sys
from pathlib import Path

import torch

try:
    # learn2learn imports gym, whose notice ("Gym has been unmaintained since 2022 ...") is printed
    # on every import; learn2learn's gym part is not used here.
    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn  # noqa: F401
    import bench_images
    import bench_steps
    from bench_data import (
        SAMPLE_CASES,
        L2lOmniglot,
        load_omniglot,
        metarun_ready_times,
        sampling_rates,
    )
    from bench_measure import (
        cpu_seconds_by_kind,
        machine_info,
        median,
        memory_method,
        peak_memory_mib,
        steal_share,
        time_interleaved,
    )
    from bench_steps import (
        STEP_CASES,
        StepCase,
        TimedStep,
        check_same_outputs,
        gradient_agreement,
        make_model,
    )
    from bench_train import TrainCase, time_training
except ModuleNotFoundError as error:
    if error.name not in ("learn2learn", "torchvision"):
        raise
    sys.exit(f"bench: {error.name} is not installed in this Python; run "
             "`bash scripts/setup_bench_env.sh`, then `.bench-venv/bin/python scripts/bench.py`")

from metarun.data.episodes import TaskBatch
from metarun.data.omniglot import Omniglot
from metarun.execution import executed as execution
from metarun.execution import layout

REPO = Path(__file__).resolve().parent.parent
# Training iterations with the data included, at the MAML shapes (second order, 1 step).
TRAIN_CASES = [TrainCase(case) for case in STEP_CASES
               if case.algo == "maml" and not case.first_order and case.inner_steps == 1]
ALL_CASES = (["ready"] + [case.name for case in SAMPLE_CASES] + [case.name for case in STEP_CASES]
             + [case.name for case in TRAIN_CASES] + [f"grad-{case.name}" for case in STEP_CASES]
             + ["miniimagenet"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data = os.environ.get("METARUN_DATA") or str(REPO.parent / "shared" / "data")
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", default=default_data,
                        help="folder with omniglot/ (default: $METARUN_DATA or ../shared/data)")
    parser.add_argument("--repeat", type=int, default=5, help="timed iterations per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT",
                        help="also write the results here")
    parser.add_argument("--only", nargs="+", default=["*"], metavar="PATTERN",
                        help="case-name patterns, e.g. 'maml-5w1s-*' 'grad-*' ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-seconds", type=float, default=2.0,
                        help="how long each library samples per sampling case")
    parser.add_argument("--grad-meta-batch", type=int, default=None,
                        help="tasks per gradient-agreement case (default: the case's meta-batch)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--no-channels-last", action="store_true",
                        help="metarun keeps NCHW everywhere (to measure what its CPU channels-last "
                             "layout gives; see metarun/execution/layout.py)")
    parser.add_argument("--no-relu-swap", action="store_true",
                        help="metarun runs ReLU before max-pool, as written (to measure what "
                             "running it after gives; see metarun/execution/executed.py)")
    parser.add_argument("--no-fused-kernels", action="store_true",
                        help="metarun runs PyTorch's batch-norm and max-pool kernels everywhere "
                             "(to measure what its fused CPU kernels give; "
                             "metarun/execution/kernels/)")
    parser.add_argument("--task-batching", choices=("auto", "loop", "vmap"), default="auto",
                        help="metarun MAML's driver over the tasks (algo.task_batching; default: "
                             "what metarun picks for the device)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.warmup < 0:
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    return args


def selected_cases(patterns: list[str]) -> list[str]:
    chosen = [name for name in ALL_CASES if any(fnmatch.fnmatch(name, p) for p in patterns)]
    if not chosen:
        sys.exit(f"bench: no case matches {' '.join(patterns)}; see --list")
    return chosen


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def task_batch(
    dataset: Omniglot, case: StepCase, tasks: int, seed: int, device: torch.device
) -> TaskBatch:
    sampler = dataset.sampler("train", case.ways, case.shots, case.queries)
    return sampler.sample(tasks, torch.Generator().manual_seed(seed)).to(device)


def time_step_case(case: StepCase, dataset: Omniglot, args: argparse.Namespace,
                   device: torch.device) -> dict[str, object]:
    batch = task_batch(dataset, case, case.meta_batch_size, args.seed, device)
    base = make_model(case, args.seed).to(device)
    check_same_outputs(base, batch)
    steps = {library: TimedStep(library, base, case, batch)
             for library in ("metarun", "learn2learn")}
    samples = time_interleaved(steps, args.warmup, args.repeat, device)
    memory = {library: peak_memory_mib(step, device) for library, step in steps.items()}
    metarun_s, l2l_s = median(samples["metarun"]), median(samples["learn2learn"])
    return {
        "case": case.name, "algo": case.algo, "first_order": case.first_order,
        "ways": case.ways, "shots": case.shots, "queries": case.queries,
        "meta_batch_size": case.meta_batch_size, "inner_steps": case.inner_steps,
        "metarun_s_per_it": metarun_s, "learn2learn_s_per_it": l2l_s, "speedup": l2l_s / metarun_s,
        "metarun_samples_s": samples["metarun"], "learn2learn_samples_s": samples["learn2learn"],
        "metarun_peak_mib": memory["metarun"], "learn2learn_peak_mib": memory["learn2learn"],
    }


def _mib(value: object) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def print_tables(results: dict[str, object]) -> None:
    ready = results["ready"]
    if ready:
        print("\n| Omniglot ready | cold (s) | warm (s) |\n|---|---:|---:|")
        for library in ("metarun", "learn2learn"):
            times = ready[library]
            print(f"| {library} | {times['cold_s']:.2f} | {times['warm_s']:.3f} |")
    if results["sampling"]:
        print("\n| sampling case | metarun episodes/s | learn2learn episodes/s | speed-up |")
        print("|---|---:|---:|---:|")
        for row in results["sampling"]:
            print(f"| {row['case']} ({row['images_per_episode']} images) | "
                  f"{row['metarun_episodes_per_s']:.0f} | {row['learn2learn_episodes_per_s']:.1f} "
                  f"| {row['speedup']:.0f}x |")
    if results["steps"]:
        print("\n| case | metarun s/it | learn2learn s/it | speed-up | metarun peak MiB "
              "| learn2learn peak MiB |\n|---|---:|---:|---:|---:|---:|")
        for row in results["steps"]:
            print(f"| {row['case']} | {row['metarun_s_per_it']:.3f} | "
                  f"{row['learn2learn_s_per_it']:.3f} | {row['speedup']:.2f}x | "
                  f"{_mib(row['metarun_peak_mib'])} | {_mib(row['learn2learn_peak_mib'])} |")
        print(f"\npeak memory: {results['settings']['memory_method']}")
    if results["training"]:
        print("\n| training iteration (data included) | metarun s/it | learn2learn s/it "
              "| speed-up |")
        print("|---|---:|---:|---:|")
        for row in results["training"]:
            print(f"| {row['case']} | {row['metarun_s_per_it']:.3f} | "
                  f"{row['learn2learn_s_per_it']:.3f} | {row['speedup']:.2f}x |")
    if results["gradients"]:
        print("\n| gradient agreement (float64) | tasks | max abs diff | max abs grad | <= 1e-6 |")
        print("|---|---:|---:|---:|---|")
        for row in results["gradients"]:
            print(f"| {row['case']} | {row['meta_batch_size']} | {row['max_abs_diff']:.2e} | "
                  f"{row['max_abs_grad']:.2e} | {'yes' if row['agrees'] else 'NO'} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(ALL_CASES))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.no_channels_last:
        layout.FAST_DTYPES = ()
    execution.SWAP_RELU_AND_POOL = not args.no_relu_swap
    execution.FUSED_KERNELS = not args.no_fused_kernels
    bench_steps.TASK_BATCHING = args.task_batching
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda but torch sees no GPU")
    data_root = Path(args.data).expanduser().resolve()
    if not (data_root / "omniglot").is_dir():
        sys.exit(f"bench: no omniglot/ in {data_root}; pass --data or set METARUN_DATA")
    names = selected_cases(args.only)
    results: dict[str, object] = {
        "machine": machine_info(device),
        "settings": {key: str(value) if isinstance(value, Path) else value
                     for key, value in vars(args).items()}
        | {"data": str(data_root), "cases": names, "memory_method": memory_method(device)},
        "ready": None, "sampling": [], "steps": [], "training": [], "gradients": [],
        "images": None,
    }
    l2l_data: L2lOmniglot | None = None
    cpu_before = cpu_seconds_by_kind()
    try:
        needs_l2l_data = [*SAMPLE_CASES, *TRAIN_CASES]
        if "ready" in names or any(case.name in names for case in needs_l2l_data):
            progress("extracting Omniglot for learn2learn into a temporary folder")
            l2l_data = L2lOmniglot(data_root)
        if "ready" in names:
            progress("Omniglot ready times (cold decodes every image: tens of seconds)")
            results["ready"] = {"metarun": metarun_ready_times(data_root),
                                "learn2learn": l2l_data.ready_times(args.seed)}
        dataset = load_omniglot(data_root)
        for case in SAMPLE_CASES:
            if case.name in names:
                progress(f"{case.name}")
                results["sampling"].append(
                    sampling_rates(case, dataset, l2l_data, args.seed, args.sample_seconds))
        for case in STEP_CASES:
            if case.name in names:
                progress(f"{case.name}: timing")
                results["steps"].append(time_step_case(case, dataset, args, device))
        for case in TRAIN_CASES:
            if case.name in names:
                progress(f"{case.name}: timing, data included")
                results["training"].append(time_training(
                    case, dataset, l2l_data, args.seed, args.warmup, args.repeat, device))
        for case in STEP_CASES:
            if f"grad-{case.name}" in names:
                progress(f"grad-{case.name}")
                tasks = args.grad_meta_batch or case.meta_batch_size
                batch = task_batch(dataset, case, tasks, args.seed, device)
                base = make_model(case, args.seed).to(device)
                results["gradients"].append(gradient_agreement(case, base, batch))
        if "miniimagenet" in names:
            progress("miniimagenet: synthetic pickles, then each side in its own process")
            results["images"] = bench_images.run(None, args.sample_seconds, args.seed)
    finally:
        if l2l_data is not None:
            l2l_data.close()
    results["machine"]["cpu_steal_share"] = steal_share(cpu_before, cpu_seconds_by_kind())
    print_tables(results)
    if results["images"] is not None:
        bench_images.print_table(results["images"])
    if results["machine"]["cpu_steal_share"] is not None:
        print(f"\nCPU time stolen by the hypervisor during this run: "
              f"{100 * results['machine']['cpu_steal_share']:.1f}%")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}")
    disagreeing = [row["case"] for row in results["gradients"] if not row["agrees"]]
    if disagreeing:
        print(f"bench: gradients disagree beyond 1e-6: {', '.join(disagreeing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
