"""Smoke tests of the applications (tiny sizes, a few iterations) and of the runner's bookkeeping."""

import inspect
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import snopt
from benchmarks.apps import GRUODE, RunConfig, train
from benchmarks.apps.__main__ import main
from benchmarks.apps._common import EpochSampler, resolve
from benchmarks.apps._runner import (
    aggregate,
    format_ratio,
    nfe_until,
    run,
    tabulate,
    target_ratios,
    task_defaults,
    time_to,
)

pytest.importorskip("sklearn")  # the optional extras (`pip install snopt[experiments]`)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_KEYS = {"config", "resolved", "machine", "task", "history", "evals", "memory", "diverged", "resumed_at",
            "stopped_at_targets", "summary"}
SUMMARY_KEYS = {"final_test_metric", "final_train_loss", "time_to_target_loss", "time_to_target_metric",
                "mean_step_time", "mean_nfe_forward", "mean_nfe_backward", "peak_rss_mib", "peak_cuda_mib"}


def _check_run(r: dict, iterations: int) -> None:
    assert set(r) >= RUN_KEYS
    assert set(r["summary"]) >= SUMMARY_KEYS
    assert r["diverged"] is None
    assert r["history"]["iteration"] == list(range(1, iterations + 1))
    assert all(n > 0 for n in r["history"]["nfe_forward"])
    assert all(n > 0 for n in r["history"]["nfe_backward"])
    assert r["summary"]["peak_rss_mib"] > 0
    assert r["evals"]["iteration"][0] == 0 and r["evals"]["iteration"][-1] == iterations


@pytest.mark.parametrize("optimizer", ["snopt", "adam"])
def test_digits_training_reduces_the_loss(optimizer: str) -> None:
    cfg = RunConfig(task="digits", optimizer=optimizer, iterations=10, batch_size=64, eval_every=5, seed=0,
                    lr=0.05 if optimizer == "snopt" else 0.02, snopt_freq=5, options={"hidden": 8, "eval_train": 300})
    r = train(cfg)
    _check_run(r, 10)
    ev = r["evals"]
    assert ev["train_loss"][-1] < ev["train_loss"][0] - 0.2
    assert 0.0 <= ev["test_metric"][-1] <= 1.0
    assert r["task"]["metric"] == "accuracy" and r["machine"]["cpu"]


def test_timeseries_training_reduces_the_loss() -> None:
    pytest.importorskip("sktime")
    cfg = RunConfig(task="timeseries", dataset="BasicMotions", optimizer="snopt", iterations=6, batch_size=20,
                    eval_every=3, lr=0.05, snopt_freq=3, ode_only=True, lr2=0.02, options={"hidden": 8, "stride": 10})
    r = train(cfg)
    assert r["resolved"]["ode_only"] and r["resolved"]["lr2"] == 0.02
    _check_run(r, 6)
    assert r["evals"]["train_loss"][-1] < r["evals"]["train_loss"][0]
    # one forward solve per observation interval (10 observations -> 9 solves of >= 8 evaluations)
    assert min(r["history"]["nfe_forward"]) >= 9 * 8


@pytest.mark.parametrize("dataset", ["circles", "wine"])
def test_cnf_training_reduces_the_nll(dataset: str) -> None:
    # the library's default damping, not the tuned preset's (tuned for lr 0.01 over 600 iterations)
    cfg = RunConfig(task="cnf", dataset=dataset, optimizer="snopt", iterations=6, batch_size=64, eval_every=3,
                    lr=0.05, snopt_eps=0.05, snopt_freq=3, options={"hidden": 8, "n_train": 200, "n_test": 200})
    r = train(cfg)
    _check_run(r, 6)
    ev = r["evals"]
    assert r["task"]["metric"] == "nll"
    assert ev["test_metric"][-1] < ev["test_metric"][0]
    if dataset == "wine":
        assert "test_metric_at_best_val" in r["summary"]


def test_tabular_cnf_tables_report_the_early_stopped_nll() -> None:
    # a table with a validation split: the test NLL at the best validation evaluation, per optimizer; the toys'
    # fresh samples have no validation split and their tables no such line
    def tiny(dataset: str, optimizer: str) -> dict[str, Any]:
        return train(RunConfig(task="cnf", dataset=dataset, optimizer=optimizer, iterations=4, batch_size=64,
                               eval_every=2, lr=0.01, snopt_freq=2, options={"hidden": 8, "n_train": 100,
                                                                           "n_test": 100}))
    runs = [tiny("wine", o) for o in ("snopt", "adam")]
    text = tabulate(runs)["table"]
    line = next(ln for ln in text.splitlines() if ln.startswith("Test nll at the evaluation with the best validation"))
    for r in runs:
        ev = r["evals"]
        best = min(range(len(ev["val_metric"])), key=lambda i: ev["val_metric"][i])
        assert f"{r['config']['optimizer']} {ev['test_metric'][best]:.3f}" in line
    assert "best validation" not in tabulate([tiny("circles", "adam")])["table"]


