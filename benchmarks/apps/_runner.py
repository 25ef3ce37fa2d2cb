"""The training loop, its clock and bookkeeping, comparisons across optimizers and seeds, tables.

Every optimizer goes through the same loop: draw a batch, ``zero_grad``, loss, ``backward``,
``step``. Only that is timed (wall-clock with `time.perf_counter`, process CPU time with
`time.process_time`, after a device synchronisation on CUDA); evaluations are not. A run
records per iteration the step time, the mini-batch loss and the forward/backward NFE, and at
every evaluation the full training loss and the test metric, so time-to-target is read off the
evaluations. Runs can be isolated in a fresh process (``spawn``) so that the peak resident
set size (``ru_maxrss``) belongs to that run alone.
"""

import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.apps._cnf import CNFTask, cnf_defaults
from benchmarks.apps._common import (
    IMAGE_TASKS,
    NewtonProblem,
    Resolved,
    RunConfig,
    Task,
    TaskDefaults,
    finite_or_none,
    machine_info,
    peak_rss_mib,
    progress,
    resolve,
    resolve_device,
    seed_everything,
)
from benchmarks.apps._digits import ImageTask, image_defaults
from benchmarks.apps._timeseries import TimeSeriesTask, timeseries_defaults
from snopt.adjoint import NonFiniteStateError, SolverError
from snopt.data import DatasetNotFoundError
from snopt.nn._ode_block import ODEBlock
from snopt.optim._newton_cg import NewtonCG
from snopt.optim._snopt import SNOpt

DEFAULT_DATASETS = {"digits": "digits", "fashion": "fashion", "mnist": "mnist", "cifar10": "cifar10", "svhn": "svhn",
                    "timeseries": "JapaneseVowels", "cnf": "circles"}


def dataset_of(cfg: RunConfig) -> str:
    """The data set a configuration trains on (its task's default when unset)."""
    return cfg.dataset or DEFAULT_DATASETS[cfg.task]


def task_defaults(cfg: RunConfig) -> TaskDefaults:
    """The defaults of `cfg`'s task, data set and preset.

    Args:
        cfg: The run configuration.

    Returns:
        The task's `TaskDefaults`.
    """
    dataset = dataset_of(cfg)
    if cfg.task in IMAGE_TASKS:
        return image_defaults(dataset, cfg.preset)
    if cfg.task == "timeseries":
        return timeseries_defaults(dataset, cfg.preset)
    return cnf_defaults(dataset, cfg.preset)


def make_task(cfg: RunConfig, res: Resolved, device: torch.device) -> Task:
    """Build the task (data and model) of `cfg`, seeded by ``cfg.seed``.

    Args:
        cfg: The run configuration.
        res: Its resolved settings.
        device: Where the model and data live.

    Returns:
        The task.
    """
    seed_everything(cfg.seed)
    if cfg.task in IMAGE_TASKS:
        return ImageTask(cfg, res, device)
    if cfg.task == "timeseries":
        return TimeSeriesTask(cfg, res, device)
    return CNFTask(cfg, res, device)


