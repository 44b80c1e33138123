"""``dpfed audit`` on instruct runs: gradient canaries through the prefix-cached path, and the loss attack on responses."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from attacks.audit import audit_run
from attacks.canaries import GradientCanarySet, attack_records_as_records, load_attack_records, load_canaries
from attacks.plan import audit_plan
from dpfed import config as cfgmod
from dpfed.errors import ConfigError

WORDS = "good great fine bad awful poor movie film plot actor story boring fun dull superb weak strong the".split()
INSTRUCT = {"task": "instruct", "max_length": 32, "max_new_tokens": 1}
SENTIMENT = {"template": "{sentence}", "response_column": "sentiment", "response_map": {"pos": "good", "neg": "bad"}}


def _sentiment_cfg(model_dir: str, csv_path: str, **over) -> cfgmod.RunConfig:
    d = {"model": {"name": model_dir, **INSTRUCT, "rank": 16, "adapt_layers": [-1]},
         "data": {"source": csv_path, **SENTIMENT, "num_clients": 2, "canaries": 1000},
         "train": {"rounds": 10, "local_steps": 10, "batch_size": 64, "lr": 5.0, "eval_examples": 4},
         "privacy": {"epsilon": 1.0, "delta": 1e-4}, "seed": 0, "device": "cpu"}
    for k, v in over.items():
        d[k] = {**d[k], **v}
    return cfgmod.from_dict(d)


def test_cli_train_instruct_with_gradient_canaries_then_audit(tiny_llama_dir, tiny_csv, tmp_path, run_cli):
    cfg = tmp_path / "instruct.yaml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "model": {"name": tiny_llama_dir, **INSTRUCT, "rank": 4, "adapt_layers": [-1]},
        "data": {"source": tiny_csv, **SENTIMENT, "num_clients": 3},
        "train": {"rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 0.5, "eval_examples": 8},
        "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 0}))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", str(cfg), "--canaries", "100", "--out", str(run), "--format", "json"])
    assert code == 0, err
    summary = json.loads(out)
    assert summary["init_info"]["prefix_cache_layers"] == 1.0  # the canaries ride on the prefix-cached path
    canaries = load_canaries(run / "canaries.json")
    assert isinstance(canaries, GradientCanarySet) and canaries.m == 100 and all(n.endswith(".R") for n in canaries.names)
    held = load_attack_records(run / "attack_records.json")  # min(500, 5%) of 400 records held out: 20 per side
    assert held["task"] == "instruct" and held["n"] == 20
    assert all(r["response"] in ("good", "bad") for r in held["members"] + held["non_members"])
    code, out, err = run_cli(["audit", str(run), "--format", "json"])
    assert code == 0, err
    audit = json.loads(out)
    assert audit["task"] == "instruct" and audit["one_run"]["canary_kind"] == "gradient"
    assert {"canary_gradient", "loss", "reference"} <= set(audit["attacks"])
    assert audit["verdict"] == "consistent" and audit["epsilon_lower_bound"] <= audit["epsilon_claimed"] <= 3.0


def _planted_run(tiny_llama_dir, tiny_csv, out, *, plant_leak=None):
    from dpfed.runner import prepare, run

    cfg = _sentiment_cfg(tiny_llama_dir, tiny_csv)  # 7 × 16² = 1,792 trainable coordinates, 1,000 canaries
    job = prepare(cfg, audit=audit_plan(cfg))
    assert job.init_info["prefix_cache_layers"] == 1.0
    if plant_leak is not None:  # the planted bug: noise secretly off, the ledgers still claim epsilon = 1
        plant_leak()
    summary = run(job, out)
    assert summary["epsilon_spent"] <= 1.0
    return audit_run(out)


def test_instruct_planted_leak_noise_secretly_off_is_a_violation(tiny_llama_dir, tiny_csv, tmp_path, one_thread,
                                                                 noise_secretly_off):
    r = _planted_run(tiny_llama_dir, tiny_csv, tmp_path / "leak", plant_leak=noise_secretly_off)
    assert r["task"] == "instruct" and r["canaries"] == 1000 and r["epsilon_claimed"] <= 1.0
    assert r["verdict"] == "violation", (r["epsilon_lower_bound"], r["correct"], r["guesses"])
    assert r["epsilon_lower_bound"] > 1.5 and r["correct"] >= 180  # measured: 196 of 200, epsilon_LB 2.97
    assert r["epsilon_lower_bound"] <= r["epsilon_lower_bound_ceiling"]


def test_instruct_same_run_with_its_noise_is_consistent(tiny_llama_dir, tiny_csv, tmp_path, one_thread):
    r = _planted_run(tiny_llama_dir, tiny_csv, tmp_path / "dp")
    assert r["verdict"] == "consistent" and r["epsilon_lower_bound"] <= r["epsilon_claimed"]


def _qa_csv(path, n: int) -> str:
    """Prompts and responses of random words: a response can only be predicted by having seen the record."""
    rng = random.Random(1)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["question", "answer"])
        for _ in range(n):
            w.writerow([" ".join(rng.choice(WORDS) for _ in range(4)), " ".join(rng.choice(WORDS) for _ in range(3))])
    return str(path)


def test_loss_attack_on_responses_finds_the_members_of_a_run_without_dp(tiny_llama_dir, tmp_path, one_thread):
    from dpfed.runner import prepare, run

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_llama_dir, **INSTRUCT, "max_length": 16, "rank": 8},
        "data": {"source": _qa_csv(tmp_path / "qa.csv", 90), "prompt_column": "question", "response_column": "answer",
                 "num_clients": 2, "canaries": 10, "audit_holdout": 30},
        "train": {"rounds": 5, "local_steps": 20, "batch_size": 8, "lr": 0.05, "optimizer": "adam", "eval_examples": 2},
        "privacy": {"enabled": False}, "seed": 0, "device": "cpu"})
    job = prepare(cfg, audit=audit_plan(cfg))
    run(job, tmp_path / "run")
    r = audit_run(tmp_path / "run")
    assert r["verdict"] == "no-claim" and r["attacks"]["loss"]["n_members"] == r["attacks"]["loss"]["n_non_members"] >= 20
    assert r["attacks"]["loss"]["auc"] > 0.75, r["attacks"]["loss"]["auc"]  # measured: 0.92
    assert r["attacks"]["reference"]["auc"] > 0.75, r["attacks"]["reference"]["auc"]  # measured: 0.91


def test_per_record_loss_is_the_masked_response_loss(tiny_llama_dir, tmp_path):
    """The attack's loss of one record equals a hand-computed mean over its response tokens (prompt masked)."""
    from transformers import AutoTokenizer

    from attacks.scores import per_record_loss
    from dpfed.instruct import PromptResponseRecords, tokenize_instruct
    from dpfed.model import load_base

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = load_base(tiny_llama_dir, task="instruct", num_labels=2).eval()
    recs = PromptResponseRecords(("the movie was very good", "a dull plot"), None, (),
                                 responses=("great fun story", "bad"))
    got = per_record_loss(model, recs, tok, task="instruct", max_length=16, batch_size=2)
    for i in range(2):
        shard = tokenize_instruct(recs.subset([i]), tok, max_length=16, model_config=model.config)
        ids, p = shard.ids[0], shard.prompt_lengths[0]
        assert 0 < p < len(ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()  # (T, V)
        # position t predicts token t+1: the response tokens p .. T-1 are predicted at positions p-1 .. T-2
        want = F.cross_entropy(logits[p - 1:-1], torch.tensor(ids[p:])).item()
        whole = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
        assert got[i] == pytest.approx(want, rel=1e-5) and abs(got[i] - whole) > 1e-3
    with pytest.raises(ValueError, match="PromptResponseRecords"):
        from dpfed.data import Records

        per_record_loss(model, Records(("a",), None, ()), tok, task="instruct", max_length=16)


def test_attack_records_round_trip_keeps_the_responses(tmp_path):
    from attacks.canaries import choose_attack_records, save_attack_records
    from dpfed.data import Splits
    from dpfed.instruct import PromptResponseRecords

    def recs(ps, rs):
        return PromptResponseRecords(tuple(ps), None, (), responses=tuple(rs))

    clients = [recs(["p1", "p2", "same"], ["r1", "r2", "x"]), recs(["p3"], ["r3"])]
    held = recs(["h1", "h2", "same"], ["s1", "s2", "x"])  # ("same", "x") is in both pools: neither side takes it
    splits = Splits(test=recs(["t"], ["u"]), public=recs([], []), clients=tuple(clients))
    d = choose_attack_records(splits, heldout=held, n=2, seed=0)
    assert d["task"] == "instruct" and d["n"] == 2
    save_attack_records(tmp_path / "a.json", d)
    mem, non = attack_records_as_records(load_attack_records(tmp_path / "a.json"))
    assert isinstance(mem, PromptResponseRecords) and sorted(non.texts) == ["h1", "h2"]
    assert dict(zip(mem.texts, mem.responses)) == {p: r for p, r in [("p1", "r1"), ("p2", "r2"), ("p3", "r3")]
                                                   if p in mem.texts}
    assert np.all([t != "same" for t in mem.texts])


def test_config_accepts_gradient_canaries_and_refuses_random_words_for_instruct(tiny_llama_dir, tiny_csv):
    cfg = _sentiment_cfg(tiny_llama_dir, tiny_csv, data={"audit_holdout": 30})
    assert cfg.data.canary_kind == "gradient" and cfg.data.audit_holdout == 30
    with pytest.raises(ConfigError) as exc:
        _sentiment_cfg(tiny_llama_dir, tiny_csv, data={"canary_kind": "random-words"})
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1 and "random-words" in msg and "model.task 'instruct'" in msg
