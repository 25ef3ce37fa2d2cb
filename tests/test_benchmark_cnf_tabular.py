"""benchmarks/run_cnf_tabular.py: which runs it trains, the tables it writes, and the committed file's currency.

Training is swapped for two-iteration runs of the same tables (real records, a second or two each).
"""

import gzip
import json
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from snopt.experiments import RunConfig
from snopt.experiments._runner import run as real_run

ROOT = Path(__file__).resolve().parents[1]


def _body(text: str) -> list[str]:
    """The results file without its regenerating line (it names the log it was written from)."""
    return [ln for ln in text.splitlines() if not ln.startswith("Regenerate")]


def _tuning_rows() -> list[dict[str, Any]]:
    """Synthetic tuning rows of the three tables: the kept settings are SNOpt (0.03, 0.01, kl_clip 0.003), SGD 0.1, and
    Adam 0.01 on wine and Old Faithful (the untuned rate: one run serves both settings) but 0.003 on breast-cancer.

    SNOpt's whole-step twins: on Old Faithful its pick (0.1, 0.03, kl_clip 0.01) beats the table's own SNOpt, so the
    table keeps it; on wine it loses; breast-cancer has none (a record from before the twins).
    """
    rows = []
    for ds, nlls in (("old_faithful", (9.0, 9.5)), ("wine", (10.5, 11.0))):
        for seed in (100, 101, 102):
            for (lr, eps), nll in zip(((0.1, 0.03), (0.03, 0.03)), nlls, strict=True):
                rows.append({"task": f"cnf_{ds}_step", "optimizer": "snopt", "lr": lr, "eps": eps, "kl_clip": 0.01,
                             "seed": seed, "metric": "nll", "diverged": False, "final_test_metric": nll})
    for ds, adam in (("wine", 0.01), ("breast_cancer", 0.003), ("old_faithful", 0.01)):
        for seed in (100, 101, 102):
            for opt, lr, eps, clip, nll in (("snopt", 0.03, 0.01, 0.003, 10.0), ("snopt", 0.1, 0.01, 0.003, 12.0),
                                            ("adam", adam, None, None, 11.0), ("adam", 0.03, None, None, 13.0),
                                            ("sgd", 0.1, None, None, 14.0)):
                rows.append({"task": f"cnf_{ds}", "optimizer": opt, "lr": lr, "eps": eps, "kl_clip": clip,
                             "seed": seed, "metric": "nll", "diverged": False, "final_test_metric": nll})
    return rows


