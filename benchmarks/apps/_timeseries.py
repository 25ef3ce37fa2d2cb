"""Multivariate time-series classification with a GRU-ODE (the paper's model family).

Between observations the hidden state follows dh/dt = f(h) (an MLP, Linear/tanh × 4 as in
the authors' code); at each observation a GRU cell (built from nn.Linear layers, so SNOpt's
``full_precond`` reaches it) folds the observation in. Observation k sits at time k·Δ. Each
interval is one `snopt.odeint` solve with the block's observer, so SNOpt's factor collector
sees the accepted steps of *every* interval's adjoint solve of one backward pass and
integrates A and G over the whole time line (it only resets when it refreshes its eigenbases;
the authors' code kept only the last interval). Variable-length sequences: the state of a
sequence stops changing after its last observation (updates are masked), and a batch stops
integrating once all its sequences have ended.

Data: ``JapaneseVowels`` (270 + 370, 12 channels, T 7–29, 9 classes) and ``BasicMotions``
(40 + 40, 6 channels, T = 100, 4 classes), both from sktime's bundled UEA files.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.apps._common import EpochSampler, Resolved, RunConfig, Task, TaskDefaults
from snopt.adjoint._observer import SolveStats
from snopt.adjoint._odeint import odeint
from snopt.data import SequenceSplit, load_uea
from snopt.nn._ode_block import ODEBlock

UEA_DATASETS = ("JapaneseVowels", "BasicMotions")


def timeseries_defaults(dataset: str, preset: str) -> TaskDefaults:
    """Defaults of the time-series task (a GRU-ODE classifier).

    ``fast`` trains the whole model with each optimizer; SNOpt at the library's defaults, Adam's
    and SGD's rates only for command-line runs without ``--lr``. BasicMotions subsamples its 100
    steps to 25. ``paper`` follows the authors' script for SpokenArabicDigits
    (``scripts/run_time_series.sh``, ``spo-ad``), the paper's closest relative of these data:
    hidden 32, batch 128, the compared optimizer on the ODE parameters only — Adam 3e-3, SGD 0.01,
    SNOpt on SGD 5e-3 with eps 0.05, update_freq 100 and no trust region, SGD and SNOpt's base
    without momentum — and Adam 3e-3 on the GRU and the head; 1000 iterations.

    Args:
        dataset: ``"JapaneseVowels"`` or ``"BasicMotions"``.
        preset: ``"fast"`` or ``"paper"``.

    Returns:
        The defaults.
    """
    if dataset not in UEA_DATASETS:
        raise ValueError(f"Unknown UEA data set {dataset!r}; choose one of {UEA_DATASETS}.")
    options: dict[str, Any] = {"hidden": 32, "obs_dt": 0.1, "stride": 1, "method": "dopri5", "rtol": 1e-3,
                               "atol": 1e-3, "adjoint_norm": "seminorm"}
    if preset == "paper":
        return TaskDefaults(
            iterations=1000, batch_size=128, eval_every=20, lr={"adam": 3e-3, "sgd": 0.01, "snopt": 5e-3},
            target_loss=0.1, target_metric=0.95, snopt_eps=0.05, snopt_freq=100, snopt_kl_clip=0.0, ode_only=True,
            lr2=3e-3,
            momentum={"sgd": 0.0, "snopt": 0.0}, options=options)  # the script sets no --momentum: its default 0
    if dataset == "BasicMotions":
        return TaskDefaults(
            iterations=100, batch_size=40, eval_every=5, lr={"adam": 0.03, "sgd": 0.3}, target_loss=0.1,
            target_metric=0.9, options={**options, "stride": 4})
    return TaskDefaults(
        iterations=60, batch_size=64, eval_every=2, lr={"adam": 0.03, "sgd": 1.0}, target_loss=0.05,
        target_metric=0.95, options=options)


class ODEMLP(nn.Module):
    """dh/dt = fc₄(tanh(fc₃(tanh(fc₂(tanh(fc₁ h)))))) (autonomous).

    Args:
        hidden: State width.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.fc4 = nn.Linear(hidden, hidden)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        """dh/dt."""
        out: Tensor = self.fc4(torch.tanh(self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(h)))))))
        return out


class GRUCell(nn.Module):
    """A GRU cell of nn.Linear layers (reset gate, update gate, candidate).

    Args:
        inputs: Observation channels.
        hidden: State width.
    """

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.i2r = nn.Linear(inputs + hidden, hidden)
        self.i2z = nn.Linear(inputs + hidden, hidden)
        self.x2n = nn.Linear(inputs, hidden)
        self.h2n = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        """The updated state."""
        xh = torch.cat([x, h], dim=1)
        r = torch.sigmoid(self.i2r(xh))
        z = torch.sigmoid(self.i2z(xh))
        n = torch.tanh(self.x2n(x) + self.h2n(h) * r)
        return (1 - z) * n + z * h