class _Counter:
    """An observer that records every accepted backward step and forwards it."""

    def __init__(self, inner: snopt.AdjointObserver) -> None:
        self.inner = inner
        self.steps: list[tuple[float, float]] = []

    def on_backward_step(self, t: torch.Tensor, dt: torch.Tensor) -> None:
        self.steps.append((float(t), float(dt)))
        self.inner.on_backward_step(t, dt)


def test_gru_ode_statistics_accumulate_over_every_interval() -> None:
    pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    obs_dt, steps = 0.25, 5
    model = GRUODE(3, 6, 2, obs_dt=obs_dt)
    opt = snopt.SNOpt(model, torch.optim.SGD(model.parameters(), lr=0.01), update_freq=10)
    collector = model.block.observer
    assert collector is not None
    counter = _Counter(collector)
    model.block.observer = counter
    x = torch.randn(4, steps, 3)
    lengths = torch.full((4,), steps)
    loss = torch.nn.functional.cross_entropy(model(x, lengths), torch.tensor([0, 1, 0, 1]))
    loss.backward()
    intervals = steps - 1
    # every interval's adjoint solve reported its steps (t = the step's lower end), and they tile each interval
    for k in range(intervals):
        inside = [dt for t, dt in counter.steps if k * obs_dt < t + dt / 2 < (k + 1) * obs_dt]
        assert math.isclose(sum(inside), obs_dt, rel_tol=1e-6), (k, inside)
    assert model.block.stats.nfe_backward > 0
    factors = opt.collectors[0].kron_factors()
    assert set(factors) == {"fc1", "fc2", "fc3", "fc4"}
    for f in factors.values():  # Σ dt folded = the whole time line, not only the last interval
        assert math.isclose(float(f.weight), intervals * obs_dt, rel_tol=1e-6)
    opt.step()


def test_gru_ode_masks_updates_past_each_length() -> None:
    torch.manual_seed(1)
    model = GRUODE(2, 5, 3, obs_dt=0.2)
    x = torch.randn(2, 6, 2)
    x[0, 3:] = 0.0
    with torch.no_grad():
        both = model(x, torch.tensor([3, 6]))
        alone = model(x[:1, :3], torch.tensor([3]))
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)


def test_newton_cg_on_digits_and_its_error_elsewhere() -> None:
    cfg = RunConfig(task="digits", optimizer="newton-cg", iterations=2, batch_size=32, eval_every=2,
                    options={"hidden": 3, "eval_train": 100})
    r = train(cfg)
    assert r["diverged"] is None and math.isfinite(r["history"]["loss"][-1])
    with pytest.raises(NotImplementedError, match="newton-cg"):
        train(RunConfig(task="cnf", optimizer="newton-cg", iterations=1, options={"hidden": 4, "n_test": 10}))


