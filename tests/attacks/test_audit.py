"""`dpfed audit` on synthetic run directories: a planted leak is caught, an untouched model is not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from attacks import metrics as mt
from dpfed.cli import main

EPS_CLAIMED = 0.5  # the claim written into the synthetic runs (conftest.EPS_CLAIMED)

REQUIRED_KEYS = ["epsilon_claimed", "delta", "epsilon_lower_bound", "epsilon_lower_bound_ceiling", "confidence",
                 "canaries", "guesses", "correct", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "verdict",
                 "model", "base_model_sha256", "adapter", "data_fingerprints", "packages", "git_commit", "date"]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.fixture(scope="module")
def audits(synthetic_runs):
    from attacks.audit import audit_run

    return {name: audit_run(synthetic_runs[name]) for name in ("untouched", "leaky", "nodp")}


def test_untouched_model_shows_nothing(audits):
    r = audits["untouched"]
    assert r["verdict"] == "consistent"
    assert r["epsilon_lower_bound"] == 0.0
    assert r["guesses"] == 0  # every loss reduction is exactly 0: all tied, all abstained on
    assert r["auc"] == pytest.approx(0.5)
    assert r["gdp_mu"] == pytest.approx(0.0, abs=1e-9)
    assert r["epsilon_claimed"] == pytest.approx(EPS_CLAIMED)
    assert r["canaries"] == 200 and r["k_plus"] == r["k_minus"] == 20


def test_planted_leak_is_a_violation(audits):
    r = audits["leaky"]
    assert r["verdict"] == "violation"
    assert r["guesses"] == 40 and r["correct"] >= 34
    assert EPS_CLAIMED < r["epsilon_lower_bound"] <= r["epsilon_lower_bound_ceiling"]
    assert r["epsilon_lower_bound_ceiling"] == pytest.approx(mt.one_run_ceiling(m=200, r=40, delta=1e-5))
    assert r["attacks"]["reference"]["auc"] > 0.7 and r["attacks"]["loss"]["auc"] > 0.6
    assert r["attacks"]["canary_loss_reduction"]["auc"] > 0.7
    # the bound is the one-run audit of the reported scores with k fixed from m
    s = r["canary_scores"]
    again = mt.one_run_audit(scores=s["score"], included=s["included"], k_plus=20, k_minus=20, delta=1e-5)
    assert again["epsilon_lower_bound"] == r["epsilon_lower_bound"] and again["v"] == r["correct"]


def test_no_dp_run_is_no_claim(audits):
    r = audits["nodp"]
    assert r["verdict"] == "no-claim" and r["epsilon_claimed"] is None
    assert r["epsilon_lower_bound"] == audits["leaky"]["epsilon_lower_bound"]  # same model, same δ
    assert any("without differential privacy" in t for t in r["limitations"])


def test_rebuilt_final_model_matches_the_trained_one(synthetic_runs):
    """Slow obvious twin: losses of the model the audit rebuilds from files equal those of a fresh model
    with the final state loaded by hand."""
    from attacks.audit import build_model, load_run
    from attacks.scores import per_record_loss
    from dpfed.adapters.lorasb import load_trainable_state
    from safetensors.torch import load_file

    files = load_run(synthetic_runs["leaky"])
    model, initial, final = build_model(files)
    load_trainable_state(model, final)
    recs = synthetic_runs["canaries"].records()
    tok = synthetic_runs["tokenizer"]
    batched = per_record_loss(model, recs, tok, task="classification", max_length=32, batch_size=64)
    single = per_record_loss(model, recs, tok, task="classification", max_length=32, batch_size=1)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    adapter = load_file(str(synthetic_runs["leaky"] / "adapter" / "lorasb.safetensors"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert np.array_equal(p.detach().numpy(), adapter[name].numpy()), name
    for name, mod in model.named_modules():
        if hasattr(mod, "B") and hasattr(mod, "R"):
            assert np.array_equal(mod.B.numpy(), adapter[f"{name}.B"].numpy())


def test_cli_exit_codes_and_reports(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "leaky-report"
    code, stdout, err = _run(["audit", str(synthetic_runs["leaky"]), "--out", str(out), "--format", "json"], capsys)
    assert code == 3, err
    r = json.loads(stdout)
    for key in REQUIRED_KEYS:
        assert key in r, key
    assert r["verdict"] == "violation"
    on_disk = json.loads((out / "audit.json").read_text())
    assert on_disk["epsilon_lower_bound"] == r["epsilon_lower_bound"]
    assert len(on_disk["base_model_sha256"]) == 64
    md = (out / "audit.md").read_text()
    assert "violation" in md and "## Limitations" in md
    page = (out / "audit.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "src=\"//" not in page and "@import" not in page
    for section in ("Identity", "Claim", "Method", "Results", "Verdict", "Limitations"):
        assert f"<h2>{section}</h2>" in page
    code, stdout, err = _run(["audit", str(synthetic_runs["untouched"]), "--out", str(tmp_path / "u")], capsys)
    assert code == 0, err
    assert "consistent" in stdout
    code, _, err = _run(["audit", str(synthetic_runs["nodp"]), "--out", str(tmp_path / "n"), "--format", "json"], capsys)
    assert code == 0, err


def test_report_defaults_to_the_run_dir(synthetic_runs, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(synthetic_runs["untouched"], run)
    code, _, err = _run(["audit", str(run), "--format", "json"], capsys)
    assert code == 0, err
    assert all((run / f).is_file() for f in ("audit.json", "audit.md", "audit.html"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: shutil.rmtree(d), "not a directory"),
    (lambda d: (d / "canaries.json").unlink(), "canaries.json: canary file not found"),
    (lambda d: (d / "initial_state.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
    (lambda d: (d / "adapter" / "lorasb.safetensors").unlink(), "lorasb.safetensors: not found"),
    (lambda d: (d / "summary.json").write_text("{"), "summary.json: not valid JSON"),
    (lambda d: (d / "config.yaml").write_text("model: {rank: -1}"), "config.yaml: not a valid run config"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml: not found"),
])
def test_missing_or_corrupt_run_dir_is_one_line_exit_2(synthetic_runs, tmp_path, capsys, damage, message):
    run = tmp_path / "broken"
    shutil.copytree(synthetic_runs["untouched"], run)
    damage(run)
    code, _, err = _run(["audit", str(run)], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--confidence", "1.5"], "confidence must be in (0, 1)"),
    (["--format", "xml"], "format must be one of"),
    (["--k-fraction", "0.9"], "k_fraction must be in (0, 0.5]"),
])
def test_bad_options_exit_2(synthetic_runs, tmp_path, capsys, args, message):
    code, _, err = _run(["audit", str(synthetic_runs["untouched"]), "--out", str(tmp_path), *args], capsys)
    assert code == 2 and message in err