class Stepper:
    """One training step of a run, and the state a checkpoint needs to continue the run exactly.

    Calling it does the step (``zero_grad``, loss, ``backward``, ``step`` of every optimizer of the
    run) and returns the batch loss before the update.

    Args:
        fn: ``fn(batch, k)`` does the `k`-th step (counted from 1) and returns the batch loss.
        optimizers: Every optimizer the step updates (their states go into `state_dict`).
        generator: A random stream the step draws from (the sampled labels of the Monte-Carlo
            Fisher), or None.
    """

    def __init__(self, fn: Callable[[tuple[Tensor, ...], int], float], optimizers: Sequence[torch.optim.Optimizer],
                 generator: torch.Generator | None = None) -> None:
        self._fn = fn
        self.optimizers = list(optimizers)
        self.generator = generator
        self.count = 0

    def __call__(self, batch: tuple[Tensor, ...]) -> float:
        self.count += 1
        return self._fn(batch, self.count)

    def state_dict(self) -> dict[str, Any]:
        """The optimizers' states, the step count and the random stream's state."""
        return {"optimizers": [o.state_dict() for o in self.optimizers], "count": self.count,
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned.

        Args:
            state: As returned by `state_dict`.
        """
        for o, sd in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(sd)
        self.count = int(state["count"])
        if self.generator is not None:
            self.generator.set_state(state["generator"])


def make_stepper(cfg: RunConfig, res: Resolved, task: Task) -> tuple[Stepper, torch.optim.Optimizer]:
    """The optimizer of `cfg` and the `Stepper` doing one training step with it.

    ``snopt``: `SNOpt` over SGD (the resolved momentum) with ``full_precond``; ``adam``;
    ``sgd`` with momentum; ``newton-cg``: `NewtonCG` (Gauss-Newton, exact products) on the
    ODE block's parameters and Adam (the task's Adam rate) on the rest, each step. With
    ``ode_only`` the optimizer gets only the ODE blocks' parameters and Adam (``lr2``) the rest.

    Args:
        cfg: The run configuration.
        res: Its resolved settings.
        task: The task.

    Returns:
        ``(step, optimizer)``: ``step(batch)`` returns the batch loss before the update.
    """
    model = task.model
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "newton-cg":
        return _newton_stepper(cfg, res, task)
    others: list[nn.Parameter] = []
    if res.ode_only:
        ode_ids = {id(p) for m in model.modules() if isinstance(m, ODEBlock) for p in m.parameters()}
        others = [p for p in params if id(p) not in ode_ids]
        params = [p for p in params if id(p) in ode_ids]
    opt: torch.optim.Optimizer
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=_given(res.lr), weight_decay=res.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=_given(res.lr), momentum=res.momentum, weight_decay=res.weight_decay)
    elif cfg.optimizer in ("soap", "kron"):
        opt = _peer_optimizer(cfg.optimizer, params, res)
    else:
        opt = make_snopt(model, params, res, alpha=cfg.snopt_alpha, power=cfg.snopt_power,
                         factor_decay=cfg.snopt_factor_decay,
                         refresh_guard=cfg.snopt_refresh_guard, custom_base=bool(others))
    mc = opt if isinstance(opt, SNOpt) and res.snopt_fisher == "mc" else None  # Monte-Carlo Fisher statistics
    if mc is not None and task.metric != "accuracy":
        raise ValueError(f"snopt_fisher='mc' needs a classification task (labels sampled from the softmax); "
                         f"{cfg.task!r} has metric {task.metric!r}.")
    labels = torch.Generator().manual_seed(cfg.seed + 991)  # the sampled labels' own stream
    opts = [opt] + ([torch.optim.Adam(others, lr=res.lr2, weight_decay=res.weight_decay)] if others else [])
    # The initial rates by position: a restored optimizer's param_groups are new dicts.
    lr0 = [[float(g["lr"]) for g in o.param_groups] for o in opts]

    def step(batch: tuple[Tensor, ...], k: int) -> float:
        for o in opts:
            o.zero_grad()
        if mc is not None and mc.collecting:
            loss, sampled = task.loss_and_sampled_loss(batch, labels)
            mc.collect(sampled)
        else:
            loss = task.loss(batch)
        loss.backward()  # type: ignore[no-untyped-call]
        for o in opts:
            o.step()
        if res.schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * min(k, res.iterations) / res.iterations))
            for o, rates in zip(opts, lr0, strict=True):
                for g, rate in zip(o.param_groups, rates, strict=True):
                    g["lr"] = rate * factor
        return float(loss.detach())

    return Stepper(step, opts, labels), opt


def _given(lr: float | None) -> float:
    assert lr is not None, "resolve() gives Adam and SGD a learning rate"
    return lr


def _peer_optimizer(name: str, params: list[nn.Parameter], res: Resolved) -> torch.optim.Optimizer:
    """SOAP or PSGD-Kron from pytorch-optimizer, at its own defaults unless the run sets lr or weight decay."""
    try:
        from pytorch_optimizer import load_optimizer
    except ImportError as exc:  # an optional extra
        raise ImportError(f"optimizer {name!r} needs pytorch-optimizer: pip install -c constraints.txt "
                          "'pytorch-optimizer==4.1.0' (or the 'experiments' extra).") from exc
    kwargs: dict[str, Any] = {}
    if res.lr is not None:
        kwargs["lr"] = res.lr
    if res.weight_decay:
        kwargs["weight_decay"] = res.weight_decay
    opt: torch.optim.Optimizer = load_optimizer(name)(params, **kwargs)
    return opt


def make_snopt(model: nn.Module, params: list[nn.Parameter], res: Resolved, *, alpha: float | None = None,
               power: float | None = None, factor_decay: float | None = None,
               refresh_guard: float | None = None, custom_base: bool = False) -> SNOpt:
    """`SNOpt` with the run's settings; every setting the run leaves unset is the library's default.

    The base is SGD over `params` with the run's rate, momentum and weight decay when any of
    them is set (or `custom_base`: the optimizer trains only some parameters), else SNOpt's own
    default base. A ``snopt_kl_clip`` of 0 turns the trust region off.

    Args:
        model: The model.
        params: The parameters SNOpt's base trains.
        res: The resolved settings.
        alpha: The second-moment decay (None: the default).
        power: The scaling exponent (None: the default).
        factor_decay: The factors' running average (None: the default).
        refresh_guard: The refresh guard (None: the default; 0: off).
        custom_base: Build the SGD base even when nothing about it is set.

    Returns:
        The optimizer.
    """
    kw: dict[str, Any] = {}
    for key, value in (("eps", res.snopt_eps), ("update_freq", res.snopt_freq), ("alpha", alpha), ("power", power),
                       ("factor_decay", factor_decay), ("refresh_guard", refresh_guard),
                       ("kl_clip_scope", res.snopt_kl_clip_scope)):
        if value is not None:
            kw[key] = value
    if res.snopt_kl_clip is not None:
        kw["kl_clip"] = res.snopt_kl_clip or None
    base: torch.optim.Optimizer | None = None
    if custom_base or res.lr is not None or res.weight_decay or res.momentum != 0.9:
        lr = res.lr if res.lr is not None else SNOpt.DEFAULT_LR
        base = torch.optim.SGD(params, lr=lr, momentum=res.momentum, weight_decay=res.weight_decay)
    return SNOpt(model, base, full_precond=not res.ode_only, **kw)


def _newton_stepper(cfg: RunConfig, res: Resolved, task: Task) -> tuple[Stepper, torch.optim.Optimizer]:
    probe: NewtonProblem = task.newton_problem(task.batch(torch.Generator().manual_seed(0)))
    ode_ids = {id(p) for p in probe.func.parameters()}
    others = [p for p in task.model.parameters() if p.requires_grad and id(p) not in ode_ids]
    outer_lr = task_defaults(cfg).lr.get("adam", 1e-3)
    assert res.lr is not None, "resolve() gives newton-cg its preset's rate"
    outer = torch.optim.Adam(others, lr=outer_lr)
    ncg = NewtonCG(probe.func, lr=res.lr, damping=1e-2, curvature="ggn", max_cg_iters=10, solver=probe.solver)

    def step(batch: tuple[Tensor, ...], k: int) -> float:
        outer.zero_grad()
        loss = task.loss(batch)
        loss.backward()  # type: ignore[no-untyped-call]
        outer.step()
        prob = task.newton_problem(batch)
        ncg.step(x0=prob.x0, t_span=prob.t_span, loss_fn=prob.loss_fn)
        return float(loss.detach())

    return Stepper(step, [outer, ncg]), ncg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHECKPOINT_FORMAT = 1


def config_key(cfg: RunConfig) -> str:
    """`cfg` as canonical JSON: what a checkpoint or a finished record must match to be reused."""
    return json.dumps(cfg.to_dict(), sort_keys=True)


def _check_same_run(saved: str, cfg: RunConfig, subject: str, remedy: str) -> None:
    """Raise ValueError naming the fields that differ unless `saved` (a `config_key`) is `cfg`'s."""
    if saved == config_key(cfg):
        return
    old, new = json.loads(saved), json.loads(config_key(cfg))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    diff = ", ".join(f"{k} {old.get(k)!r} there vs {new.get(k)!r} here" for k in keys)
    raise ValueError(f"{subject} of another run ({diff}); {remedy}")


