"""`dpfed train --canaries M` then `dpfed audit`: the wiring between training and the auditor."""

from __future__ import annotations

import json

import pytest



def test_train_with_canaries_then_audit(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence",
                           "--label-column", "sentiment", "--clients", "3", "--rounds", "2", "--local-steps", "2",
                           "--batch-size", "16", "--rank", "4", "--epsilon", "3", "--delta", "1e-4", "--seed", "0",
                           "--init", "random", "--canaries", "40", "--canary-kind", "random-words", "--out", str(run),
                              "--format", "json"])
    assert code == 0, err
    canaries = json.loads((run / "canaries.json").read_text())
    included = [c for c in canaries["canaries"] if c["included"]]
    assert 5 < len(included) < 35  # Bernoulli(1/2) over 40
    summary = json.loads(out)
    # the planted canaries are part of the clients' shards (and so of q_i = b / n_i)
    sizes = sum(summary["client_sizes"].values())
    attack = json.loads((run / "attack_records.json").read_text())
    assert attack["n"] > 0
    code, out, err = run_cli(["audit", str(run), "--format", "json"])
    assert code in (0, 3), err
    audit = json.loads(out)
    assert audit["canaries"] == 40 and audit["epsilon_claimed"] == pytest.approx(summary["epsilon_spent"], rel=1e-6)
    assert audit["verdict"] == "consistent"  # a tiny DP run cannot show ε_LB above its ε
    assert sizes > 0
    for f in ("audit.json", "audit.md", "audit.html"):
        assert (run / f).is_file()