class GRUODE(nn.Module):
    """GRU-ODE classifier: ODE evolution between observations, GRU updates at them.

    Args:
        channels: Observation channels.
        hidden: State width.
        num_classes: Classes.
        obs_dt: Time between consecutive observations.
        solver: ``method``, ``rtol``, ``atol``, ``adjoint_norm``.

    Attributes:
        block: An `ODEBlock` holding the vector field, its observer (set by `SNOpt`) and its
            NFE counters (summed over the intervals of the latest forward and backward pass).
    """

    def __init__(self, channels: int, hidden: int, num_classes: int, *, obs_dt: float = 0.1,
                 solver: dict[str, Any] | None = None) -> None:
        super().__init__()
        if not obs_dt > 0:
            raise ValueError(f"`obs_dt` must be positive; got {obs_dt}.")
        kw = {"method": "dopri5", "rtol": 1e-3, "atol": 1e-3, "adjoint_norm": "seminorm", **(solver or {})}
        self.hidden = hidden
        self.obs_dt = obs_dt
        self.gru = GRUCell(channels, hidden)
        self.block = ODEBlock(ODEMLP(hidden), t1=obs_dt, method=kw["method"], rtol=kw["rtol"], atol=kw["atol"],
                              adjoint_norm=kw["adjoint_norm"])
        self.linear = nn.Linear(hidden, num_classes)

    def evolve(self, h: Tensor, t0: float, t1: float, stats: SolveStats) -> Tensor:
        """h(t1) from h(t0) by one adjoint solve reporting to the block's observer.

        Args:
            h: State at `t0`, shape ``(B, hidden)``.
            t0: Start time.
            t1: End time.
            stats: NFE counters to add to.

        Returns:
            The state at `t1`.
        """
        b = self.block
        t = torch.tensor([t0, t1], dtype=h.dtype, device=h.device)
        ys: Tensor = odeint(b.func, h, t, method=b.method, rtol=b.rtol, atol=b.atol, options=b.options,
                            adjoint_norm=b.adjoint_norm, observer=b.observer, stats=stats)
        return ys[-1]

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        """Class logits.

        Args:
            x: Zero-padded series ``(B, T, C)``.
            lengths: Valid lengths ``(B,)`` (≥ 1).

        Returns:
            Logits ``(B, num_classes)`` from the state after each series' last observation.
        """
        stats = self.block.stats
        stats.reset()
        h = x.new_zeros(x.shape[0], self.hidden)
        h = self.gru(x[:, 0], h)
        t_end = int(lengths.max())
        for k in range(1, t_end):
            h_new = self.gru(x[:, k], self.evolve(h, (k - 1) * self.obs_dt, k * self.obs_dt, stats))
            h = torch.where((k < lengths)[:, None], h_new, h)
        out: Tensor = self.linear(h)
        return out


class TimeSeriesTask(Task):
    """UEA classification with `GRUODE`.

    Args:
        cfg: The run configuration (``cfg.dataset`` None means JapaneseVowels).
        res: The resolved settings.
        device: Where the model and data live.
    """

    metric = "accuracy"
    higher_is_better = True

    def __init__(self, cfg: RunConfig, res: Resolved, device: torch.device) -> None:
        self.name = cfg.task
        self.dataset = cfg.dataset or "JapaneseVowels"
        if self.dataset not in UEA_DATASETS:
            raise ValueError(f"Unknown UEA data set {self.dataset!r}; choose one of {UEA_DATASETS}.")
        self.device = device
        o = res.options
        data = load_uea(self.dataset)  # type: ignore[arg-type]
        stride = int(o["stride"])
        self.x_train, self.len_train = _subsample(data.x_train, data.lengths_train, stride)
        self.x_test, self.len_test = _subsample(data.x_test, data.lengths_test, stride)
        self.x_train, self.len_train = self.x_train.to(device), self.len_train.to(device)
        self.x_test, self.len_test = self.x_test.to(device), self.len_test.to(device)
        self.y_train, self.y_test = data.y_train.to(device), data.y_test.to(device)
        self.data: SequenceSplit = data
        self.model = GRUODE(data.x_train.shape[2], int(o["hidden"]), data.num_classes, obs_dt=float(o["obs_dt"]),
                            solver={k: o[k] for k in ("method", "rtol", "atol", "adjoint_norm")}).to(device)
        self.sampler = EpochSampler(len(self.x_train), res.batch_size)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        """A mini-batch ``(x, lengths, y)``."""
        idx = self.sampler.next(generator).to(self.device)
        return self.x_train[idx], self.len_train[idx], self.y_train[idx]

    def loss(self, batch: tuple[Tensor, ...]) -> Tensor:
        """Mean cross-entropy of the batch."""
        return F.cross_entropy(*self.logits_and_labels(batch))

    def logits_and_labels(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        """Logits and labels of the batch."""
        x, lengths, y = batch
        return self.model(x, lengths), y

    @torch.no_grad()
    def _loss_acc(self, x: Tensor, lengths: Tensor, y: Tensor, chunk: int = 512) -> tuple[float, float]:
        total, correct = 0.0, 0
        for s in range(0, len(x), chunk):
            logits = self.model(x[s:s + chunk], lengths[s:s + chunk])
            total += float(F.cross_entropy(logits, y[s:s + chunk], reduction="sum"))
            correct += int((logits.argmax(1) == y[s:s + chunk]).sum())
        return total / len(x), correct / len(x)

    def evaluate(self) -> dict[str, float]:
        """Full training loss/accuracy and test loss/accuracy."""
        train_loss, train_acc = self._loss_acc(self.x_train, self.len_train, self.y_train)
        test_loss, test_acc = self._loss_acc(self.x_test, self.len_test, self.y_test)
        return {"train_loss": train_loss, "train_accuracy": train_acc, "test_loss": test_loss, "test_metric": test_acc}


def _subsample(x: Tensor, lengths: Tensor, stride: int) -> tuple[Tensor, Tensor]:
    """Keep every `stride`-th observation (from the first); lengths rounded up."""
    if stride < 1:
        raise ValueError(f"`stride` must be at least 1; got {stride}.")
    if stride == 1:
        return x, lengths
    return x[:, ::stride].contiguous(), (lengths + stride - 1) // stride


__all__ = ["UEA_DATASETS", "GRUCell", "GRUODE", "ODEMLP", "TimeSeriesTask", "timeseries_defaults"]