def test_cli_writes_json_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    code = main(["digits", "--optimizer", "snopt", "adam", "--iterations", "4", "--eval-every", "2",
                 "--set", "hidden=3", "--set", "eval_train=100", "--lr", "snopt=0.05", "--lr", "adam=0.02",
                 "--out", str(tmp_path),
                 "--no-isolate", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| snopt | 0.05 |" in out and "| adam | 0.02 |" in out
    for name in ("snopt", "adam"):
        r = json.loads((tmp_path / f"digits-digits_{name}_seed0.json").read_text())
        _check_run(r, 4)
    summary = json.loads((tmp_path / "digits-digits_summary.json").read_text())
    assert set(summary) == {"aggregate", "ratios", "machine", "table"}
    assert set(summary["ratios"]) == {"snopt/adam"}
    png = tmp_path / "digits-digits_curves.png"
    data = png.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_the_demos_optimizers_at_their_defaults_make_a_table(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    # `nox -s demo` runs SNOpt, Adam and SOAP; SNOpt and SOAP have no learning rate of the run's (None): the
    # table once failed formatting it after every run had finished.
    pytest.importorskip("pytorch_optimizer")
    code = main(["demo", "--iterations", "2", "--eval-every", "2", "--set", "hidden=3", "--set", "eval_train=50",
                 "--out", str(tmp_path), "--no-isolate", "--quiet", "--no-plots"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| snopt | default |" in out and "| soap | default |" in out and "| adam |" in out


def test_isolated_run_matches_the_in_process_record_shape() -> None:
    cfg = RunConfig(task="cnf", optimizer="adam", iterations=2, batch_size=16, eval_every=2,
                    options={"hidden": 4, "n_train": 50, "n_test": 50})
    r = run(cfg, isolate=True)
    _check_run(r, 2)
    assert r["config"] == cfg.to_dict()


def test_config_validation_and_options() -> None:
    with pytest.raises(ValueError, match="Unknown task"):
        RunConfig(task="cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown optimizer"):
        RunConfig(optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`iterations` must be at least 1"):
        RunConfig(iterations=0)
    cfg = RunConfig(task="digits", options={"hiden": 3})
    with pytest.raises(ValueError, match="Unknown option"):
        resolve(cfg, task_defaults(cfg))
    paper = resolve(RunConfig(task="digits", preset="paper", optimizer="adam"), task_defaults(
        RunConfig(task="digits", preset="paper")))
    assert paper.lr == 1e-3 and paper.options["hidden"] == 64 and paper.batch_size == 128
    assert RunConfig.from_dict(RunConfig(seed=3, options={"a": 1}).to_dict()) == RunConfig(seed=3, options={"a": 1})
    assert main(["digits", "--iterations", "0", "--no-isolate"]) == 2
    assert main(["cnf", "--dataset", "mnist", "--no-isolate"]) == 2
    assert main(["digits", "--set", "widht=3", "--no-isolate"]) == 2


def test_epoch_sampler_visits_every_example_once_per_epoch() -> None:
    s = EpochSampler(10, 3)
    g = torch.Generator().manual_seed(0)
    seen = torch.cat([s.next(g) for _ in range(3)])
    assert len(set(seen.tolist())) == 9


def _fake(name: str, t_loss: float | None, total: float = 10.0, seed: int = 0) -> dict:
    ev = {"iteration": [0, 1, 2], "time": [0.0, 1.0, 2.0], "cpu_time": [0.0, 1.0, 2.0],
          "train_loss": [1.0, 0.5, 0.1], "test_metric": [0.1, 0.5, 0.9]}
    summary = {k: None for k in ("final_test_metric", "best_test_metric", "final_train_loss",
                                 "time_to_target_metric", "cpu_time_to_target_metric", "iterations_to_target_loss",
                                 "iterations_to_target_metric", "mean_step_time", "median_step_time",
                                 "mean_nfe_forward", "mean_nfe_backward", "peak_rss_mib", "peak_cuda_mib")}
    summary.update(time_to_target_loss=t_loss, cpu_time_to_target_loss=t_loss, train_time=total,
                   train_cpu_time=total)
    return {"config": {"optimizer": name, "seed": seed}, "resolved": {"lr": 0.1}, "diverged": None, "evals": ev,
            "summary": summary}


def _rb(r: dict) -> dict:
    """A ratio's value and bound (without its per-seed spread)."""
    return {"ratio": r["ratio"], "bound": r["bound"]}


def test_time_to_target_and_ratio_bounds() -> None:
    ev = _fake("x", None)["evals"]
    assert time_to(ev, "train_loss", 0.5, lower=True) == (1.0, 1)
    assert time_to(ev, "test_metric", 0.95, lower=False) == (None, None)
    ratios = target_ratios(aggregate([_fake("snopt", 2.0), _fake("adam", 4.0), _fake("sgd", None, total=10.0)]))
    assert _rb(ratios["snopt/adam"]["loss"]) == {"ratio": 0.5, "bound": "="}
    assert _rb(ratios["snopt/sgd"]["loss"]) == {"ratio": 0.2, "bound": "<="}
    assert ratios["snopt/sgd"]["metric"]["bound"] == "n/a"
    # these records carry no iteration or NFE totals: a miss then gives no bound, not a zero
    agg = aggregate([_fake("snopt", 2.0), _fake("sgd", None)])
    assert agg["sgd"]["nfe_to_target_loss"]["censored_mean"] is None
    assert _rb(target_ratios(agg)["snopt/sgd"]["loss_nfe"]) == {"ratio": None, "bound": "n/a"}


def test_ratios_carry_the_per_seed_spread_on_paired_seeds() -> None:
    # SNOpt on seeds 2, 0, 1 (records in any order) vs Adam on 0, 1, 2: each seed is paired with
    # itself; seed 2, where Adam missed, is left out of the range and named in the count.
    runs = [_fake("snopt", 3.0, seed=2), _fake("snopt", 2.0, seed=0), _fake("snopt", 3.0, seed=1),
            _fake("adam", 4.0, seed=0), _fake("adam", 2.0, seed=1), _fake("adam", None, total=12.0, seed=2)]
    r = target_ratios(aggregate(runs))["snopt/adam"]["loss"]
    assert r["per_seed"] == [0.5, 1.5] and r["seeds"] == 3
    assert _rb(r) == {"ratio": 8.0 / 3 / (18.0 / 3), "bound": "<="}
    assert format_ratio(r) == "<=0.44"
    assert format_ratio(r, spread=True) == "<=0.44 (per seed 0.50–1.50; 2 of 3 seeds)"
    full = target_ratios(aggregate(runs[:5] + [_fake("adam", 6.0, seed=2)]))["snopt/adam"]["loss"]
    assert format_ratio(full, spread=True) == "0.67 (per seed 0.50–1.50)"
    # optimizers run on different seeds share none: no spread is shown
    alone = target_ratios(aggregate([_fake("snopt", 2.0, seed=5), _fake("adam", 4.0, seed=6)]))["snopt/adam"]["loss"]
    assert alone["per_seed"] == [] and format_ratio(alone, spread=True) == "0.50"
    # one shared seed (the demo): its ratio is the whole story, no bracket repeats it
    single = target_ratios(aggregate([_fake("snopt", 2.0), _fake("adam", 4.0)]))["snopt/adam"]["loss"]
    assert single["per_seed"] == [0.5] and format_ratio(single, spread=True) == "0.50"


def test_nfe_to_target_sums_the_iterations_up_to_the_reaching_evaluation() -> None:
    assert nfe_until([1, 2, 3, 4], [10, 20, 30, 40], 2) == 30.0
    assert nfe_until([1, 2, 3, 4], [10, 20, 30, 40], 4) == 100.0
    assert nfe_until([1, 2, 3, 4], [10, 20, 30, 40], None) is None
    cfg = RunConfig(task="digits", optimizer="adam", iterations=6, eval_every=3, target_loss=-1.0, target_metric=1.1,
                    options={"hidden": 4, "eval_train": 50})
    first = train(cfg)  # never reaches these targets
    assert first["summary"]["nfe_to_target_loss"] is None and first["summary"]["nfe_to_target_metric"] is None
    at_3 = first["evals"]["train_loss"][1]  # the evaluation after iteration 3
    assert first["evals"]["iteration"][1] == 3 and at_3 < first["evals"]["train_loss"][0]
    again = train(replace(cfg, target_loss=at_3))  # the same run, deterministic: reaches it at iteration 3
    s, h = again["summary"], again["history"]
    nfe = [f + b for f, b in zip(h["nfe_forward"], h["nfe_backward"])]
    assert h["iteration"] == first["history"]["iteration"] and s["iterations_to_target_loss"] == 3
    assert s["nfe_to_target_loss"] == sum(nfe[:3]) < s["total_nfe"] == sum(nfe)


def test_iterations_and_nfe_ratios_censor_misses_like_time() -> None:
    def with_work(name: str, its: int | None, nfe: float | None, done: int, total: float) -> dict:
        r = _fake(name, 1.0)
        r["summary"].update(iterations_to_target_loss=its, nfe_to_target_loss=nfe, iterations_done=done,
                            total_nfe=total)
        return r

    agg = aggregate([with_work("snopt", 50, 4000.0, 100, 9000.0), with_work("adam", 100, 4000.0, 100, 5000.0),
                     with_work("sgd", None, None, 100, 5000.0)])
    assert agg["sgd"]["nfe_to_target_loss"]["censored_mean"] == 5000.0
    ratios = target_ratios(agg)
    assert _rb(ratios["snopt/adam"]["loss_iterations"]) == {"ratio": 0.5, "bound": "="}
    assert _rb(ratios["snopt/adam"]["loss_nfe"]) == {"ratio": 1.0, "bound": "="}
    assert _rb(ratios["snopt/sgd"]["loss_nfe"]) == {"ratio": 0.8, "bound": "<="}
    assert _rb(ratios["snopt/sgd"]["loss_iterations"]) == {"ratio": 0.5, "bound": "<="}


def test_blown_up_dynamics_stop_the_run_as_diverged() -> None:
    cfg = RunConfig(task="cnf", optimizer="sgd", iterations=3, batch_size=16, eval_every=3, nfe_limit=0.5,
                    options={"hidden": 4, "n_train": 50, "n_test": 50})
    r = train(cfg)
    assert r["diverged"] is not None and "NFE" in r["diverged"]
    assert len(r["history"]["iteration"]) == 1 and r["summary"]["diverged"]
    agg = aggregate([r])
    assert agg["sgd"]["diverged"] == 1


def _snopt_default(name: str) -> Any:
    return inspect.signature(snopt.SNOpt).parameters[name].default


@pytest.mark.parametrize(("given", "resolved", "expected"), [(None, None, "default"), (0.0, 0.0, None),
                                                             (5e-4, 5e-4, 5e-4)])
def test_snopt_kl_clip_reaches_the_optimizer(given: float | None, resolved: float | None,
                                             expected: float | str | None) -> None:
    # Unset: the library's default trust region; 0 turns it off; a value overrides it.
    from benchmarks.apps._runner import make_stepper, make_task

    cfg = RunConfig(task="digits", optimizer="snopt", snopt_kl_clip=given, options={"hidden": 4, "eval_train": 50})
    res = resolve(cfg, task_defaults(cfg))
    assert res.snopt_kl_clip == resolved
    _, opt = make_stepper(cfg, res, make_task(cfg, res, torch.device("cpu")))
    want = _snopt_default("kl_clip") if expected == "default" else expected
    assert isinstance(opt, snopt.SNOpt) and opt.kl_clip == want


@pytest.mark.parametrize(("optimizer", "kl_clip", "active"), [("snopt", 1e-9, 1.0), ("snopt", 1e6, 0.0),
                                                           ("snopt", 0.0, None), ("adam", None, None)])
def test_the_record_says_how_often_the_trust_region_bound(optimizer: str, kl_clip: float | None,
                                                          active: float | None) -> None:
    # A tiny kl_clip scales every step down, a huge one none; without a trust region there is nothing to record.
    # The increment scope: on the whole step (the digits preset's) a huge clip can still bind once the eigenbases
    # refresh, as momentum then carries increments preconditioned by the old ones.
    cfg = RunConfig(task="digits", optimizer=optimizer, iterations=4, batch_size=32, eval_every=4, snopt_freq=2,
                    snopt_kl_clip=kl_clip, snopt_kl_clip_scope="increment", options={"hidden": 4, "eval_train": 50})
    r = train(cfg)
    s = r["summary"]
    assert s["trust_region_active"] == active
    if active is None:
        assert "clip_scale" not in r["history"] and s["median_clip_scale"] is None
    else:
        scale = r["history"]["clip_scale"]
        assert len(scale) == 4 and all(0.0 < v <= 1.0 for v in scale)
        assert (s["median_clip_scale"] < 1e-2) if active == 1.0 else (s["median_clip_scale"] == 1.0)
        agg = aggregate([r])["snopt"]
        assert agg["trust_region_active"]["mean"] == active


@pytest.mark.parametrize("given", [None, "step", "increment"])
def test_snopt_kl_clip_scope_reaches_the_optimizer_and_the_record(given: str | None) -> None:
    # Unset: the library's default scope; "increment" bounds each preconditioned increment (KFAC's KL clipping).
    from benchmarks.apps._runner import make_stepper, make_task

    cfg = RunConfig(task="digits", optimizer="snopt", snopt_kl_clip_scope=given,
                    options={"hidden": 4, "eval_train": 50})
    res = resolve(cfg, task_defaults(cfg))
    assert res.snopt_kl_clip_scope == given
    _, opt = make_stepper(cfg, res, make_task(cfg, res, torch.device("cpu")))
    assert isinstance(opt, snopt.SNOpt) and opt.kl_clip_scope == (given or _snopt_default("kl_clip_scope"))
    r = train(replace(cfg, iterations=2, batch_size=16, eval_every=2, snopt_freq=1))
    assert r["resolved"]["snopt_kl_clip_scope"] == given


def test_snopt_kl_clip_scope_must_be_known() -> None:
    with pytest.raises(ValueError, match="snopt_kl_clip_scope"):
        RunConfig(task="digits", snopt_kl_clip_scope="velocity")
    with pytest.raises(SystemExit):
        main(["digits", "--snopt-kl-clip-scope", "velocity", "--quiet", "--no-plots"])


def test_snopt_kl_clip_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="snopt_kl_clip"):
        RunConfig(task="digits", snopt_kl_clip=-1.0)
    assert main(["digits", "--snopt-kl-clip", "-1", "--quiet", "--no-plots"]) == 2


@pytest.mark.parametrize(("task", "options"), [("digits", {"hidden": 4, "eval_train": 50}),
                                               ("timeseries", {"hidden": 4})])
def test_mc_fisher_collects_from_sampled_labels_on_collection_iterations_only(
        task: str, options: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.apps._runner import make_stepper, make_task

    cfg = RunConfig(task=task, optimizer="snopt", snopt_fisher="mc", snopt_freq=2, batch_size=8, options=options)
    res = resolve(cfg, task_defaults(cfg))
    assert res.snopt_fisher == "mc"
    tsk = make_task(cfg, res, torch.device("cpu"))
    step, opt = make_stepper(cfg, res, tsk)
    assert isinstance(opt, snopt.SNOpt)
    seen: list[tuple[bool, torch.Tensor]] = []
    real = opt.collect
    monkeypatch.setattr(opt, "collect", lambda loss: (seen.append((opt.collecting, loss.detach())), real(loss))[1])
    gen = torch.Generator().manual_seed(0)
    losses = [step(tsk.batch(gen)) for _ in range(4)]
    assert [c for c, _ in seen] == [True, True]  # iterations 0 and 2 of update_freq 2
    assert all(math.isfinite(x) for x in losses)
    assert all("m2" in opt.state[la.weight] for la in opt.layers)


def test_mc_fisher_is_refused_where_there_is_no_softmax_and_unknown_values_are_rejected() -> None:
    from benchmarks.apps._runner import make_stepper, make_task

    cfg = RunConfig(task="cnf", optimizer="snopt", snopt_fisher="mc", options={"hidden": 4, "n_train": 20,
                                                                               "n_test": 20})
    res = resolve(cfg, task_defaults(cfg))
    with pytest.raises(ValueError, match="classification"):
        make_stepper(cfg, res, make_task(cfg, res, torch.device("cpu")))
    with pytest.raises(ValueError, match="snopt_fisher"):
        RunConfig(task="digits", snopt_fisher="exact")
    assert resolve(RunConfig(task="digits"), task_defaults(RunConfig(task="digits"))).snopt_fisher == "empirical"


@pytest.mark.parametrize("optimizer", ["snopt", "adam"])
def test_cosine_schedule_follows_the_formula_and_ends_at_zero(optimizer: str) -> None:
    from benchmarks.apps._runner import make_stepper, make_task

    cfg = RunConfig(task="digits", optimizer=optimizer, schedule="cosine", iterations=4, lr=0.02, batch_size=8,
                    snopt_freq=2, options={"hidden": 4, "eval_train": 50})
    res = resolve(cfg, task_defaults(cfg))
    task = make_task(cfg, res, torch.device("cpu"))
    step, opt = make_stepper(cfg, res, task)
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 5):
        step(task.batch(gen))
        expected = 0.02 * 0.5 * (1 + math.cos(math.pi * k / 4))
        assert all(g["lr"] == pytest.approx(expected, abs=1e-15) for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="schedule"):
        RunConfig(task="digits", schedule="linear")


# --- MNIST / CIFAR-10 / SVHN (the user's torchvision files) ------------------------------------------------------


def _fake_cifar10(root: Path, per_batch: int = 8) -> None:
    import pickle

    import numpy as np
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(k) for k in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def test_paper_presets_follow_the_authors_scripts_per_data_set() -> None:
    """scripts/run_img_clf.sh of the authors' code: epochs, rates, weight decay and eps per data set."""
    for task, epochs, per_epoch, lrs, wd, eps in (
            ("mnist", 5, 469, {"adam": 1e-3, "sgd": 0.02, "snopt": 0.02}, {}, 0.05),
            ("svhn", 10, 573, {"adam": 5e-4, "sgd": 0.02, "snopt": 0.01}, {"adam": 1e-3, "snopt": 1e-4}, 0.05),
            ("cifar10", 20, 391, {"adam": 1e-3, "sgd": 0.01, "snopt": 0.01}, {"adam": 1e-3}, 0.03)):
        for name in ("snopt", "adam", "sgd"):
            cfg = RunConfig(task=task, optimizer=name, preset="paper")  # type: ignore[arg-type]
            res = resolve(cfg, task_defaults(cfg))
            assert (res.iterations, res.batch_size, res.lr, res.snopt_eps, res.snopt_freq) == (
                epochs * per_epoch, 128, lrs[name], eps, 100)
            assert res.weight_decay == wd.get(name, 0.0)
            # SGD gets the script's --momentum 0.9; SNOpt's SGD base the script's default, 0
            assert res.momentum == {"sgd": 0.9, "snopt": 0.0}.get(name, 0.9)
            assert (res.options["hidden"], res.options["pool"]) == (64, 1)
            # an explicit weight decay, 0 included, wins over the preset's
            assert resolve(replace(cfg, weight_decay=0.0), task_defaults(cfg)).weight_decay == 0.0
    with pytest.raises(ValueError, match="weight_decay"):
        RunConfig(weight_decay=-1e-4)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="momentum"):
            RunConfig(momentum=bad)


def test_momentum_follows_the_preset_unless_given() -> None:
    pytest.importorskip("sktime")
    """The paper's SNOpt runs (images, time series) and SGD runs (time series) have no momentum; ours elsewhere 0.9."""
    expected = {("digits", "paper"): {"sgd": 0.9, "snopt": 0.0}, ("digits", "fast"): {"sgd": 0.9, "snopt": 0.9},
                ("timeseries", "paper"): {"sgd": 0.0, "snopt": 0.0}, ("timeseries", "fast"): {"sgd": 0.9, "snopt": 0.9},
                ("cnf", "paper"): {"sgd": 0.9, "snopt": 0.9}}
    for (task, preset), by_name in expected.items():
        for name, m in by_name.items():
            cfg = RunConfig(task=task, optimizer=name, preset=preset)  # type: ignore[arg-type]
            assert resolve(cfg, task_defaults(cfg)).momentum == m, (task, preset, name)
            assert resolve(replace(cfg, momentum=0.5), task_defaults(cfg)).momentum == 0.5


def test_timeseries_paper_preset_is_the_authors_spoken_arabic_digits_script() -> None:
    pytest.importorskip("sktime")
    """scripts/run_time_series.sh, spo-ad: the compared optimizer on the ODE only, Adam 3e-3 on the rest."""
    for name, lr in (("adam", 3e-3), ("sgd", 0.01), ("snopt", 5e-3)):
        cfg = RunConfig(task="timeseries", optimizer=name, preset="paper")  # type: ignore[arg-type]
        res = resolve(cfg, task_defaults(cfg))
        assert (res.lr, res.lr2, res.ode_only, res.batch_size, res.snopt_eps, res.snopt_freq) == (
            lr, 3e-3, True, 128, 0.05, 100)
        assert res.options["hidden"] == 32 and res.options["adjoint_norm"] == "seminorm"
        assert res.momentum == (0.9 if name == "adam" else 0.0)  # the script passes no --momentum (Adam ignores it)


@pytest.mark.parametrize(("optimizer", "expected"), [("adam", 1e-3), ("sgd", 0.0), ("snopt", 0.0)])
def test_cifar10_trains_on_the_users_files_with_the_papers_weight_decay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str, expected: float) -> None:
    from benchmarks.apps._common import resolve_device
    from benchmarks.apps._runner import make_stepper, make_task
    _fake_cifar10(tmp_path)
    monkeypatch.setenv("SNOPT_DATA_DIR", str(tmp_path))
    cfg = RunConfig(task="cifar10", optimizer=optimizer, preset="paper", iterations=2, batch_size=8,  # type: ignore[arg-type]
                    eval_every=2, snopt_freq=1, options={"hidden": 4, "eval_train": 16})
    res = resolve(cfg, task_defaults(cfg))
    task = make_task(cfg, res, resolve_device("cpu"))
    assert task.data.x_train.shape == (40, 3, 32, 32)  # type: ignore[attr-defined]
    assert tuple(task.model.stem(task.data.x_train[:2]).shape) == (2, 4, 7, 7)  # type: ignore[attr-defined, operator]
    _, opt = make_stepper(cfg, res, task)
    groups = opt.base.param_groups if optimizer == "snopt" else opt.param_groups  # type: ignore[attr-defined]
    assert {g["weight_decay"] for g in groups} == {expected}
    if optimizer != "adam":  # the resolved momentum reaches SGD (0.9) and SNOpt's SGD base (0, as in the script)
        assert {g["momentum"] for g in groups} == {0.9 if optimizer == "sgd" else 0.0}
    r = train(cfg)
    _check_run(r, 2)
    assert r["task"]["dataset"] == "cifar10" and r["resolved"]["weight_decay"] == expected
    assert r["resolved"]["momentum"] == (0.0 if optimizer == "snopt" else 0.9)


def test_svhn_trains_on_the_users_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np
    sio = pytest.importorskip("scipy.io", reason="scipy not installed")
    rng = np.random.default_rng(0)
    for name, n in (("train_32x32.mat", 24), ("test_32x32.mat", 8)):
        sio.savemat(tmp_path / name, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                                      "y": rng.integers(1, 11, (n, 1)).astype(np.uint8)})
    monkeypatch.setenv("SNOPT_DATA_DIR", str(tmp_path))
    cfg = RunConfig(task="svhn", optimizer="snopt", iterations=3, batch_size=8, eval_every=3, snopt_freq=2,
                    options={"hidden": 4, "subset": None, "test_subset": None, "eval_train": 16})
    r = train(cfg)
    _check_run(r, 3)
    assert r["task"]["dataset"] == "svhn" and r["task"]["num_parameters"] > 0


def test_missing_image_data_is_named_not_a_child_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from snopt.data import DatasetNotFoundError
    monkeypatch.setenv("SNOPT_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="CIFAR-10 not found"):
        run(RunConfig(task="cifar10", optimizer="adam", iterations=1), isolate=True)
    assert main(["cifar10", "--optimizer", "adam", "--iterations", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: CIFAR-10 not found") and "SNOPT_DATA_DIR" in err and "Traceback" not in err


def test_a_failing_child_run_reports_its_own_error() -> None:
    with pytest.raises(RuntimeError, match=r"failed in its child process: \w+Error: .*\n\nThe child's traceback"):
        run(RunConfig(task="digits", optimizer="adam", iterations=1, options={"hidden": 0}), isolate=True)


def test_a_run_told_to_stop_at_its_targets_ends_at_the_evaluation_that_shows_both() -> None:
    # One thread in both processes (the child's default may differ from pytest's): the same arithmetic.
    base = RunConfig(task="digits", optimizer="adam", iterations=12, batch_size=32, eval_every=3, threads=1,
                     options={"hidden": 4, "eval_train": 50})
    full = train(base)
    ev = full["evals"]
    assert ev["iteration"][2] == 6
    # Targets that the full run's iteration-6 evaluation meets: the run must end there or sooner.
    cfg = replace(base, target_loss=ev["train_loss"][2], target_metric=ev["test_metric"][2])
    _, at_loss = time_to(ev, "train_loss", cfg.target_loss, lower=True)
    _, at_metric = time_to(ev, "test_metric", cfg.target_metric, lower=False)
    assert at_loss is not None and at_metric is not None
    expected = max(at_loss, at_metric)
    stopped = run(cfg, isolate=True, stop_at_targets=True)  # the flag reaches the child process too
    assert stopped["stopped_at_targets"] == expected and full["stopped_at_targets"] is None
    assert stopped["history"]["iteration"] == list(range(1, expected + 1))
    for key in ("loss", "nfe_forward", "nfe_backward"):  # the same iterations as the full run's, no more
        assert stopped["history"][key] == full["history"][key][:expected]
    assert stopped["evals"]["train_loss"] == ev["train_loss"][:len(stopped["evals"]["train_loss"])]
    assert stopped["evals"]["iteration"][-1] == expected
    whole = train(cfg)  # the same targets, all 12 iterations: the same times to them
    for k in ("iterations_to_target_loss", "iterations_to_target_metric", "nfe_to_target_loss",
              "nfe_to_target_metric"):
        assert stopped["summary"][k] is not None and stopped["summary"][k] == whole["summary"][k], k
    # A target it never reaches: the run trains all its iterations.
    never = train(replace(cfg, target_loss=1e-9), stop_at_targets=True)
    assert never["stopped_at_targets"] is None and never["summary"]["iterations_done"] == 12


def test_a_step_that_makes_parameters_non_finite_ends_the_run_as_diverged() -> None:
    # SGD at an infinite rate: the first step's loss is finite, its parameters are not. The next forward
    # would raise (the ODE block refuses a non-finite y0) and end the whole benchmark; the run must be
    # recorded as diverged at the step that did it instead.
    cfg = RunConfig(task="cnf", optimizer="sgd", lr=math.inf, iterations=3, batch_size=16, eval_every=3,
                    options={"hidden": 4, "n_train": 50, "n_test": 50})
    r = train(cfg)
    assert r["diverged"] == "iteration 1: the step made parameters non-finite", r["diverged"]
    assert len(r["history"]["iteration"]) == 1 and math.isfinite(r["history"]["loss"][0])


def test_a_blown_up_stem_ends_the_run_as_diverged(monkeypatch: pytest.MonkeyPatch) -> None:
    # Finite parameters whose stem output overflows reach the ODE block as a non-finite y0.
    from benchmarks.apps import _runner

    calls = {"n": 0}
    original = _runner.Stepper.__call__

    def step(self: Any, batch: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise snopt.NonFiniteStateError("`y0` contains non-finite values (NaN or inf).")
        return original(self, batch)

    monkeypatch.setattr(_runner.Stepper, "__call__", step)
    r = train(RunConfig(task="cnf", optimizer="sgd", iterations=3, batch_size=16, eval_every=3,
                        options={"hidden": 4, "n_train": 50, "n_test": 50}))
    assert r["diverged"] == "iteration 2: `y0` contains non-finite values (NaN or inf).", r["diverged"]
