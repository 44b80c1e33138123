"""The in-process numbers with a fixed seed, pinned: a refactor must not change them (issue 13).

Each case trains the tiny BERT for 2 rounds with seed 5 and compares the final accuracy, eval
loss and a fingerprint of the final global state (per-tensor sum and sum of squares) with the
values recorded before the round loop was split into setup / run directory / session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpfed import config as cfgmod

CASES = {
    "fed-sb-record-public-init": {},
    "fed-sb-both": {"privacy.unit": "both", "privacy.client_epsilon": 8.0, "privacy.client_delta": 1e-2,
                    "privacy.client_clip": 0.5, "train.client_fraction": 0.67},
    "fed-sb-dp-init": {"init.strategy": "dp", "init.dp_batch_size": 32},
    "fedit": {"train.method": "fedit", "init.strategy": "random"},
    "flora": {"train.method": "flora", "init.strategy": "random"},
}

# recorded at 7c2b52e, before the round loop was split (tests/data/golden_inprocess.json)
GOLDEN: dict[str, dict] = json.loads((Path(__file__).resolve().parents[1] / "data" / "golden_inprocess.json").read_text())


def golden_cfg(model_dir: str, data: str, **over) -> cfgmod.RunConfig:
    raw = {"model": {"name": model_dir, "rank": 4, "max_length": 32},
           "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                    "public_fraction": 0.1},
           "init": {"strategy": "public", "head": "public", "public_examples": 32, "head_epochs": 5},
           "train": {"rounds": 2, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128, "lr": 0.5},
           "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 5, "device": "cpu"}
    for dotted, value in over.items():
        sec, key = dotted.split(".")
        raw[sec][key] = value
    return cfgmod.from_dict(raw)


def fingerprint(run_dir) -> dict:
    from dpfed.runner import load_checkpoint

    _, state, _ = load_checkpoint(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"accuracy": summary["accuracy"], "eval_loss": summary["eval_loss"],
            "epsilon_spent": summary["epsilon_spent"],
            "state": {k: [float(v.double().sum()), float(v.double().pow(2).sum())] for k, v in sorted(state.items())}}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixed_seed_numbers_are_unchanged(case, tiny_bert_dir, tiny_csv, tmp_path):
    from dpfed.runner import prepare, run

    run(prepare(golden_cfg(tiny_bert_dir, tiny_csv, **CASES[case])), tmp_path / "run")
    got, want = fingerprint(tmp_path / "run"), GOLDEN[case]
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-6)
    assert (got["epsilon_spent"] is None) == (want["epsilon_spent"] is None)
    if want["epsilon_spent"] is not None:
        assert got["epsilon_spent"] == pytest.approx(want["epsilon_spent"], rel=1e-9)
    assert set(got["state"]) == set(want["state"])
    for k, (s, s2) in want["state"].items():
        assert got["state"][k][0] == pytest.approx(s, rel=1e-6, abs=1e-6), k
        assert got["state"][k][1] == pytest.approx(s2, rel=1e-6, abs=1e-9), k
