"""`dpfed audit` on synthetic run directories: a planted leak is caught, an untouched model is not."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from attacks import metrics as mt

EPS_CLAIMED = 0.5  # the claim written into the synthetic runs (conftest.EPS_CLAIMED)

REQUIRED_KEYS = ["epsilon_claimed", "delta", "epsilon_lower_bound", "epsilon_lower_bound_ceiling", "confidence",
                 "canaries", "guesses", "correct", "auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "verdict",
                 "model", "base_model_sha256", "adapter", "data_fingerprints", "packages", "git_commit", "date"]


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
    assert r["guesses"] == 40 and r["correct"] >= 33  # 39 measured; 33 of 40 already gives epsilon_LB 0.83 > 0.5
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


def test_cli_exit_codes_and_reports(synthetic_runs, tmp_path, run_cli):
    out = tmp_path / "leaky-report"
    code, stdout, err = run_cli(["audit", str(synthetic_runs["leaky"]), "--out", str(out), "--format", "json"])
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
    code, stdout, err = run_cli(["audit", str(synthetic_runs["untouched"]), "--out", str(tmp_path / "u")])
    assert code == 0, err
    assert "consistent" in stdout
    code, _, err = run_cli(["audit", str(synthetic_runs["nodp"]), "--out", str(tmp_path / "n"), "--format", "json"])
    assert code == 0, err


def test_report_defaults_to_the_run_dir(synthetic_runs, tmp_path, run_cli):
    run = tmp_path / "copy"
    shutil.copytree(synthetic_runs["untouched"], run)
    code, _, err = run_cli(["audit", str(run), "--format", "json"])
    assert code == 0, err
    assert all((run / f).is_file() for f in ("audit.json", "audit.md", "audit.html"))


@pytest.mark.parametrize("damage, message", [
    (lambda d: shutil.rmtree(d), "not a directory"),
    (lambda d: (d / "canaries.json").unlink(), "canaries.json: not found: the run was trained without --canaries"),
    (lambda d: (d / "initial_state.safetensors").write_bytes(b"garbage"), "not a readable safetensors file"),
    (lambda d: (d / "adapter" / "lorasb.safetensors").unlink(), "lorasb.safetensors: not found"),
    (lambda d: (d / "summary.json").write_text("{"), "summary.json: not valid JSON"),
    (lambda d: (d / "config.yaml").write_text("model: {rank: -1}"), "config.yaml: not a valid run config"),
    (lambda d: (d / "config.yaml").unlink(), "config.yaml: not found"),
])
def test_missing_or_corrupt_run_dir_is_one_line_exit_2(synthetic_runs, tmp_path, run_cli, damage, message):
    run = tmp_path / "broken"
    shutil.copytree(synthetic_runs["untouched"], run)
    damage(run)
    code, _, err = run_cli(["audit", str(run)])
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--confidence", "1.5"], "confidence must be in (0, 1)"),
    (["--format", "xml"], "format must be one of"),
    (["--k-fraction", "0.9"], "k_fraction must be in (0, 0.5]"),
])
def test_bad_options_exit_2(synthetic_runs, tmp_path, run_cli, args, message):
    code, _, err = run_cli(["audit", str(synthetic_runs["untouched"]), "--out", str(tmp_path), *args])
    assert code == 2 and message in err


def test_causal_lm_run_is_audited(tiny_llama_dir, tiny_csv, tmp_path, one_thread, run_writer):
    """Causal LM: canaries without labels, no head; an untouched model shows nothing, a fitted R something."""
    import torch

    from attacks.audit import audit_run
    from attacks.canaries import choose_attack_records, make_canaries, plant
    from dpfed.adapters.init import init_random
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.config import DataConfig, InitConfig, ModelConfig, PrivacyConfig, RunConfig
    from dpfed.data import load_records, load_tokenizer, split_and_partition, tokenize
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import DEFAULT_TARGETS, load_base, select_targets
    from dpfed.privacy import make_generator, per_example_loss

    cfg = RunConfig(model=ModelConfig(name=tiny_llama_dir, task="causal-lm", rank=4, max_length=32),
                    data=DataConfig(source=tiny_csv, text_column="sentence", label_column=None, num_clients=2,
                                    test_fraction=0.2, public_fraction=0.0),
                    init=InitConfig(strategy="random"), privacy=PrivacyConfig(epsilon=0.5, delta=1e-5), seed=0)
    records = load_records(cfg.data, task="causal-lm")
    splits = split_and_partition(records, cfg.data, seed=1)
    tok = load_tokenizer(tiny_llama_dir)
    canaries = make_canaries(m=40, label_names=None, num_clients=2, seed=3, tokenizer=tok, length=12)
    attack = choose_attack_records(splits, heldout=splits.test, n=20, seed=4, canaries=canaries)
    model = load_base(tiny_llama_dir, task="causal-lm")
    adapters = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["llama"]), rank=4)
    init_random(adapters, generator=make_generator(0))
    initial = trainable_state(model)
    common = dict(cfg=cfg, model=model, adapters=adapters, initial=initial, splits=plant(splits, canaries, seed=5),
                  canaries=canaries, attack_records=attack)
    r = audit_run(run_writer(tmp_path / "untouched", **common))
    assert r["verdict"] == "consistent" and r["epsilon_lower_bound"] == 0.0 and r["task"] == "causal-lm"
    inc = canaries.records().subset([i for i in range(canaries.m) if canaries.included[i]])
    batch = tokenize(inc, tok, max_length=32).batch(range(len(inc)))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        per_example_loss(model, batch, task="causal-lm").mean().backward()
        opt.step()
    r = audit_run(run_writer(tmp_path / "fitted", **common))
    assert r["attacks"]["canary_loss_reduction"]["auc"] > 0.7
    assert r["guesses"] == 8 and r["correct"] >= 6


def test_claim_is_derived_from_the_ledger(synthetic_runs, tmp_path):
    """Epsilon is never taken as stored truth when the ledger is there: it is recomputed from the events."""
    from accounting.events import PoissonGaussianEvent
    from accounting.ledger import Ledger
    from accounting.prv import epsilon
    from attacks.audit import load_run, read_claim

    run = tmp_path / "with-ledger"
    shutil.copytree(synthetic_runs["untouched"], run)
    ledger = Ledger(run / "ledger.jsonl")
    summary = json.loads((run / "summary.json").read_text())  # the ledger must agree with it (σ, q, ε >= summary's)
    events = {c: PoissonGaussianEvent(noise_multiplier=summary["noise_multiplier"], sample_rate=q, count=2)
              for c, q in summary["sample_rates"].items()}
    for rnd in (1, 2):
        for client, ev in events.items():
            ledger.append(client=client, round=rnd, event=ev)
    claim = read_claim(load_run(run))
    want = max(epsilon([ev] * 2, delta=1e-5).upper for ev in events.values())
    assert claim["epsilon"] == pytest.approx(want) and claim["epsilon_source"].startswith("ledger.jsonl")
    assert claim["epsilon"] > EPS_CLAIMED
    lines = (run / "ledger.jsonl").read_text().splitlines()
    (run / "ledger.jsonl").write_text("\n".join([lines[0].replace("client-000", "client-009"), *lines[1:]]) + "\n")
    from dpfed.errors import DataError

    with pytest.raises(DataError, match="ledger.jsonl"):
        read_claim(load_run(run))


def test_audit_without_attack_records(synthetic_runs, tmp_path):
    from attacks.audit import audit_run
    from attacks.report import write_reports

    run = tmp_path / "no-records"
    shutil.copytree(synthetic_runs["leaky"], run)
    (run / "attack_records.json").unlink()
    r = audit_run(run)
    assert r["verdict"] == "violation" and r["headline_attack"] == "canary_loss_reduction"
    assert set(r["attacks"]) == {"canary_loss_reduction"}
    assert any("No attack_records.json" in t for t in r["limitations"])
    paths = write_reports(r, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["auc"] == pytest.approx(r["auc"])
