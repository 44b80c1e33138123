"""``dpfed compare`` on ``model.task: instruct`` (tiny random Llama): all five methods train one round, are scored by
generation, and their noise amplification is measured against a noise-free twin."""

from __future__ import annotations

import json
import math

import yaml

METHODS = ("fed-sb", "fedit", "ffa-lora", "fedex-lora", "flora")


def test_compare_runs_every_method_on_task_instruct(tiny_instruct_config, tmp_path, run_cli):
    cfg = tmp_path / "instruct.yaml"
    cfg.write_text(yaml.safe_dump(tiny_instruct_config(train={"rounds": 1, "lr": 2.0, "eval_examples": 40})))
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(["compare", "--config", str(cfg), "--epsilon", "3", "--device", "cpu",
                                 "--out", str(out), "--format", "json"])
    assert code == 0, err
    data = json.loads(stdout)
    rows = {r["method"]: r for r in data["methods"]}
    assert sorted(rows) == sorted(METHODS)
    assert len({r["noise_multiplier"] for r in rows.values()}) == 1  # same σ, q and steps for every method
    for m, r in rows.items():
        assert 0 < r["epsilon_spent"] <= 3.0, m
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["initial_accuracy"] <= 1 and math.isfinite(r["eval_loss"]), m
        assert math.isfinite(r["noise_amplification"]) and r["noise_amplification"] > 0, m
        assert r["noise_amplification_round1"] is not None and math.isfinite(r["noise_amplification_round1"]), m
        summary = json.loads((out / f"{m}-eps3-seed0" / "summary.json").read_text())
        assert summary["rounds_completed"] == 1 and summary["test_examples"] == 40, m
        assert summary["init_info"]["prefix_cache_layers"] == 1.0, m  # the frozen-prefix path, for every method
    assert rows["fed-sb"]["bytes_up_per_client_round"] < rows["fedit"]["bytes_up_per_client_round"]
    # every method starts at the pretrained model (R = 0, or B = 0): the same zero-shot scores, although the methods
    # share the first job's shards and frozen-prefix cache
    before = [json.loads((out / f"{m}-eps3-seed0" / "summary.json").read_text())["initial_eval"] for m in METHODS]
    assert len({b["accuracy"] for b in before}) == 1
    assert all(math.isclose(b["eval_loss"], before[0]["eval_loss"], rel_tol=1e-5) for b in before)
