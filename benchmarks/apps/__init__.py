"""The paper's three applications and the `python -m benchmarks.apps` command line.

- Image classification (``digits``, ``fashion``): conv stem → ODE block of time-concatenated
  convolutions → pooling → linear head (`ImageODENet`).
- Multivariate time-series classification (``timeseries``: JapaneseVowels, BasicMotions): a
  GRU-ODE (`GRUODE`) whose per-interval adjoint solves all feed SNOpt's factors.
- Density estimation (``cnf``): an FFJORD-style CNF (`snopt.nn.CNF`) on 2-D toys and real tables.

`train` runs one `RunConfig` through one timed loop for every optimizer; `compare` runs
optimizers × seeds and writes JSON records, a Markdown table and PNG plots.

Example:
    >>> from benchmarks.apps import RunConfig, compare  # doctest: +SKIP
    >>> compare(RunConfig(task="digits"), ["snopt", "adam", "sgd"], seeds=[0], out_dir="results")  # doctest: +SKIP
"""

from benchmarks.apps._cnf import CNFTask
from benchmarks.apps._common import OPTIMIZER_NAMES, PRESETS, TASK_NAMES, RunConfig, Task, TaskDefaults
from benchmarks.apps._digits import ImageODENet, ImageTask
from benchmarks.apps._plots import plot_comparison
from benchmarks.apps._runner import aggregate, compare, format_table, run, summarize, target_ratios, train
from benchmarks.apps._timeseries import GRUODE, TimeSeriesTask

__all__ = [
    "GRUODE",
    "OPTIMIZER_NAMES",
    "PRESETS",
    "TASK_NAMES",
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
