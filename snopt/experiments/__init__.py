"""The paper's three applications and the `python -m snopt.experiments` command line.

- Image classification (``digits``, ``fashion``): conv stem → ODE block of time-concatenated
  convolutions → pooling → linear head (`ImageODENet`).
- Multivariate time-series classification (``timeseries``: JapaneseVowels, BasicMotions): a
  GRU-ODE (`GRUODE`) whose per-interval adjoint solves all feed SNOpt's factors.
- Density estimation (``cnf``): an FFJORD-style CNF (`CNFModel`) on 2-D toys and real tables.

`train` runs one `RunConfig` through one timed loop for every optimizer; `compare` runs
optimizers × seeds and writes JSON records, a Markdown table and PNG plots.

Example:
    >>> from snopt.experiments import RunConfig, compare  # doctest: +SKIP
    >>> compare(RunConfig(task="digits"), ["snopt", "adam", "sgd"], seeds=[0], out_dir="results")  # doctest: +SKIP
"""

from snopt.experiments._cnf import CNFModel, CNFTask
from snopt.experiments._common import OPTIMIZER_NAMES, PRESETS, TASK_NAMES, RunConfig, Task, TaskDefaults
from snopt.experiments._digits import ImageODENet, ImageTask
from snopt.experiments._plots import plot_comparison
from snopt.experiments._runner import aggregate, compare, format_table, run, summarize, target_ratios, train
from snopt.experiments._timeseries import GRUODE, TimeSeriesTask

__all__ = [
    "GRUODE",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "TASK_NAMES",
    "CNFModel",
    "CNFTask",
    "ImageODENet",
    "ImageTask",
    "RunConfig",
    "Task",
    "TaskDefaults",
    "TimeSeriesTask",
    "aggregate",
    "compare",
    "format_table",
    "plot_comparison",
    "run",
    "summarize",
    "target_ratios",
    "train",
]