def save_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` through a temporary file beside it, so that an interruption leaves the old file or the new one.

    Args:
        path: The file to write.
        write: Writes the content to the path it is given.
    """
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def train(cfg: RunConfig, *, quiet: bool = True, checkpoint: str | Path | None = None,
          checkpoint_every: int | None = None, stop_at_targets: bool = False) -> dict[str, Any]:
    """Train one configuration and return its record (JSON-serialisable).

    With `checkpoint`, the run saves everything its next iterations depend on (model, optimizer
    states, batch order, random streams, the history so far) to that file every
    `checkpoint_every` iterations, and a run started with an existing checkpoint of the same
    configuration continues from it: its record is then the uninterrupted run's (bit for bit on
    the CPU), except that the clocks count the iterations each process did (work lost between
    the last checkpoint and an interruption is redone and timed once), the peak memory is the
    last process's, and ``resumed_at`` lists the iterations it continued from. The file is left
    in place when the run ends (`compare` removes it once the record is written).

    With `stop_at_targets`, the run ends at the first evaluation that shows both the loss and the
    metric target reached (``stopped_at_targets`` in the record names that iteration; None when it
    trained all its iterations): what a run needs to settle a time-to-target, and no more. Its
    iterations up to there are the full run's.

    Args:
        cfg: The run configuration.
        quiet: No progress bar.
        checkpoint: The checkpoint file (None: no checkpoints).
        checkpoint_every: Iterations between checkpoints (None: at every evaluation).
        stop_at_targets: End the run once an evaluation shows both targets reached.

    Returns:
        ``{"config", "resolved", "machine", "task", "history", "evals", "memory", "diverged",
        "resumed_at", "stopped_at_targets", "summary"}``, and the task's `final_outputs` where the run
        did not diverge (a 2-D CNF's ``"density"``); see `summarize` for the summary's keys.

    Raises:
        ValueError: If `checkpoint` holds another configuration's run, or `checkpoint_every` < 1.
    """
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"`checkpoint_every` must be at least 1; got {checkpoint_every}.")
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, quiet=quiet, checkpoint=None if checkpoint is None else Path(checkpoint),
                      checkpoint_every=checkpoint_every, stop_at_targets=stop_at_targets)
    finally:
        torch.set_num_threads(threads)


def _finite_parameters(model: nn.Module) -> bool:
    """Whether every parameter is finite (one host sync), checked after each step, outside the timing."""
    flags = [torch.isfinite(p.detach()).all() for p in model.parameters()]
    return not flags or bool(torch.stack(flags).all())


def _load_checkpoint(path: Path, cfg: RunConfig) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"Cannot read the checkpoint {path} ({type(exc).__name__}: {exc}); remove it to start "
                         "the run afresh.") from exc
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"The checkpoint {path} has format {state.get('format')!r}, not {CHECKPOINT_FORMAT}; "
                         "remove it to start the run afresh.")
    _check_same_run(state["config"], cfg, f"The checkpoint {path} is", "remove it or checkpoint elsewhere.")
    return state


def _train(cfg: RunConfig, *, quiet: bool, checkpoint: Path | None, checkpoint_every: int | None,
           stop_at_targets: bool) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    defaults = task_defaults(cfg)
    res = resolve(cfg, defaults)
    saved = _load_checkpoint(checkpoint, cfg) if checkpoint is not None and checkpoint.exists() else None
    task = make_task(cfg, res, device)
    step, opt = make_stepper(cfg, res, task)
    snopt_opt = opt if isinstance(opt, SNOpt) else None
    trust = snopt_opt if snopt_opt is not None and snopt_opt.kl_clip is not None else None  # records its scale ν
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_start = peak_rss_mib()
    generator = torch.Generator().manual_seed(cfg.seed)
    hist: dict[str, list[float]] = {k: [] for k in ("iteration", "time", "cpu_time", "step_time", "loss",
                                                      "nfe_forward", "nfe_backward")}
    evals: dict[str, list[float]] = {"iteration": [], "time": [], "cpu_time": []}

    def record_eval(it: int, wall: float, cpu: float) -> dict[str, float]:
        ev = task.evaluate()
        evals["iteration"].append(it)
        evals["time"].append(wall)
        evals["cpu_time"].append(cpu)
        for k, v in ev.items():
            evals.setdefault(k, []).append(v)
        return ev

    def save(it: int) -> None:
        assert checkpoint is not None
        state = {"format": CHECKPOINT_FORMAT, "config": config_key(cfg), "iteration": it,
                 "model": task.model.state_dict(), "step": step.state_dict(), "task": task.state_dict(),
                 "generator": generator.get_state(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                 "history": hist, "evals": evals, "clock": [wall, cpu], "last_eval": ev, "resumed_at": resumed}
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        save_atomic(checkpoint, lambda path: torch.save(state, path))

    wall = cpu = 0.0
    diverged: str | None = None
    stopped: int | None = None
    resumed: list[int] = []
    first = 1
    if saved is None:
        ev = record_eval(0, 0.0, 0.0)
    else:
        task.model.load_state_dict(saved["model"])
        step.load_state_dict(saved["step"])
        task.load_state_dict(saved["task"])
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["rng"])
        if saved["cuda_rng"] is not None and device.type == "cuda":  # resumed on a CPU: the CUDA streams are moot
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        hist, evals, ev = saved["history"], saved["evals"], saved["last_eval"]
        wall, cpu = saved["clock"]
        resumed = [*saved["resumed_at"], int(saved["iteration"])]
        first = resumed[-1] + 1
    every = checkpoint_every or res.eval_every
    bar = progress(res.iterations, disable=quiet, desc=f"{cfg.task}/{cfg.optimizer}/seed{cfg.seed}",
                   initial=first - 1)
    try:
        for it in range(first, res.iterations + 1):
            batch = task.batch(generator)
            collecting = snopt_opt is not None and snopt_opt.collecting
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                loss = step(batch)
            except (SolverError, NonFiniteStateError) as exc:  # a blown-up field, or layers before it: diverged
                diverged = f"iteration {it}: {exc}"
                break
            _sync(device)
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            wall += dw
            cpu += dc
            stats = task.solve_stats()
            hist["iteration"].append(it)
            hist["time"].append(wall)
            hist["cpu_time"].append(cpu)
            hist["step_time"].append(dw)
            hist["loss"].append(loss)
            hist["nfe_forward"].append(sum(s.nfe_forward for s in stats))
            hist["nfe_backward"].append(sum(s.nfe_backward for s in stats))
            if trust is not None:
                hist.setdefault("clip_scale", []).append(trust.last_clip)
            if snopt_opt is not None:  # a collection iteration gathers factors and refreshes the eigenbases
                hist.setdefault("collecting", []).append(float(collecting))
            nfe = hist["nfe_forward"][-1] + hist["nfe_backward"][-1]
            if not math.isfinite(loss):
                diverged = f"iteration {it}: non-finite loss"
                break
            if not _finite_parameters(task.model):  # a baseline's step overflowed (SNOpt's recovery undoes such steps)
                diverged = f"iteration {it}: the step made parameters non-finite"
                break
            if cfg.nfe_limit is not None and nfe > cfg.nfe_limit * max(1.0, hist["nfe_forward"][0]
                                                                      + hist["nfe_backward"][0]):
                diverged = (f"iteration {it}: {nfe} NFE, over {cfg.nfe_limit:g}x the first iteration's "
                            "(stiff dynamics)")
                break
            if it % res.eval_every == 0 or it == res.iterations:
                try:
                    ev = record_eval(it, wall, cpu)
                except (SolverError, NonFiniteStateError) as exc:  # the trained model can no longer be evaluated
                    diverged = f"evaluation after iteration {it}: {exc}"
                    break
                if stop_at_targets and it < res.iterations and _targets_reached(evals, res, task.higher_is_better):
                    stopped = it
                    break
            if checkpoint is not None and it % every == 0 and it < res.iterations:
                save(it)
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} {task.metric} {ev['test_metric']:.3f}")
    finally:
        bar.close()
    result: dict[str, Any] = {
        "config": cfg.to_dict(),
        "resolved": {"iterations": res.iterations, "batch_size": res.batch_size, "eval_every": res.eval_every,
                     "lr": res.lr, "snopt_eps": res.snopt_eps, "snopt_freq": res.snopt_freq,
                     "snopt_kl_clip": res.snopt_kl_clip, "snopt_kl_clip_scope": res.snopt_kl_clip_scope,
                     "snopt_fisher": res.snopt_fisher,
                     "schedule": res.schedule,
                     "target_loss": res.target_loss, "target_metric": res.target_metric, "ode_only": res.ode_only,
                     "lr2": res.lr2, "weight_decay": res.weight_decay, "momentum": res.momentum,
                     "options": res.options},
        "machine": machine_info(device),
        "task": {"name": task.name, "dataset": task.dataset, "metric": task.metric,
                 "higher_is_better": task.higher_is_better, "num_parameters": task.num_parameters()},
        "history": hist,
        "evals": {k: [finite_or_none(float(x)) for x in v] for k, v in evals.items()},
        "memory": {"peak_rss_mib": peak_rss_mib(), "rss_at_start_mib": rss_start,
                   "peak_cuda_mib": (torch.cuda.max_memory_allocated(device) / 2**20
                                     if device.type == "cuda" else None)},
        "diverged": diverged,
        "recovery": (dataclasses.asdict(snopt_opt.recovery.stats)
                     if snopt_opt is not None and snopt_opt.recovery is not None else None),
        "resumed_at": resumed,
        "stopped_at_targets": stopped,
        # layer-refreshes `refresh_guard` refused (a collapsed empirical Fisher); None for other optimizers
        "refused_refreshes": snopt_opt.refused_refreshes if snopt_opt is not None else None,
    }
    if diverged is None:  # a diverged model's field may no longer be solvable at the evaluation tolerance
        result.update(task.final_outputs())
    result["summary"] = summarize(result)
    return result


def _targets_reached(evals: dict[str, list[Any]], res: Resolved, higher_is_better: bool) -> bool:
    """Whether the evaluations so far show both the loss and the metric target reached."""
    return (time_to(evals, "train_loss", res.target_loss, lower=True)[1] is not None
            and time_to(evals, "test_metric", res.target_metric, lower=not higher_is_better)[1] is not None)


def time_to(evals: dict[str, list[Any]], key: str, target: float, *, lower: bool,
            clock: str = "time") -> tuple[float | None, int | None]:
    """Clock reading and iteration of the first evaluation reaching `target`.

    Args:
        evals: A run's ``evals``.
        key: The evaluated quantity (``"train_loss"``, ``"test_metric"``).
        target: The target value.
        lower: Reached when at or below `target` (else at or above).
        clock: ``"time"`` (wall-clock) or ``"cpu_time"``.

    Returns:
        ``(seconds, iteration)``, or ``(None, None)`` if never reached.
    """
    for it, t, v in zip(evals["iteration"], evals[clock], evals[key]):
        if v is not None and (v <= target if lower else v >= target):
            return float(t), int(it)
    return None, None


def nfe_until(iterations: Sequence[float], nfe: Sequence[float], until: int | None) -> float | None:
    """Function evaluations (forward + backward) spent in the iterations up to and including `until`.

    Args:
        iterations: A run's ``history["iteration"]``.
        nfe: Its forward + backward NFE per iteration.
        until: The last iteration counted (None: the target was never reached).

    Returns:
        The total, or None when `until` is None.
    """
    if until is None:
        return None
    return float(sum(n for it, n in zip(iterations, nfe) if it <= until))


def summarize(result: dict[str, Any], *, target_metric: float | None = None) -> dict[str, Any]:
    """The headline numbers of one run.

    Args:
        result: A record from `train`.
        target_metric: Override of the test-metric target (e.g. Adam's final NLL).

    Returns:
        final/best test metric, final training loss, time (wall and CPU), iterations and
        function evaluations (forward + backward, summed over the training iterations) to the
        loss and metric targets (None if not reached), mean/median step time, mean
        forward/backward NFE per iteration, peak RSS / CUDA memory, total training time; for
        SNOpt with a trust region, the fraction of steps it scaled down (``trust_region_active``)
        and the median scale ν (``median_clip_scale``; both None otherwise).
    """
    ev, hist, res = result["evals"], result["history"], result["resolved"]
    higher = bool(result["task"]["higher_is_better"])
    tm = res["target_metric"] if target_metric is None else target_metric
    metrics = [v for v in ev["test_metric"] if v is not None]
    t_loss, it_loss = time_to(ev, "train_loss", res["target_loss"], lower=True)
    t_met, it_met = time_to(ev, "test_metric", tm, lower=not higher)
    c_loss, _ = time_to(ev, "train_loss", res["target_loss"], lower=True, clock="cpu_time")
    c_met, _ = time_to(ev, "test_metric", tm, lower=not higher, clock="cpu_time")
    steps = hist["step_time"]
    nfe = [f + b for f, b in zip(hist["nfe_forward"], hist["nfe_backward"])]
    out: dict[str, Any] = {
        "final_test_metric": ev["test_metric"][-1], "final_train_loss": ev["train_loss"][-1],
        "best_test_metric": (max(metrics) if higher else min(metrics)) if metrics else None,
        "target_loss": res["target_loss"], "target_metric": tm,
        "time_to_target_loss": t_loss, "time_to_target_metric": t_met,
        "cpu_time_to_target_loss": c_loss, "cpu_time_to_target_metric": c_met,
        "iterations_to_target_loss": it_loss, "iterations_to_target_metric": it_met,
        "nfe_to_target_loss": nfe_until(hist["iteration"], nfe, it_loss),
        "nfe_to_target_metric": nfe_until(hist["iteration"], nfe, it_met),
        "total_nfe": sum(nfe),
        "train_time": hist["time"][-1] if hist["time"] else 0.0,
        "train_cpu_time": hist["cpu_time"][-1] if hist["cpu_time"] else 0.0,
        "iterations_done": len(steps),
        "mean_step_time": statistics.fmean(steps) if steps else None,
        "median_step_time": statistics.median(steps) if steps else None,
        "mean_nfe_forward": statistics.fmean(hist["nfe_forward"]) if steps else None,
        "mean_nfe_backward": statistics.fmean(hist["nfe_backward"]) if steps else None,
        "peak_rss_mib": result["memory"]["peak_rss_mib"], "peak_cuda_mib": result["memory"]["peak_cuda_mib"],
        "diverged": result["diverged"] is not None,
    }
    scale = hist.get("clip_scale") or []
    out["trust_region_active"] = sum(v < 1.0 for v in scale) / len(scale) if scale else None
    out["median_clip_scale"] = statistics.median(scale) if scale else None
    if "val_metric" in ev and any(v is not None for v in ev["val_metric"]):
        vals = [(v, i) for i, v in enumerate(ev["val_metric"]) if v is not None]
        best = (max if higher else min)(vals)[1]
        out["test_metric_at_best_val"] = ev["test_metric"][best]
    return out


def _child(cfg_dict: dict[str, Any], path: str, quiet: bool, checkpoint: str | None,
           checkpoint_every: int | None, stop_at_targets: bool) -> None:
    try:
        result = train(RunConfig.from_dict(cfg_dict), quiet=quiet, checkpoint=checkpoint,
                       checkpoint_every=checkpoint_every, stop_at_targets=stop_at_targets)
    except Exception as exc:  # reported by the parent (`run`), which knows the run
        Path(path + ".error").write_text(json.dumps({"type": type(exc).__name__, "message": str(exc),
                                                     "traceback": traceback.format_exc()}))
        raise SystemExit(1) from None
    Path(path).write_text(json.dumps(result))


def run(cfg: RunConfig, *, quiet: bool = True, isolate: bool = False, checkpoint: str | Path | None = None,
        checkpoint_every: int | None = None, stop_at_targets: bool = False) -> dict[str, Any]:
    """Train `cfg`, optionally in a fresh process (so ``ru_maxrss`` is this run's own peak).

    Args:
        cfg: The run configuration.
        quiet: No progress bar.
        isolate: Run in a spawned child process.
        checkpoint: Checkpoint file of the run (see `train`).
        checkpoint_every: Iterations between checkpoints (None: at every evaluation).
        stop_at_targets: End the run once both targets are reached (see `train`).

    Returns:
        The record of `train`.

    Raises:
        DatasetNotFoundError: If the task's data are not on this machine (the child's message: where
            it looked and how to install them).
        RuntimeError: If the child process fails otherwise (with the child's error and traceback).
    """
    if not isolate:
        return train(cfg, quiet=quiet, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                     stop_at_targets=stop_at_targets)
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "result.json")
        proc = ctx.Process(target=_child, args=(cfg.to_dict(), path, quiet,
                                                  None if checkpoint is None else str(checkpoint), checkpoint_every,
                                                  stop_at_targets))
        proc.start()
        proc.join()
        error = Path(path + ".error")
        if error.exists():
            info = json.loads(error.read_text())
            if info["type"] == DatasetNotFoundError.__name__:
                raise DatasetNotFoundError(info["message"])
            raise RuntimeError(f"The run {cfg.task}/{cfg.optimizer}/seed {cfg.seed} failed in its child process: "
                               f"{info['type']}: {info['message']}\n\nThe child's traceback:\n{info['traceback']}")
        if proc.exitcode != 0 or not Path(path).exists():
            raise RuntimeError(f"The run {cfg.task}/{cfg.optimizer}/seed {cfg.seed} failed in its child process "
                               f"(exit code {proc.exitcode}); rerun with --no-isolate to see the traceback.")
        loaded: dict[str, Any] = json.loads(Path(path).read_text())
        return loaded


def run_name(cfg: RunConfig) -> str:
    """File stem of a run: ``<task>-<dataset>_<optimizer>_seed<k>``."""
    return f"{cfg.task}-{dataset_of(cfg)}_{cfg.optimizer}_seed{cfg.seed}"


def _run_or_resume(cfg: RunConfig, ckpt_dir: Path | None, *, quiet: bool, isolate: bool,
                   echo: Callable[[str], None] | None,
                   checkpoint_every: int | None) -> tuple[dict[str, Any], bool]:
    """`cfg`'s record and whether it was trained now (False: read back from `ckpt_dir`)."""
    name = run_name(cfg)
    if ckpt_dir is None:
        if echo:
            echo(f"[{name}] training ...")
        return run(cfg, quiet=quiet, isolate=isolate), True
    done, ckpt = ckpt_dir / f"{name}.json", ckpt_dir / f"{name}.ckpt"
    if done.exists():
        r: dict[str, Any] = json.loads(done.read_text())
        _check_same_run(config_key(RunConfig.from_dict(r["config"])), cfg, f"{done} is the record",
                        "remove it or choose another checkpoint folder.")
        if echo:
            echo(f"[{name}] finished earlier: read back from {done}")
        return r, False
    if echo:
        echo(f"[{name}] " + (f"resuming from {ckpt} ..." if ckpt.exists() else "training ..."))
    r = run(cfg, quiet=quiet, isolate=isolate, checkpoint=ckpt, checkpoint_every=checkpoint_every)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_atomic(done, lambda path: path.write_text(json.dumps(r)))
    ckpt.unlink(missing_ok=True)
    return r, True


def compare(base: RunConfig, optimizers: Sequence[str], seeds: Sequence[int], *, out_dir: str | Path | None = None,
            lrs: dict[str, float] | None = None, quiet: bool = True, isolate: bool = False, plots: bool = True,
            echo: Callable[[str], None] | None = print,
            on_run: Callable[[dict[str, Any]], None] | None = None, checkpoint_dir: str | Path | None = None,
            checkpoint_every: int | None = None) -> dict[str, Any]:
    """Train every optimizer on every seed (interleaved: seed-major), then tabulate and plot.

    For a task whose metric is an NLL, the metric target becomes Adam's mean final test NLL
    when Adam is among the optimizers (the paper's CNF claim: reaching Adam's NLL sooner).

    Args:
        base: The configuration shared by all runs (its ``optimizer`` and ``seed`` are replaced).
        optimizers: Optimizer names.
        seeds: Seeds.
        out_dir: Where to write ``<run>.json``, ``<task>-<dataset>_summary.json`` and plots (None: nowhere).
        lrs: Learning rate per optimizer (overrides ``base.lr``).
        quiet: No progress bars.
        isolate: Each run in a fresh process.
        plots: Write the PNG plots.
        echo: Where progress lines and the table go (None: silent).
        on_run: Called with each run's record as soon as it finishes (e.g. to append it to a log, so an
            interrupted comparison loses no finished run); not for runs read back from `checkpoint_dir`.
        checkpoint_dir: Where each run checkpoints (``<run>.ckpt``, see `train`) and, once finished,
            leaves its record (``<run>.json``). Called again with the same folder, the comparison
            reads the finished runs back instead of training them and continues an interrupted run
            from its checkpoint. None: no checkpoints.
        checkpoint_every: Iterations between checkpoints (None: at every evaluation).

    Returns:
        ``{"runs": [records], "aggregate": {...}, "ratios": {...}, "table": str, "files": [...], "trained": n}``,
        where ``trained`` counts the runs trained in this call (the others were read back from `checkpoint_dir`).

    Raises:
        ValueError: If `checkpoint_dir` holds a checkpoint or a finished record of the same run name
            with another configuration.
    """
    runs: list[dict[str, Any]] = []
    trained = 0
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    for seed in seeds:
        for name in optimizers:
            lr = (lrs or {}).get(name, base.lr)
            cfg = replace(base, optimizer=name, seed=seed, lr=lr)  # type: ignore[arg-type]
            r, fresh = _run_or_resume(cfg, ckpt_dir, quiet=quiet, isolate=isolate, echo=echo,
                                      checkpoint_every=checkpoint_every)
            s = r["summary"]
            if echo:
                echo(f"[{run_name(cfg)}] {s['iterations_done']} it in {s['train_time']:.1f} s, final "
                     f"{r['task']['metric']} {s['final_test_metric']}, loss {s['final_train_loss']}"
                     + (f" (diverged: {r['diverged']})" if r["diverged"] else ""))
            runs.append(r)
            trained += fresh
            if on_run is not None and fresh:
                on_run(r)
    tab = tabulate(runs)
    agg, ratios, table = tab["aggregate"], tab["ratios"], tab["table"]
    files: list[str] = []
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{base.task}-{runs[0]['task']['dataset']}"
        for r in runs:
            p = out / f"{run_name(RunConfig.from_dict(r['config']))}.json"
            p.write_text(json.dumps(r))
            files.append(str(p))
        p = out / f"{stem}_summary.json"
        p.write_text(json.dumps({"aggregate": agg, "ratios": ratios, "machine": runs[0]["machine"],
                                 "table": table}, indent=1))
        files.append(str(p))
        if plots:
            from benchmarks.apps._plots import plot_comparison, plot_densities
            files.extend(str(f) for f in plot_comparison(runs, out / f"{stem}_curves.png"))
            files.extend(str(f) for f in plot_densities(runs, out / f"{stem}_density.png"))
    if echo:
        echo(table)
    return {"runs": runs, "aggregate": agg, "ratios": ratios, "table": table, "files": files, "trained": trained}


def tabulate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate finished runs of one task (live, or read back from a log) into `compare`'s numbers and table.

    For a task whose metric is an NLL, every run's summary is first recomputed with Adam's mean
    final test NLL as the metric target, when Adam is among the runs (the paper's CNF claim:
    reaching Adam's NLL sooner); the records' ``summary`` entries are replaced in place.

    Args:
        runs: Records from `train` (at least one).

    Returns:
        ``{"runs": runs, "aggregate": {...}, "ratios": {...}, "table": str}``.
    """
    adam_final = [r["summary"]["final_test_metric"] for r in runs if r["config"]["optimizer"] == "adam"
                  and r["summary"]["final_test_metric"] is not None]
    if runs[0]["task"]["metric"] == "nll" and adam_final:
        target = statistics.fmean(adam_final)
        for r in runs:
            r["summary"] = summarize(r, target_metric=target)
    agg = aggregate(runs)
    ratios = target_ratios(agg)
    return {"runs": runs, "aggregate": agg, "ratios": ratios, "table": format_table(agg, ratios, runs[0])}


_AGG_KEYS = ("final_test_metric", "best_test_metric", "final_train_loss", "time_to_target_loss",
             "time_to_target_metric", "cpu_time_to_target_loss", "cpu_time_to_target_metric",
             "iterations_to_target_loss", "iterations_to_target_metric", "nfe_to_target_loss",
             "nfe_to_target_metric", "mean_step_time", "median_step_time",
             "mean_nfe_forward", "mean_nfe_backward", "peak_rss_mib", "peak_cuda_mib", "train_time",
             "train_cpu_time", "test_metric_at_best_val", "trust_region_active", "median_clip_scale")


# A run that misses a target counts as having spent its whole run on it (a lower bound on its cost).
_CENSOR = {"time": "train_time", "cpu_time": "train_cpu_time", "iterations": "iterations_done", "nfe": "total_nfe"}


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per optimizer: mean, standard deviation, count and values of each summary number.

    Means of time, iterations and NFE to a target are over the seeds that reached it (``n``
    counts them), and ``censored_mean`` replaces a miss by the run's whole training time,
    iterations or NFE (a lower bound).

    Args:
        runs: Records from `train`.

    Returns:
        ``{optimizer: {key: {"mean", "std", "n", "values", ...}, "lr": ..., "seeds": [...]}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["config"]["optimizer"] for r in runs):
        group = [r for r in runs if r["config"]["optimizer"] == name]
        entry: dict[str, Any] = {"lr": group[0]["resolved"]["lr"], "seeds": [r["config"]["seed"] for r in group],
                                 "diverged": sum(bool(r["diverged"]) for r in group)}
        for key in _AGG_KEYS:
            values = [r["summary"].get(key) for r in group]
            got = [float(v) for v in values if v is not None]
            stat: dict[str, Any] = {"values": values, "n": len(got),
                                    "mean": statistics.fmean(got) if got else None,
                                    "std": statistics.stdev(got) if len(got) > 1 else (0.0 if got else None)}
            total = _CENSOR.get(key.split("_to_")[0]) if "_to_target" in key else None
            if total is not None:  # None where a record lacks its run's total (then no bound either)
                cens = [v if v is not None else r["summary"].get(total) for v, r in zip(values, group)]
                stat["censored_mean"] = (statistics.fmean(float(c) for c in cens)
                                         if all(c is not None for c in cens) else None)
            entry[key] = stat
        out[name] = entry
    return out


def target_ratios(agg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """SNOpt's mean time-to-target (and iterations and NFE to target) divided by each other optimizer's.

    Exact when every run of both reached the target; when only SNOpt's all did, the other's
    misses count as their whole training time and the ratio is an upper bound (``"<="``);
    when SNOpt missed some, a lower bound (``">="``) over censored times.

    The spread comes with it: ``per_seed`` holds SNOpt's value ÷ the other's on the same seed
    (same initialisation and batches), for the seeds both share and both reached the target
    (``seeds``: how many they share).

    Args:
        agg: From `aggregate`.

    Returns:
        ``{"snopt/adam": {"loss": {"ratio", "bound", "per_seed", "seeds"}, "metric": {...}, "loss_cpu": ...,
        "metric_cpu": ..., "loss_iterations": ..., "metric_iterations": ..., "loss_nfe": ..., "metric_nfe": ...},
        ...}`` (wall-clock, CPU time, iterations and NFE to the train-loss and test-metric targets).
    """
    out: dict[str, dict[str, Any]] = {}
    if "snopt" not in agg:
        return out
    s = agg["snopt"]
    for other, o in agg.items():
        if other == "snopt":
            continue
        entry: dict[str, Any] = {}
        common = [k for k in dict.fromkeys(s["seeds"]) if k in o["seeds"]]
        for label, key in (("loss", "time_to_target_loss"), ("metric", "time_to_target_metric"),
                           ("loss_cpu", "cpu_time_to_target_loss"), ("metric_cpu", "cpu_time_to_target_metric"),
                           ("loss_iterations", "iterations_to_target_loss"),
                           ("metric_iterations", "iterations_to_target_metric"),
                           ("loss_nfe", "nfe_to_target_loss"), ("metric_nfe", "nfe_to_target_metric")):
            a, b = s[key], o[key]
            n_a, n_b = len(a["values"]), len(b["values"])
            if a["n"] == n_a and b["n"] == n_b and b["mean"]:
                entry[label] = {"ratio": a["mean"] / b["mean"], "bound": "="}
            elif a["n"] == n_a and b["censored_mean"]:
                entry[label] = {"ratio": a["mean"] / b["censored_mean"], "bound": "<="}
            elif b["n"] == n_b and a["n"] > 0 and b["mean"] and a["censored_mean"] is not None:
                entry[label] = {"ratio": a["censored_mean"] / b["mean"], "bound": ">="}
            else:
                entry[label] = {"ratio": None, "bound": "n/a"}
            va, vb = dict(zip(s["seeds"], a["values"])), dict(zip(o["seeds"], b["values"]))
            entry[label]["per_seed"] = [float(va[k]) / float(vb[k]) for k in common
                                        if va[k] is not None and vb[k]]
            entry[label]["seeds"] = len(common)
        out[f"snopt/{other}"] = entry
    return out


def _fmt(stat: dict[str, Any], digits: int = 3, scale: float = 1.0) -> str:
    if stat["mean"] is None:
        return "—"
    m = stat["mean"] * scale
    n_all = len(stat["values"])
    text = f"{m:.{digits}f}"
    if n_all > 1 and stat["std"] is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    if stat["n"] < n_all:
        text += f" ({stat['n']}/{n_all})"
    return text


def format_ratio(r: dict[str, Any], *, spread: bool = False) -> str:
    """``0.42``, ``<=0.42``, ``>=1.3`` or ``n/a``; with `spread`, the per-seed range after it.

    ``0.42 (per seed 0.35–0.51)``: every shared seed reached the target under both optimizers;
    ``<=0.42 (per seed 0.35–0.51; 2 of 3 seeds)``: the range is over the seeds where both did.
    """
    text = "n/a" if r["ratio"] is None else ("" if r["bound"] == "=" else r["bound"]) + f"{r['ratio']:.2f}"
    per_seed = r.get("per_seed") or []
    if not spread or not per_seed or r["seeds"] < 2:  # one seed: the ratio is its own range
        return text
    rng = f"{min(per_seed):.2f}–{max(per_seed):.2f}" if len(per_seed) > 1 else f"{per_seed[0]:.2f}"
    some = f"; {len(per_seed)} of {r['seeds']} seeds" if len(per_seed) < r["seeds"] else ""
    return f"{text} (per seed {rng}{some})"


def format_table(agg: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]], example: dict[str, Any]) -> str:
    """A Markdown table of `aggregate` (mean ± std over seeds) plus SNOpt's time-to-target ratios.

    Args:
        agg: From `aggregate`.
        ratios: From `target_ratios`.
        example: One run's record (for the task, metric and targets).

    Returns:
        The table.
    """
    s = example["summary"]
    metric = example["task"]["metric"]
    cmp = "≥" if example["task"]["higher_is_better"] else "≤"
    tl, tm = s["target_loss"], s["target_metric"]
    pct = 100.0 if metric == "accuracy" else 1.0
    unit = " %" if metric == "accuracy" else " (nats)"
    head = (f"| optimizer | lr | final test {metric}{unit} | final train loss | s to train loss ≤ {tl:g} | "
            f"s to test {metric} {cmp} {tm * pct:.4g} | s/iter | NFE fwd / bwd | peak RSS MiB |")
    lines = [head, "|" + "---|" * 9]
    for name, a in agg.items():
        nfe = f"{_fmt(a['mean_nfe_forward'], 1)} / {_fmt(a['mean_nfe_backward'], 1)}"
        div = f" ({a['diverged']} diverged)" if a["diverged"] else ""
        lr = "default" if a["lr"] is None else f"{a['lr']:g}"
        lines.append(f"| {name} | {lr}{div} | {_fmt(a['final_test_metric'], 2 if pct > 1 else 3, pct)} | "
                     f"{_fmt(a['final_train_loss'], 3)} | {_fmt(a['time_to_target_loss'], 1)} | "
                     f"{_fmt(a['time_to_target_metric'], 1)} | {_fmt(a['mean_step_time'], 3)} | {nfe} | "
                     f"{_fmt(a['peak_rss_mib'], 0)} |")
    stopped = {name: a["test_metric_at_best_val"] for name, a in agg.items()
               if a.get("test_metric_at_best_val", {}).get("mean") is not None}
    if stopped:  # a table with a validation split (the tabular CNFs), where the final model may have overfitted
        lines += ["", f"Test {metric} at the evaluation with the best validation {metric} (early stopping, as "
                  "FFJORD reports tabular NLL): " + ", ".join(
                      f"{name} {_fmt(st, 2 if pct > 1 else 3, pct)}" for name, st in stopped.items()) + "."]
    if ratios:
        lines.append("")
        lines.append("| SNOpt time-to-target ÷ | train loss (wall) | test metric (wall) | train loss (CPU) | "
                     "test metric (CPU) |")
        lines.append("|---|---|---|---|---|")
        for key, r in ratios.items():
            lines.append(f"| {key.split('/')[1]} | " + " | ".join(
                format_ratio(r[k], spread=True) for k in ("loss", "metric", "loss_cpu", "metric_cpu")) + " |")
    every = example["resolved"].get("eval_every")
    lines += ["", "Time to target = iterations to it × cost per iteration. Iterations count to the evaluation "
              f"that first showed the target (evaluations every {every} iterations); NFE (forward + backward "
              "function evaluations, summed over those iterations) are the machine-independent cost.", "",
              f"| optimizer | iterations to train loss ≤ {tl:g} | iterations to test {metric} {cmp} "
              f"{tm * pct:.4g} | NFE to train loss (thousands) | NFE to test {metric} (thousands) |",
              "|---|---|---|---|---|"]
    for name, a in agg.items():
        lines.append(f"| {name} | {_fmt(a['iterations_to_target_loss'], 0)} | "
                     f"{_fmt(a['iterations_to_target_metric'], 0)} | {_fmt(a['nfe_to_target_loss'], 1, 1e-3)} | "
                     f"{_fmt(a['nfe_to_target_metric'], 1, 1e-3)} |")
    if ratios:
        lines += ["", "| SNOpt ÷ | iterations to train loss | iterations to test metric | NFE to train loss | "
                  "NFE to test metric |", "|---|---|---|---|---|"]
        for key, r in ratios.items():
            lines.append(f"| {key.split('/')[1]} | " + " | ".join(
                format_ratio(r[k], spread=True)
                for k in ("loss_iterations", "metric_iterations", "loss_nfe", "metric_nfe")) + " |")
    return "\n".join(lines)


def quiet_warnings() -> None:
    """Silence third-party deprecation noise (sktime, torch internals) in command-line runs."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


__all__ = [
    "DEFAULT_DATASETS",
    "Stepper",
    "aggregate",
    "compare",
    "dataset_of",
    "format_ratio",
    "format_table",
    "make_stepper",
    "make_task",
    "nfe_until",
    "quiet_warnings",
    "run",
    "run_name",
    "summarize",
    "target_ratios",
    "task_defaults",
    "time_to",
    "train",
]
