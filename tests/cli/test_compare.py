"""``dpfed compare`` end to end on the tiny BERT fixture: files, keys, twins, and what must hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _args(tiny_bert_dir, tiny_csv, out, *extra):
    return ["compare", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence",
            "--label-column", "sentiment", "--clients", "3", "--rounds", "2", "--local-steps", "2",
            "--batch-size", "16", "--rank", "4", "--lr", "0.5", "--delta", "1e-4", "--device", "cpu",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def result(tiny_bert_dir, tiny_csv, tmp_path_factory):
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("cmp") / "out"
    proc = subprocess.run([sys.executable, "-m", "dpfed.cli", *_args(tiny_bert_dir, tiny_csv, out, "--epsilon", "2,8",
                                                                      "--no-dp", "--format", "json")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), out


def test_files_and_keys(result):
    data, out = result
    for name in ("compare.json", "compare.md", "accuracy_vs_bytes.png", "accuracy_vs_epsilon.png", "noise_amplification.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rows = data["methods"]
    assert len(rows) == 5 * 3
    keys = {"method", "epsilon", "accuracy", "bytes_up_per_client_round", "bytes_down_per_client_round",
            "trainable_params", "aggregation_error", "noise_amplification", "noise_amplification_per_layer", "run_dir"}
    for r in rows:
        assert keys <= set(r)
        assert (out / r["run_dir"].split("/")[-1] / "summary.json").is_file()  # a normal run directory
    assert json.loads((out / "compare.json").read_text())["methods"] == rows


def test_same_privacy_for_every_method_and_twins_only_with_dp(result):
    rows = result[0]["methods"]
    for eps in (2.0, 8.0):
        cell = [r for r in rows if r["epsilon"] == eps]
        assert len({r["noise_multiplier"] for r in cell}) == 1  # same σ, q, steps → same ε
        assert all(r["epsilon_spent"] <= eps for r in cell)
        assert all(r["noise_amplification"] is not None and r["noise_amplification"] > 0 for r in cell)
    assert all(r["noise_amplification"] is None for r in rows if r["epsilon"] is None)


def test_more_noise_more_amplification_and_bytes_ordering(result):
    rows = {(r["method"], r["epsilon"]): r for r in result[0]["methods"]}
    for m in ("fed-sb", "fedit"):  # σ at ε=2 is larger than at ε=8: the noise-free twin is further away
        assert rows[(m, 2.0)]["noise_amplification"] > rows[(m, 8.0)]["noise_amplification"]
    assert rows[("fed-sb", 2.0)]["bytes_up_per_client_round"] < rows[("fedit", 2.0)]["bytes_up_per_client_round"]
    assert rows[("fedit", 2.0)]["aggregation_error"] > 0
    assert rows[("fed-sb", 2.0)]["aggregation_error"] < 1e-5


def test_twin_is_marked(result):
    rows = result[0]["cells"]
    twin = next(r["twin_run_dir"] for r in rows if r["twin_run_dir"])
    summary = json.loads(open(f"{twin}/summary.json").read())
    assert summary["noise"].startswith("DISABLED")
    # released nothing noised, so it claims nothing: no ledger, no budget, no ε
    assert summary["privacy"].startswith("none (noise-free twin")
    assert summary["epsilon_spent"] is None and summary["epsilon_target"] is None and summary["epsilon_per_client"] == {}
    assert not Path(twin, "ledger.jsonl").exists() and not Path(twin, "budget.json").exists()
    lines = [json.loads(x) for x in open(f"{twin}/metrics.jsonl").read().splitlines()]
    assert all(x["epsilon_spent"] is None for x in lines)


@pytest.mark.parametrize("extra, message", [
    (["--epsilon", "0"], "--epsilon must be comma-separated finite numbers > 0"),
    (["--methods", "fed-sb,lora-xl", "--epsilon", "3"], "methods must be a comma-separated subset"),
    ([], "give --epsilon"),
    (["--epsilon", "3", "--seeds", "0"], "seeds must be an integer >= 1"),
])
def test_bad_input(run_cli, tiny_bert_dir, tiny_csv, tmp_path, extra, message):
    code, _, err = run_cli(_args(tiny_bert_dir, tiny_csv, tmp_path / "o", *extra))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
