"""Command line: ``python -m benchmarks.apps {digits,fashion,mnist,cifar10,svhn,timeseries,cnf,demo} [options]``.

Examples::

    python -m benchmarks.apps demo                          # SNOpt vs Adam vs SGD on digits (~3-5 min, 2 cores)
    python -m benchmarks.apps digits --optimizer snopt adam --seeds 0 1 2
    python -m benchmarks.apps timeseries --dataset BasicMotions --optimizer snopt
    python -m benchmarks.apps cnf --dataset wine --optimizer adam --lr 0.01 --iterations 300
    python -m benchmarks.apps fashion --preset paper --device cuda   # the paper's sizes, full data
    python -m benchmarks.apps cifar10 --preset paper --device cuda   # the authors' CIFAR-10 settings (your files)
    python -m benchmarks.apps digits --optimizer newton-cg --iterations 20

Each command trains the listed optimizers on the listed seeds, prints a table (mean ± std
over seeds, time-to-target, s/iteration, NFE, peak memory, SNOpt's time-to-target ratios)
and writes ``<out>/*.json`` and ``<out>/*_curves.png``.
"""

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from benchmarks.apps._common import OPTIMIZER_NAMES, PRESETS, TASK_NAMES, RunConfig, TaskName, resolve
from snopt.data import DatasetNotFoundError

_COMMANDS = (*TASK_NAMES, "demo")


