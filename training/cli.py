"""`deepserve train JOB|all [options]` (also `python -m training` and `torchrun ... -m training`). Bad input ends
in one line naming what is wrong and what was expected, exit status 2, and nothing published."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from training.spec import Options, SpecError, available_jobs, training_order


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, like every other input error, instead of argparse's usage block."""
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="deepserve train", description="Train a job, export it to ONNX, check the "
                                "export against torch and publish it as the next version in the model repository.")
    p.add_argument("job", help=f"a job in training/jobs ({', '.join(available_jobs())}) or 'all'")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--config", type=Path, help="TOML file of overrides (same sections as the job spec)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one spec key, e.g. --set train.optimizer=sgd (repeatable)")
    p.add_argument("--repository", type=Path, default=Path("models"), help="model repository (default: models)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="checkpoint folder (default: runs)")
    p.add_argument("--data", type=Path, help="your own data: .npz with x and y, or a folder <label>/*.txt")
    p.add_argument("--device", choices=["cpu", "cuda"], help="override train.device")
    p.add_argument("--resume", action="store_true", help="continue from the job's last checkpoint")
    p.add_argument("--quantize", choices=["int8"], help="also publish <job>_int8 (onnxruntime dynamic quantization)")
    p.add_argument("--seed", type=int, help="override train.seed")
    p.add_argument("--nproc", type=int, help="train with N processes under torchrun (DistributedDataParallel)")
    return p


def _verdict(summary: dict[str, Any]) -> str:
    """One summary line per job: the figure of merit and the wall time, each against the spec's [target]."""
    target = summary.get("target") or {}
    metric = target.get("metric", "accuracy")
    value = summary["test"].get(metric)
    line = f"{summary['job']:<20} v{summary['version']:<3} test {metric} "
    line += f"{value:.4f}" if isinstance(value, float) else "n/a"
    if "min" in target and isinstance(value, float):
        line += f" (target >= {target['min']}: {'ok' if value >= target['min'] else 'MISSED'})"
    seconds = summary["seconds"]
    line += f"   {seconds:.1f} s, training {summary['train_seconds']:.1f} s"
    if "seconds" in target:
        line += f" (target <= {target['seconds']} s: {'ok' if seconds <= target['seconds'] else 'MISSED'})"
    return line


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Hand the same command to torchrun: one process per rank, rendezvous on a free local port."""
    import subprocess

    rest = [a for i, a in enumerate(argv) if a != "--nproc" and not a.startswith("--nproc=")
            and not (i > 0 and argv[i - 1] == "--nproc")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "training", *rest]
    return subprocess.call(cmd)


def train_main(argv: list[str]) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads made each epoch
    # 10x slower whenever another process was busy. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed its one-line message (or the help)
        return int(exc.code or 0)
    if args.nproc is not None:
        if args.nproc < 1:
            print(f"deepserve train: --nproc {args.nproc}: expected a process count >= 1", file=sys.stderr)
            return 2
        if "WORLD_SIZE" not in os.environ:
            return _launch(args, argv)
    opts = Options(repository=args.repository, runs=args.runs, config=args.config, sets=args.sets, data=args.data,
                   epochs=args.epochs, seed=args.seed, device=args.device, resume=args.resume,
                   quantize=args.quantize)
    if args.job == "all":
        if args.config or args.sets or args.data:
            print("deepserve train all: --config, --set and --data belong to one job; expected "
                  "`deepserve train JOB ...` for them", file=sys.stderr)
            return 2
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from training.distributed import process_group

            with process_group(opts.device or "cpu"):
                return _run_all(opts)
        return _run_all(opts)
    return _run_one(args.job, opts)[0]


def _run_one(job: str, opts: Any) -> tuple[int, dict[str, Any] | None]:
    from training.spec import resolve

    try:  # the spec alone first: a typo is reported in a fraction of a second, before torch is imported
        spec = resolve(job, opts.config, opts.sets, {"train.epochs": opts.epochs, "train.seed": opts.seed,
                                                     "train.device": opts.device})
    except SpecError as exc:
        print(f"deepserve train {job}: error: {exc}", file=sys.stderr)
        return 2, None
    try:
        from training.distributed import process_group
        from training.export import ExportError
        from training.jobs import run_job
    except ImportError as exc:
        print(f"deepserve train: {exc}; training needs the train extra: pip install 'deepserve[train]'",
              file=sys.stderr)
        return 2, None
    try:
        with process_group(spec["train"]["device"]):
            summary = run_job(job, opts)
    except SpecError as exc:
        print(f"deepserve train {job}: error: {exc}", file=sys.stderr)
        return 2, None
    except ExportError as exc:
        print(f"deepserve train {job}: export check failed, nothing published: {exc}", file=sys.stderr)
        return 1, None
    return 0, summary


def _run_all(opts: Any) -> int:
    results = []
    status = 0
    for job in training_order():
        code, summary = _run_one(job, opts)
        status = status or code
        results.append(_verdict(summary) if summary and "version" in summary else f"{job:<20} FAILED")
    if int(os.environ.get("RANK", "0")) != 0:
        return status
    print("\nsummary (test split of each job; times are wall clock on this machine)")
    for line in results:
        print("  " + line)
    return status
