"""Ctrl-C, resume of a finished run, and a damaged checkpoint: one line, the right exit code, nothing lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpfed import config as cfgmod
from dpfed.errors import Interrupted


def _cfg(model_dir: str, data: str, **over) -> cfgmod.RunConfig:
    raw = {
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                 "public_fraction": 0.0},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 2, "local_steps": 1, "batch_size": 16, "eval_batch_size": 128},
        "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 3, "device": "cpu",
    }
    for dotted, value in over.items():
        sec, key = dotted.split(".")
        raw[sec][key] = value
    return cfgmod.from_dict(raw)


def _train_argv(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--dataset", data, "--text-column", "sentence", "--label-column",
            "sentiment", "--clients", "3", "--local-steps", "1", "--batch-size", "16", "--rank", "4", "--delta", "1e-4",
            "--init", "random", "--seed", "3", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("pre_created", [False, True])
def test_interrupt_before_anything_is_spent_removes_only_what_dpfed_created(tiny_bert_dir, tiny_csv, tmp_path,
                                                                             pre_created):
    from dpfed.runner import prepare, run

    out = tmp_path / "run"
    if pre_created:
        out.mkdir()
    job = prepare(_cfg(tiny_bert_dir, tiny_csv, **{"init.strategy": "dp"}))

    def stop(kind, info):
        if kind == "setup":  # init: dp announces itself before its events are appended
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="nothing was spent") as exc:
        run(job, out, progress=stop)
    assert exc.value.round is None
    assert out.is_dir() == pre_created and (not pre_created or not any(out.iterdir()))


def test_resume_of_a_finished_run_changes_nothing(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, out, "--rounds", "1"))
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, stdout, err = run_cli(["train", "--resume", str(out)])
    assert code == 0 and "is complete (1/1 rounds)" in err and "nothing to resume" in err
    assert len(err.strip().splitlines()) == 1 and "before training" not in err + stdout
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_damaged_checkpoint_is_one_line(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    from dpfed.runner import prepare, run

    out = tmp_path / "run"
    job = prepare(_cfg(tiny_bert_dir, tiny_csv))

    def stop(kind, info):
        if kind == "round":
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=r"interrupted after round 1; resume with: dpfed train --resume"):
        run(job, out, progress=stop)
    (out / "checkpoint.safetensors").write_bytes(b"\x00garbage" * 10)
    code, _, err = run_cli(["train", "--resume", str(out)])
    assert code == 2 and "checkpoint is damaged" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_ctrl_c_prints_how_to_resume_and_metrics_match_the_checkpoint(tiny_bert_dir, tiny_csv, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dpfed.cli", *_train_argv(tiny_bert_dir, tiny_csv, out, "--rounds", "400",
                                                                              "--epsilon", "50")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            meta = out / "checkpoint.json"
            if meta.is_file() and json.loads(meta.read_text() or "{}").get("round", 0) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run did not reach round 2 in time")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    rnd = json.loads((out / "checkpoint.json").read_text())["round"]
    assert last == f"interrupted after round {rnd}; resume with: dpfed train --resume {out}"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # a line exists for every checkpointed round; at most one more (written, not yet checkpointed: resume redoes it)
    assert [x["round"] for x in lines][:rnd] == list(range(1, rnd + 1)) and len(lines) <= rnd + 1


def test_a_pre_created_empty_out_survives_a_refused_run(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, out, "--rounds", "1", "--batch-size", "100000"))
    assert code == 2 and "batch_size must be <=" in err and len(err.strip().splitlines()) == 1
    assert out.is_dir() and not any(out.iterdir())
    new = tmp_path / "new"
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, new, "--rounds", "1", "--batch-size", "100000"))
    assert code == 2 and not new.exists()


def test_a_second_run_on_the_same_out_is_refused_before_its_setup(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    from dpfed.runner import CLAIM, claim_run_dir

    out = tmp_path / "run"
    assert claim_run_dir(out) is True  # the first run holds it (here: mid-setup)
    t0 = time.monotonic()
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, out, "--rounds", "1"))
    assert code == 2 and "in use by another run" in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 5  # refused at once, not after preparing data and model
    assert (out / CLAIM).is_file()  # the first run's claim is untouched


def test_an_unwritable_out_is_one_line(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, blocker / "run", "--rounds", "1"))
    assert code == 2 and "out must be a directory dpfed can create" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_keyed_ledger_train_resume_and_budget(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    from dpfed.runner import prepare, run

    key_file = tmp_path / "keys" / "site.key"
    key_file.parent.mkdir()
    out = tmp_path / "run"
    code, _, err = run_cli(_train_argv(tiny_bert_dir, tiny_csv, out, "--rounds", "1", "--ledger-key", str(key_file)))
    assert code == 0, err
    assert (key_file.stat().st_mode & 0o777) == 0o600 and b"mac" in (out / "ledger.jsonl").read_bytes()
    code, _, err = run_cli(["budget", str(out), "--ledger-key", str(key_file)])
    assert code == 0, err
    # an interrupted keyed run resumes only with its key
    job = prepare(_cfg(tiny_bert_dir, tiny_csv))

    def stop(kind, info):
        if kind == "round":
            raise KeyboardInterrupt

    from accounting.ledger import load_key

    with pytest.raises(Interrupted):
        run(job, tmp_path / "r2", progress=stop, ledger_key=load_key(key_file))
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "r2")])
    assert code == 2 and "--ledger-key must be given" in err
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "r2"), "--ledger-key", str(key_file)])
    assert code == 0, err