def _value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def _key_values(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"{what} expects KEY=VALUE; got {item!r}.")
        k, v = item.split("=", 1)
        out[k.strip()] = _value(v.strip())
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m benchmarks.apps``."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.apps",
        description="Train Neural ODEs with SNOpt, Adam, SGD (or Newton-CG) on the paper's three applications "
                    "and compare them in wall-clock.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=_COMMANDS,
                   help="task to run; 'demo' = snopt, adam and soap on digits (seed 0, fast preset)")
    p.add_argument("--optimizer", nargs="+", choices=OPTIMIZER_NAMES, default=None,
                   help="optimizer(s) to train (default: snopt adam soap)")
    p.add_argument("--dataset", default=None,
                   help="data set: timeseries JapaneseVowels|BasicMotions; cnf circles|moons|8gaussians|pinwheel|"
                        "checkerboard|wine|breast_cancer|old_faithful (the image tasks are named by their data: "
                        "digits, fashion, and mnist, cifar10, svhn from torchvision's files under $SNOPT_DATA_DIR, "
                        "./data, ~/data, ~/.torch/datasets or ~/.cache/torchvision)")
    p.add_argument("--preset", choices=PRESETS, default="fast",
                   help="'fast' CPU-sized runs; 'paper' the paper's widths, data and hyper-parameters")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds (runs are interleaved seed-major)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations (default: preset's)")
    p.add_argument("--batch-size", type=int, default=None, help="mini-batch size (default: preset's)")
    p.add_argument("--eval-every", type=int, default=None, help="iterations between evaluations")
    p.add_argument("--lr", action="append", default=None, metavar="[OPT=]LR",
                   help="learning rate for all optimizers, or OPT=LR per optimizer (repeatable); default: preset's")
    p.add_argument("--momentum", type=float, default=None,
                   help="momentum of SGD and of SNOpt's SGD base (default: the preset's, 0.9; under --preset paper "
                        "the authors' scripts' 0 for SNOpt on images and time series and for SGD on time series)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help="L2 penalty (default: preset's; 0 except under 'paper' on SVHN and CIFAR-10)")
    p.add_argument("--snopt-eps", type=float, default=None, help="SNOpt damping eps (default: preset's)")
    p.add_argument("--snopt-freq", type=int, default=None, help="SNOpt update_freq (default: preset's)")
    p.add_argument("--snopt-alpha", type=float, default=None, help="SNOpt second-moment decay (default: the library's)")
    p.add_argument("--snopt-kl-clip", type=float, default=None,
                   help="SNOpt trust region on the step (KFAC's KL clipping; 0: off; default: preset's)")
    p.add_argument("--snopt-kl-clip-scope", choices=("increment", "step"), default=None,
                   help="what SNOpt's trust region bounds: each preconditioned increment before momentum sums them "
                        "(increment, KFAC's KL clipping) or the whole step, momentum included (step: a velocity "
                        "clip; default: preset's)")
    p.add_argument("--snopt-fisher", choices=("empirical", "mc"), default=None,
                   help="SNOpt's statistics: the training loss's backward pass (empirical, the paper) or one with "
                        "labels sampled from the model (mc: Monte-Carlo Fisher, one extra backward per refresh; "
                        "classification only; default: preset's)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default=None,
                   help="learning-rate schedule of every optimizer (cosine: to 0 at the last iteration; "
                        "default: preset's)")
    p.add_argument("--ode-only", action="store_true", default=None,
                   help="train only the ODE blocks with the compared optimizer and the rest with Adam at --lr2 "
                        "(the authors' time-series protocol; default: the preset's)")
    p.add_argument("--lr2", type=float, default=None, help="Adam's rate for the non-ODE parameters with --ode-only")
    p.add_argument("--nfe-limit", type=float, default=10.0,
                   help="stop a run as diverged once an iteration's NFE exceeds this multiple of the first's "
                        "(0: never)")
    p.add_argument("--target-loss", type=float, default=None, help="training-loss target for time-to-target")
    p.add_argument("--target-metric", type=float, default=None,
                   help="test-metric target (accuracy in [0, 1], or NLL in nats)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="task option, e.g. hidden=32, rtol=1e-4, subset=20000 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for the fast preset on CPU — its models are too small to gain "
                        "from intra-op threads, which only spin-wait on a busy machine — else torch's)")
    p.add_argument("--out", default="results", help="output folder for JSON and PNG files")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-isolate", action="store_true",
                   help="run everything in this process (faster start; ru_maxrss is then cumulative)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no per-run lines")
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="checkpoint every run in DIR and keep each finished run's record there; the same command "
                        "run again with the same DIR reads the finished runs back and continues an interrupted "
                        "one from its last checkpoint (the same trajectory, bit for bit on the CPU)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="iterations between checkpoints (default: at every evaluation)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    from benchmarks.apps._runner import compare, quiet_warnings, task_defaults

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    quiet_warnings()
    task: TaskName = "digits" if args.command == "demo" else args.command
    optimizers = args.optimizer or ["snopt", "adam", "soap"]
    lr_all: float | None = None
    lrs: dict[str, float] = {}
    for item in args.lr or []:
        if "=" in item:
            lrs.update({k: float(v) for k, v in _key_values([item], "--lr").items()})
        else:
            lr_all = float(item)
    threads = args.threads
    if threads is None and args.preset == "fast" and args.device == "cpu":
        threads = 1
    try:
        base = RunConfig(task=task, dataset=args.dataset, preset=args.preset, iterations=args.iterations,
                         batch_size=args.batch_size, eval_every=args.eval_every, lr=lr_all, momentum=args.momentum,
                         weight_decay=args.weight_decay, snopt_eps=args.snopt_eps, snopt_freq=args.snopt_freq,
                         snopt_alpha=args.snopt_alpha, snopt_kl_clip=args.snopt_kl_clip,
                         snopt_kl_clip_scope=args.snopt_kl_clip_scope, snopt_fisher=args.snopt_fisher,
                         schedule=args.schedule,
                         target_loss=args.target_loss,
                         target_metric=args.target_metric, device=args.device, threads=threads,
                         ode_only=args.ode_only, lr2=args.lr2, nfe_limit=args.nfe_limit or None,
                         options=_key_values(args.set, "--set"))
        resolve(base, task_defaults(base))  # unknown data sets and options fail here, not in a child process
        if args.checkpoint_every is not None and args.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be at least 1; got {args.checkpoint_every}.")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = compare(base, optimizers, args.seeds, out_dir=args.out, lrs=lrs, quiet=args.quiet,
                         isolate=not args.no_isolate, plots=not args.no_plots, echo=None if args.quiet else print,
                         checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
    except (DatasetNotFoundError, ValueError) as exc:  # no data; a checkpoint folder of other runs
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: " + (f"the same command continues from the checkpoints in {args.checkpoint_dir}/"
                                   if args.checkpoint_dir else "pass --checkpoint-dir DIR to be able to continue runs"),
              file=sys.stderr)
        return 130
    if args.quiet:
        print(result["table"])
    print(f"\nwrote {len(result['files'])} files to {args.out}/ ({time.perf_counter() - start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
