"""Shared pieces of the applications: run configuration, the task interface, optimizers, machine facts.

A *task* (`Task`) owns its data and its model and knows how to draw a training batch,
compute the training loss on it and evaluate the model; the runner (`benchmarks.apps._runner`)
owns the loop, the clock and the bookkeeping, so every optimizer is timed the same way.
"""

import dataclasses
import gzip
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snopt.adjoint._observer import SolveStats
from snopt.losses import sampled_cross_entropy
from snopt.nn._ode_block import ODEBlock

OptimizerName = Literal["snopt", "adam", "sgd", "soap", "kron", "newton-cg"]
_OMIT_IF_UNSET = ("snopt_factor_decay",)
# SNOpt settings added after runs were logged, with the value those runs had. A SNOpt run's record always
# names them (None: the library's default); `upgrade_config` fills them into older records.
_ADDED_SNOPT_SETTINGS: dict[str, Any] = {"snopt_refresh_guard": 0.0}
OPTIMIZER_NAMES: tuple[OptimizerName, ...] = ("snopt", "adam", "sgd", "soap", "kron", "newton-cg")
TaskName = Literal["digits", "fashion", "mnist", "cifar10", "svhn", "timeseries", "cnf"]
TASK_NAMES: tuple[TaskName, ...] = ("digits", "fashion", "mnist", "cifar10", "svhn", "timeseries", "cnf")
IMAGE_TASKS: tuple[TaskName, ...] = ("digits", "fashion", "mnist", "cifar10", "svhn")
Preset = Literal["fast", "paper"]
PRESETS: tuple[Preset, ...] = ("fast", "paper")
SCHEDULES = ("constant", "cosine")
FISHERS = ("empirical", "mc")
KL_CLIP_SCOPES = ("increment", "step")