def test_tuned_and_untuned_runs_and_the_log_rewrites_the_tables(
        tabular: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[RunConfig] = []

    def tiny(cfg: RunConfig, isolate: bool = False) -> dict[str, Any]:
        asked.append(cfg)
        record = real_run(replace(cfg, iterations=2, eval_every=1, options={"hidden": 4}))
        return {**record, "config": cfg.to_dict()}  # recorded as the configuration asked for

    rows_file = tmp_path / "tuning.json"
    rows_file.write_text(json.dumps(_tuning_rows()))
    monkeypatch.setattr(tabular, "TUNING_JSON", rows_file)
    monkeypatch.setattr(tabular, "run", tiny)
    out = tmp_path / "out"
    assert tabular.main(["--seeds", "0", "--jobs", "1", "--out", str(out)]) == 0
    # per data set: the tuned runs at the kept settings (explicit, SNOpt's eps, kl_clip and scope on SNOpt only),
    # SNOpt at the pick of the scope not kept, then the untuned SNOpt without and with the trust region, Adam and
    # SGD, each configuration once
    inc, step = ("snopt", 0.03, 0.01, 0.003, "increment"), ("snopt", 0.1, 0.03, 0.01, "step")
    tuned = {"wine": [inc, ("adam", 0.01, None, None, None), ("sgd", 0.1, None, None, None), step],
             "breast_cancer": [inc, ("adam", 0.003, None, None, None), ("sgd", 0.1, None, None, None)],
             "old_faithful": [step, ("adam", 0.01, None, None, None), ("sgd", 0.1, None, None, None), inc]}
    untuned = {ds: [("snopt", 0.05, 0.05, 0.0, "increment"), ("sgd", 0.05, None, None, None),
                    ("snopt", 0.05, 0.05, 0.001, "increment")] for ds in ("wine", "old_faithful")}
    untuned["breast_cancer"] = [("snopt", 0.05, 0.05, 0.0, "increment"), ("adam", 0.01, None, None, None),
                                ("sgd", 0.05, None, None, None), ("snopt", 0.05, 0.05, 0.001, "increment")]
    assert [(c.dataset, c.optimizer, c.lr, c.snopt_eps, c.snopt_kl_clip, c.snopt_kl_clip_scope) for c in asked] == [
        (ds, *k) for ds in ("wine", "breast_cancer", "old_faithful") for k in tuned[ds] + untuned[ds]]
    text = (out / "cnf_tabular_cpu.md").read_text()
    for ds in ("wine", "breast_cancer", "old_faithful"):
        section = text.split(f"## {ds} (")[1].split("\n## ")[0]
        parts = section.split("### ")[1:]
        other = {"wine": ["Tuned, SNOpt's trust region on the whole step (the scope not kept)"], "breast_cancer": [],
                 "old_faithful": ["Tuned, SNOpt's trust region on each increment (the scope not kept)"]}[ds]
        assert [p.split("\n")[0] for p in parts] == [
            "Tuned", *other, "Untuned, SNOpt with no trust region", "Untuned, SNOpt with kl_clip 1e-3"]
        for part in parts:  # each table: its SNOpt, Adam and SGD runs
            # a row each in the two optimizer tables, and Adam and SGD in the two ratio tables too
            assert (part.count("| snopt |"), part.count("| adam |"), part.count("| sgd |")) == (2, 4, 4)
            assert "- snopt: validation NLL lowest at iteration" in part
        adam = 0.003 if ds == "breast_cancer" else 0.01
        words = {"inc": "snopt lr 0.03 (eps 0.01, kl_clip 0.003, update_freq 25)",
                 "step": "snopt lr 0.1 (eps 0.03, kl_clip 0.01 on the whole step, update_freq 25)"}
        kept, *not_kept = ["step", "inc"] if ds == "old_faithful" else ["inc", "step"] if other else ["inc"]
        assert f"Settings: {words[kept]}, adam lr {adam:g}, sgd lr 0.1." in parts[0]
        for scope, part in zip(not_kept, parts[1:], strict=False):
            assert f"Settings: {words[scope]}, adam lr {adam:g}, sgd lr 0.1." in part
        assert ("Settings: snopt lr 0.05 (eps 0.05, kl_clip off, update_freq 25), adam lr 0.01, sgd lr 0.05."
                in parts[1 + len(other)])
        for png in ("tuned", "untuned_no_trust_region", "untuned_kl_clip_1em3") + (("tuned_other_scope",) if other
                                                                                    else ()):
            assert (out / f"cnf_tabular_{ds}_{png}.png").is_file()
    assert text.count("**kept**") == 11 and "| cnf_breast_cancer | adam | 0.003 |" in text  # the tuning section
    logged = [json.loads(ln) for ln in gzip.decompress((out / "cnf_tabular_cpu_runs.jsonl.gz").read_bytes())
              .decode().splitlines()]
    assert len(logged) == len(asked) == 21
    # the log alone rewrites the same tables, training nothing; foreign runs in it are left out
    extra = {**logged[1], "config": {**logged[1]["config"], "lr": 0.5}}  # Adam at another rate
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [*logged, extra]))
    asked.clear()
    again = tmp_path / "again"
    assert tabular.main(["--from-log", str(log), "--out", str(again)]) == 0
    assert not asked
    assert _body((again / "cnf_tabular_cpu.md").read_text()) == _body(text)


def test_no_tuning_rows_is_refused(tabular: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows_file = tmp_path / "tuning.json"
    rows_file.write_text(json.dumps([r for r in _tuning_rows() if r["task"] == "cnf_wine"]))
    monkeypatch.setattr(tabular, "TUNING_JSON", rows_file)
    with pytest.raises(SystemExit, match="no tuning rows for cnf_wine, cnf_breast_cancer, cnf_old_faithful"):
        tabular.main(["--out", str(tmp_path)])


def test_tune_retunes_the_tables_and_their_twins_only(tabular: ModuleType, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the other tasks' whole-step twins (Fashion-MNIST's alone is hours): those have their own scripts.
    asked: list[list[str]] = []

    def fake_retune(tasks: list[str], rows: list[dict[str, Any]], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        asked.append(list(tasks))
        return rows

    monkeypatch.setattr(tabular, "retune", fake_retune)
    assert tabular.main(["--tune-only", "--out", str(tmp_path)]) == 0
    assert asked == [["cnf_wine", "cnf_breast_cancer", "cnf_old_faithful",
                      "cnf_wine_step", "cnf_breast_cancer_step", "cnf_old_faithful_step"]]


def test_the_committed_results_file_is_what_its_log_writes(tabular: ModuleType, tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results"
    assert tabular.main(["--from-log", str(results / "cnf_tabular_cpu_runs.jsonl.gz"), "--out", str(tmp_path)]) == 0
    assert _body((tmp_path / "cnf_tabular_cpu.md").read_text()) == _body((results / "cnf_tabular_cpu.md").read_text())


def test_a_missing_or_foreign_log_is_refused(tabular: ModuleType, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    rows_file = tmp_path / "tuning.json"
    rows_file.write_text(json.dumps(_tuning_rows()))
    monkeypatch.setattr(tabular, "TUNING_JSON", rows_file)
    with pytest.raises(SystemExit, match="does not exist"):
        tabular.main(["--from-log", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"config": RunConfig(task="digits", seed=0).to_dict()}) + "\n")
    with pytest.raises(SystemExit, match="no run of this benchmark"):
        tabular.main(["--from-log", str(foreign), "--out", str(tmp_path)])
