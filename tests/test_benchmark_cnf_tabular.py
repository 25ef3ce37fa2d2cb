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


def test_snopt_runs_per_setting_the_baselines_once_and_the_log_rewrites_the_tables(
        tabular: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[RunConfig] = []

    def tiny(cfg: RunConfig, isolate: bool = False) -> dict[str, Any]:
        asked.append(cfg)
        record = real_run(replace(cfg, iterations=2, eval_every=1, options={"hidden": 4}))
        return {**record, "config": cfg.to_dict()}  # recorded as the configuration asked for

    monkeypatch.setattr(tabular, "run", tiny)
    out = tmp_path / "out"
    assert tabular.main(["--seeds", "0", "--jobs", "1", "--out", str(out)]) == 0
    # per data set: SNOpt without and with the trust region, Adam and SGD once (they do not read kl_clip)
    assert [(c.dataset, c.optimizer, c.snopt_kl_clip) for c in asked] == [
        (ds, o, k) for ds in ("wine", "breast_cancer")
        for o, k in (("snopt", None), ("snopt", 1e-3), ("adam", None), ("sgd", None))]
    text = (out / "cnf_tabular_cpu.md").read_text()
    for ds in ("wine", "breast_cancer"):
        section = text.split(f"## {ds} (")[1].split("\n## ")[0]
        parts = section.split("### SNOpt at ")[1:]
        assert [p.split("\n")[0] for p in parts] == ["preset (kl_clip off)", "kl_clip 1e-3 (kl_clip 0.001)"]
        for part in parts:  # each table: SNOpt's runs of its setting beside the same Adam and SGD runs
            # a row each in the two optimizer tables, and Adam and SGD in the two ratio tables too
            assert (part.count("| snopt |"), part.count("| adam |"), part.count("| sgd |")) == (2, 4, 4)
            assert "- snopt: validation NLL lowest at iteration" in part
        assert (out / f"cnf_tabular_{ds}_preset.png").is_file()
        assert (out / f"cnf_tabular_{ds}_kl_clip_1em3.png").is_file()
    logged = [json.loads(ln) for ln in gzip.decompress((out / "cnf_tabular_cpu_runs.jsonl.gz").read_bytes())
              .decode().splitlines()]
    assert len(logged) == 8
    for ds in ("wine", "breast_cancer"):
        for clip in (None, 1e-3):
            chosen = tabular.runs_of(logged, ds, clip)
            assert [(r["config"]["optimizer"], r["config"]["snopt_kl_clip"]) for r in chosen] == [
                ("snopt", clip), ("adam", None), ("sgd", None)]
            assert all(r["config"]["dataset"] == ds for r in chosen)
    # the log alone rewrites the same tables, training nothing; foreign runs in it are left out
    extra = {**logged[2], "config": {**logged[2]["config"], "snopt_kl_clip": 0.5}}  # Adam under another setting
    log = tmp_path / "runs.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [*logged, extra]))
    asked.clear()
    again = tmp_path / "again"
    assert tabular.main(["--from-log", str(log), "--out", str(again)]) == 0
    assert not asked
    assert _body((again / "cnf_tabular_cpu.md").read_text()) == _body(text)


def test_the_committed_results_file_is_what_its_log_writes(tabular: ModuleType, tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results"
    assert tabular.main(["--from-log", str(results / "cnf_tabular_cpu_runs.jsonl.gz"), "--out", str(tmp_path)]) == 0
    assert _body((tmp_path / "cnf_tabular_cpu.md").read_text()) == _body((results / "cnf_tabular_cpu.md").read_text())


def test_a_missing_or_foreign_log_is_refused(tabular: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="does not exist"):
        tabular.main(["--from-log", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"config": RunConfig(task="digits", seed=0).to_dict()}) + "\n")
    with pytest.raises(SystemExit, match="no run of this benchmark"):
        tabular.main(["--from-log", str(foreign), "--out", str(tmp_path)])