@dataclass(frozen=True)
class TaskDefaults:
    """A task's defaults under one preset; the command line overrides any of them.

    Attributes:
        iterations: Training iterations.
        batch_size: Mini-batch size.
        eval_every: Iterations between evaluations.
        lr: Learning rate per optimizer name (missing: that optimizer's own default; SNOpt's is its
            default base optimizer's).
        target_loss: Training-loss target (time-to-target: first evaluation at or below it).
        target_metric: Test-metric target (at or above for accuracy, at or below for NLL).
        snopt_eps: SNOpt's damping eps (None: the library's default).
        snopt_freq: SNOpt's `update_freq` (None: the library's default).
        snopt_kl_clip: SNOpt's trust region on the step (`SNOpt`'s `kl_clip`; 0: off; None: the
            library's default).
        snopt_kl_clip_scope: What it bounds (`SNOpt`'s `kl_clip_scope`): ``"increment"`` or ``"step"``
            (None: the library's default).
        snopt_fisher: Where SNOpt's factors come from: ``"empirical"`` (the training loss's own
            backward pass, the paper) or ``"mc"`` (a backward pass of the loss against labels
            sampled from the model: Monte-Carlo Fisher; classification tasks only).
        schedule: Learning-rate schedule of every optimizer: ``"constant"`` or ``"cosine"``
            (lr·½(1 + cos(πk/K)) at iteration k of K, ending at 0).
        ode_only: The compared optimizer trains only the ODE blocks' parameters; the rest use
            Adam at `lr2` (the authors' time-series protocol).
        lr2: Adam's rate for the non-ODE parameters when `ode_only`.
        weight_decay: L2 penalty per optimizer name (missing: 0).
        momentum: Momentum of SGD and of SNOpt's SGD base, per optimizer name (missing: 0.9). The
            authors' scripts leave SNOpt's base (images, time series) and SGD (time series) at 0.
        options: Task-specific settings (model width, solver, data subset, ...).
    """

    iterations: int
    batch_size: int
    eval_every: int
    lr: dict[str, float]
    target_loss: float
    target_metric: float
    snopt_eps: float | None = None
    snopt_freq: int | None = None
    snopt_kl_clip: float | None = None
    snopt_kl_clip_scope: str | None = None
    snopt_fisher: str = "empirical"
    schedule: str = "constant"
    ode_only: bool = False
    lr2: float = 1e-3
    weight_decay: dict[str, float] = field(default_factory=dict)
    momentum: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run (JSON-serialisable).

    Attributes:
        task: ``"digits"``, ``"fashion"``, ``"mnist"``, ``"cifar10"``, ``"svhn"`` (image classification),
            ``"timeseries"`` or ``"cnf"``.
        optimizer: ``"snopt"``, ``"adam"``, ``"sgd"``, ``"soap"``, ``"kron"`` (PSGD-Kron; these two from
            pytorch-optimizer) or ``"newton-cg"``.
        dataset: Data set within the task (e.g. ``"JapaneseVowels"``, ``"circles"``); None for the default.
        preset: ``"fast"`` (CPU-sized) or ``"paper"`` (the paper's sizes and hyper-parameters).
        seed: Seed of the model initialisation, data split/subset and batch order.
        iterations: Training iterations (None: the preset's).
        batch_size: Mini-batch size (None: the preset's).
        eval_every: Iterations between evaluations (None: the preset's).
        lr: Learning rate (None: the preset's for this optimizer, else the optimizer's own default).
        momentum: Momentum of SGD (and of SNOpt's SGD base); None: the preset's for this optimizer (0.9
            unless the paper's scripts set another).
        weight_decay: L2 penalty of the optimizer (None: the preset's for this optimizer, 0 unless the
            paper's scripts set one).
        snopt_eps: SNOpt damping (None: the preset's).
        snopt_freq: SNOpt `update_freq` (None: the preset's).
        snopt_alpha: SNOpt second-moment decay (None: the library's default).
        snopt_power: SNOpt's scaling exponent (`SNOpt`'s `power`; None: the library's default).
        snopt_factor_decay: SNOpt's running average of the factors (`factor_decay`; None: the default).
        snopt_refresh_guard: SNOpt's `refresh_guard` (None: the default; 0: off).
        snopt_kl_clip: SNOpt trust region `kl_clip` (None: the preset's; 0: off).
        snopt_kl_clip_scope: What the trust region bounds, ``"increment"`` or ``"step"`` (None: the preset's).
        snopt_fisher: SNOpt statistics, ``"empirical"`` or ``"mc"`` (None: the preset's).
        schedule: ``"constant"`` or ``"cosine"`` learning rates (None: the preset's).
        ode_only: Train only the ODE blocks with `optimizer`, the rest with Adam at `lr2`
            (None: the preset's; True under ``paper`` for the time series).
        lr2: Adam's rate for the non-ODE parameters when `ode_only` (None: the preset's).
        target_loss: Training-loss target (None: the preset's).
        target_metric: Test-metric target (None: the preset's).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        threads: torch intra-op threads (None: leave torch's default).
        nfe_limit: Stop the run as diverged once an iteration's NFE (forward + backward) exceeds
            this multiple of the first iteration's (stiff, blown-up dynamics); None: never.
        options: Task-specific overrides of `TaskDefaults.options`.
    """

    task: TaskName = "digits"
    optimizer: OptimizerName = "snopt"
    dataset: str | None = None
    preset: Preset = "fast"
    seed: int = 0
    iterations: int | None = None
    batch_size: int | None = None
    eval_every: int | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    snopt_eps: float | None = None
    snopt_freq: int | None = None
    snopt_alpha: float | None = None
    snopt_power: float | None = None
    snopt_factor_decay: float | None = None
    snopt_refresh_guard: float | None = None
    snopt_kl_clip: float | None = None
    snopt_kl_clip_scope: str | None = None
    snopt_fisher: str | None = None
    schedule: str | None = None
    ode_only: bool | None = None
    lr2: float | None = None
    target_loss: float | None = None
    target_metric: float | None = None
    device: str = "cpu"
    threads: int | None = None
    nfe_limit: float | None = 10.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {TASK_NAMES}.")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"Unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZER_NAMES}.")
        if self.preset not in PRESETS:
            raise ValueError(f"Unknown preset {self.preset!r}; choose one of {PRESETS}.")
        for name in ("iterations", "batch_size", "eval_every", "snopt_freq", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be at least 1; got {value}.")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"Unknown schedule {self.schedule!r}; choose one of {SCHEDULES}.")
        if self.snopt_fisher is not None and self.snopt_fisher not in FISHERS:
            raise ValueError(f"Unknown snopt_fisher {self.snopt_fisher!r}; choose one of {FISHERS}.")
        if self.snopt_kl_clip_scope is not None and self.snopt_kl_clip_scope not in KL_CLIP_SCOPES:
            raise ValueError(f"Unknown snopt_kl_clip_scope {self.snopt_kl_clip_scope!r}; choose one of "
                             f"{KL_CLIP_SCOPES}.")
        if self.snopt_kl_clip is not None and self.snopt_kl_clip < 0:
            raise ValueError(f"`snopt_kl_clip` must be ≥ 0 (0: off); got {self.snopt_kl_clip}.")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"`momentum` must be in [0, 1); got {self.momentum}.")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"`weight_decay` must be ≥ 0; got {self.weight_decay}.")
        for name in ("lr", "snopt_eps", "nfe_limit", "lr2"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be positive; got {value}.")

    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain JSON types (fields added later are left out while unset, so the
        records of earlier runs keep matching their configurations)."""
        d = dataclasses.asdict(self)
        for key in _OMIT_IF_UNSET:
            if d.get(key) is None:
                d.pop(key, None)
        if self.optimizer != "snopt":
            for key in _ADDED_SNOPT_SETTINGS:
                if d.get(key) is None:
                    d.pop(key, None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Rebuild a configuration written by `to_dict`.

        Args:
            d: As returned by `to_dict`.

        Returns:
            The configuration.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Resolved:
    """A `RunConfig` with every default filled in from the task's preset."""

    iterations: int
    batch_size: int
    eval_every: int
    lr: float | None
    snopt_eps: float | None
    snopt_freq: int | None
    snopt_kl_clip: float | None
    snopt_kl_clip_scope: str | None
    snopt_fisher: str
    schedule: str
    target_loss: float
    target_metric: float
    ode_only: bool
    lr2: float
    weight_decay: float
    momentum: float
    options: dict[str, Any]


def resolve(cfg: RunConfig, defaults: TaskDefaults) -> Resolved:
    """Fill the unset fields of `cfg` from `defaults`.

    Args:
        cfg: The run configuration.
        defaults: The task's defaults under ``cfg.preset``.

    Returns:
        The resolved settings.

    Raises:
        ValueError: For an unknown key in ``cfg.options``.
    """
    unknown = set(cfg.options) - set(defaults.options)
    if unknown:
        raise ValueError(f"Unknown option(s) {sorted(unknown)} for task {cfg.task!r}; "
                         f"known: {sorted(defaults.options)}.")
    lr = cfg.lr if cfg.lr is not None else defaults.lr.get(cfg.optimizer)
    if lr is None and cfg.optimizer in ("adam", "sgd"):
        lr = {"adam": 1e-3, "sgd": 0.01}[cfg.optimizer]
    return Resolved(
        iterations=cfg.iterations or defaults.iterations, batch_size=cfg.batch_size or defaults.batch_size,
        eval_every=cfg.eval_every or defaults.eval_every, lr=lr,
        snopt_eps=cfg.snopt_eps if cfg.snopt_eps is not None else defaults.snopt_eps,
        snopt_freq=cfg.snopt_freq or defaults.snopt_freq,
        snopt_kl_clip=defaults.snopt_kl_clip if cfg.snopt_kl_clip is None else cfg.snopt_kl_clip,
        snopt_kl_clip_scope=cfg.snopt_kl_clip_scope or defaults.snopt_kl_clip_scope,
        snopt_fisher=cfg.snopt_fisher or defaults.snopt_fisher,
        schedule=cfg.schedule or defaults.schedule,
        target_loss=cfg.target_loss if cfg.target_loss is not None else defaults.target_loss,
        target_metric=cfg.target_metric if cfg.target_metric is not None else defaults.target_metric,
        ode_only=cfg.ode_only if cfg.ode_only is not None else defaults.ode_only,
        lr2=cfg.lr2 if cfg.lr2 is not None else defaults.lr2,
        weight_decay=(cfg.weight_decay if cfg.weight_decay is not None
                      else defaults.weight_decay.get(cfg.optimizer, 0.0)),
        momentum=cfg.momentum if cfg.momentum is not None else defaults.momentum.get(cfg.optimizer, 0.9),
        options={**defaults.options, **cfg.options})


@dataclass(frozen=True)
class NewtonProblem:
    """One mini-batch as the problem `snopt.optim.NewtonCG` solves: Φ(x(t1)) from a fixed x0.

    Attributes:
        func: The ODE block's vector field (the parameters Newton-CG updates).
        x0: Initial state (detached).
        t_span: (t0, t1).
        loss_fn: Terminal loss Φ (may use other modules, held fixed during the step).
        solver: Keyword arguments for the solves (method, rtol, atol).
    """

    func: nn.Module
    x0: Tensor
    t_span: Tensor
    loss_fn: Any
    solver: dict[str, Any]


class Task(ABC):
    """A training problem: data, a model with ODE blocks, a loss and an evaluation.

    Attributes:
        name: Task name (``"digits"``...).
        dataset: Data set name.
        metric: ``"accuracy"`` or ``"nll"`` (nats).
        higher_is_better: Whether a larger test metric is better.
        model: The model (its ODE blocks are found by `SNOpt`).
        device: Where model and data live.
        sampler: The training set's mini-batch order (unused by the 2-D toys, which draw fresh samples).
    """

    name: str
    dataset: str
    metric: str
    higher_is_better: bool
    model: nn.Module
    device: torch.device
    sampler: "EpochSampler"

    @abstractmethod
    def batch(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Draw the next training mini-batch (on the task's device)."""

    @abstractmethod
    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        """The scalar training loss on `batch` (with grad)."""

    def logits_and_labels(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Logits (B, C) and integer labels (B,) of `batch` (classification tasks).

        Raises:
            NotImplementedError: For tasks without a categorical likelihood (the CNF).
        """
        raise NotImplementedError(
            f"snopt_fisher='mc' samples labels from the model's softmax; the {self.name!r} task has none "
            "(use it with digits, fashion or timeseries).")

    def loss_and_sampled_loss(self, batch: tuple[Tensor, ...],
                              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The mean cross-entropy and, from the same forward pass, that against labels sampled from the model.

        The second is what `SNOpt.collect` takes for Monte-Carlo Fisher factors (``snopt_fisher="mc"``).

        Args:
            batch: A training batch.
            generator: Random generator of the sampled labels.
        """
        logits, labels = self.logits_and_labels(batch)
        return F.cross_entropy(logits, labels), sampled_cross_entropy(logits, generator)

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Evaluate without grad; keys ``train_loss`` and ``test_metric`` at least."""

    def final_outputs(self) -> dict[str, Any]:
        """What the trained model shows beyond the evaluations, for the record (e.g. a 2-D CNF's density grid).

        Called once, after training; ``{}`` for tasks with nothing to add.
        """
        return {}

    def solve_stats(self) -> list[SolveStats]:
        """The NFE counters of the latest forward/backward pass (one per ODE block)."""
        return [m.stats for m in self.model.modules() if isinstance(m, ODEBlock)]

    def newton_problem(self, batch: tuple[Tensor, ...]) -> NewtonProblem:
        """The mini-batch as a `NewtonProblem` (for ``--optimizer newton-cg``).

        Args:
            batch: A training batch.

        Raises:
            NotImplementedError: For tasks whose loss is not Φ(x(t1)) of a single solve.
        """
        raise NotImplementedError(
            f"--optimizer newton-cg needs a loss of one ODE solve from a fixed initial state; the {self.name!r} "
            "task has none (use digits or fashion).")

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def state_dict(self) -> dict[str, Any]:
        """Where the batch stream stands (the epoch sampler's permutation and position), for a checkpoint."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the batch stream from what `state_dict` returned.

        Args:
            state: As returned by `state_dict`.
        """
        self.sampler.load_state_dict(state["sampler"])


class EpochSampler:
    """Mini-batch indices without replacement within an epoch, reshuffled every epoch.

    Args:
        n: Number of training examples.
        batch_size: Batch size (capped at `n`).
    """

    def __init__(self, n: int, batch_size: int) -> None:
        if n < 1:
            raise ValueError(f"Need at least one training example; got {n}.")
        self.n = n
        self.batch_size = min(batch_size, n)
        self._perm: Tensor | None = None
        self._pos = n

    def next(self, generator: torch.Generator) -> Tensor:
        """The next batch of indices.

        Args:
            generator: The random generator of the batch order.

        Returns:
            int64 indices of shape ``(batch_size,)``.
        """
        if self._perm is None or self._pos + self.batch_size > self.n:
            self._perm = torch.randperm(self.n, generator=generator)
            self._pos = 0
        idx = self._perm[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        """The current epoch's permutation and position (what the next batches depend on)."""
        return {"n": self.n, "batch_size": self.batch_size, "perm": self._perm, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned.

        Args:
            state: As returned by `state_dict`.

        Raises:
            ValueError: If it was taken from a sampler over another data set size or batch size.
        """
        if (state["n"], state["batch_size"]) != (self.n, self.batch_size):
            raise ValueError(f"The sampler state is for {state['n']} examples in batches of {state['batch_size']}; "
                             f"this sampler has {self.n} and {self.batch_size}.")
        self._perm = state["perm"]
        self._pos = int(state["pos"])


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's (CPU and CUDA) global generators (data splits take explicit seeds)."""
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (error when unavailable) or ``"auto"`` (CUDA when available).

    Args:
        name: The requested device.

    Returns:
        The device.

    Raises:
        RuntimeError: For ``"cuda"`` without a CUDA device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False.")
    return dev


def peak_rss_mib() -> float:
    """The process's peak resident set size so far (``resource.getrusage`` ru_maxrss), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name", else `platform.processor`)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.strip().startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Facts that name the machine a result was measured on.

    Args:
        device: The run's device (a CUDA device adds the card's name).

    Returns:
        CPU model, logical cores, torch/Python versions, torch threads, device and GPU name.
    """
    info: dict[str, Any] = {
        "cpu": cpu_model(), "logical_cores": os.cpu_count(), "torch": torch.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(), "device": str(device or "cpu")}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def finite_or_none(x: float) -> float | None:
    """`x`, or None if it is NaN or infinite (JSON has no inf)."""
    return x if math.isfinite(x) else None


def progress(total: int, *, disable: bool, desc: str, initial: int = 0) -> Any:
    """A tqdm progress bar over `total` iterations, or a silent stand-in.

    Disabled when `disable` is set, stderr is not a terminal, or tqdm is missing.

    Args:
        total: Number of iterations.
        disable: Turn the bar off.
        desc: Label shown before the bar.
        initial: Iterations already done (a resumed run).

    Returns:
        An object with ``update(n)``, ``set_postfix_str(s)`` and ``close()``.
    """
    if not disable and sys.stderr.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, initial=initial)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def iterate_chunks(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2·size), ...`` covering ``range(n)``."""
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))



def upgrade_config(d: dict[str, Any]) -> dict[str, Any]:
    """A logged configuration with the SNOpt settings added since filled in as they were (in place).

    A SNOpt run logged before a setting existed ran without it (``refresh_guard`` off); its
    record, written by an older `RunConfig.to_dict`, lacks the key. Other optimizers' records
    are left alone.

    Args:
        d: A record's ``config``.

    Returns:
        `d`.
    """
    if d.get("optimizer") == "snopt":
        for key, value in _ADDED_SNOPT_SETTINGS.items():
            d.setdefault(key, value)
    return d


def continue_log(log: Path, committed: Path, key: Callable[[dict[str, Any]], tuple[Any, ...]], *,
                 fresh: bool = False) -> set[tuple[Any, ...]]:
    """Where an analysis script's working `log` does not exist yet (a fresh clone), start it from `committed`.

    Args:
        log: The working log (``benchmarks/logs/...jsonl``).
        committed: Its gzipped copy in ``benchmarks/results``.
        key: What identifies a run in a record (the script skips runs whose key the log holds).
        fresh: Retrain everything: empty the log instead of continuing it.

    Returns:
        The keys of the runs the log holds.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    if fresh:
        log.write_text("")
    elif not log.exists() and committed.exists():
        log.write_bytes(gzip.decompress(committed.read_bytes()))
        print(f"  {log.name}: continuing from the runs committed in {committed}", flush=True)
    if not log.exists():
        return set()
    return {key(json.loads(line)) for line in log.read_text().splitlines() if line.strip()}


def logged_runs(log: Path, committed: Path, *, trained: bool) -> list[dict[str, Any]]:
    """The runs of an analysis script: its JSON-lines `log`, else the gzipped copy `committed`.

    Args:
        log: The working log (``benchmarks/logs/...jsonl``), appended to by the script.
        committed: Its gzipped copy in ``benchmarks/results``.
        trained: Whether this invocation trained: then `committed` is rewritten from `log` first.

    Returns:
        One dict per run.

    Raises:
        SystemExit: When neither file exists.
    """
    if log.exists() and trained:
        committed.write_bytes(gzip.compress(log.read_bytes(), mtime=0))
    if log.exists():
        text = log.read_text()
    elif committed.exists():
        text = gzip.decompress(committed.read_bytes()).decode()
    else:
        raise SystemExit(f"No runs logged at {log} or {committed}; run without --from-log first.")
    return [json.loads(line) for line in text.splitlines() if line.strip()]

__all__ = [
    "continue_log",
    "logged_runs",
    "upgrade_config",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "IMAGE_TASKS",
    "TASK_NAMES",
    "EpochSampler",
    "NewtonProblem",
    "OptimizerName",
    "Preset",
    "Resolved",
    "RunConfig",
    "Task",
    "TaskDefaults",
    "TaskName",
    "finite_or_none",
    "iterate_chunks",
    "machine_info",
    "peak_rss_mib",
    "progress",
    "resolve",
    "resolve_device",
    "seed_everything",
]
