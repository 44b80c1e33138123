"""SIGKILL `dpfed train` at random points; the ledger must never under-count and --resume must finish in budget.

Each trial starts a tiny DP run in a subprocess and kills it 4 times (the first start, then
each ``--resume``), at seeded random delays: some from process start (setup, imports), most
after the first checkpoint appears (mid-round: inside a client's steps, between a ledger
append and the checkpoint, during evaluation). After every kill:

- the ledger verifies, or its only defect is a torn last line that ``Ledger.recover`` repairs;
- the checkpoint's ledger head is still in the ledger (no line released before it went missing);
- every client's ledger ε is >= the ε of the rounds the checkpoint says were released.

Finally an in-process resume finishes the run with every client's ε <= budget, and
``dpfed budget`` reads the run directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accounting.errors import LedgerCorruptError
from accounting.events import PoissonGaussianEvent
from accounting.ledger import Ledger
from accounting.prv import epsilon

pytestmark = pytest.mark.slow

MIN_KILLS, MAX_ATTEMPTS, KILLS_PER_TRIAL, BUDGET, DELTA = 20, 40, 4, 3.0, 1e-4


def _argv(model_dir, data, out):
    return ["train", "--model", model_dir, "--dataset", data, "--text-column", "sentence", "--label-column", "sentiment",
            "--clients", "3", "--rounds", "4", "--local-steps", "3", "--batch-size", "16", "--rank", "4",
            "--epsilon", str(BUDGET), "--delta", str(DELTA), "--init", "random", "--device", "cpu",
            "--out", str(out), "--format", "json"]


def _check_after_kill(out: Path, tmp: Path) -> dict:
    """The invariants after a kill; returns what was seen."""
    from dpfed.runner import load_checkpoint

    ledger_path = out / "ledger.jsonl"
    if not (out / "checkpoint.safetensors").is_file():  # killed during setup: nothing was released
        assert not ledger_path.exists() or ledger_path.stat().st_size == 0
        return {"round": None, "torn": False}
    meta, _, _ = load_checkpoint(out)
    copy = tmp / "ledger-copy.jsonl"
    shutil.copyfile(ledger_path, copy)
    torn = False
    try:
        Ledger(copy)
    except LedgerCorruptError as exc:  # only a torn last line is allowed
        assert "truncated last line" in str(exc), exc
        Ledger.recover(copy)
        torn = True
    seq, digest = meta["ledger_head"]
    ledger = Ledger(copy, expected_head=(seq, digest))
    k = meta["round"]
    info = json.loads((out / "run.json").read_text())
    for i in range(3):
        cid = f"client-{i:03d}"
        events = ledger.events(cid)
        assert len(events) >= k, (cid, len(events), k)
        if k:
            released = [PoissonGaussianEvent(noise_multiplier=info["noise_multiplier"],
                                             sample_rate=events[0].sample_rate, count=3)] * k
            assert epsilon(events, delta=DELTA).upper >= epsilon(released, delta=DELTA).upper - 1e-12
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        rounds = []
        for line in metrics.read_text().splitlines():
            try:
                rounds.append(json.loads(line)["round"])
            except json.JSONDecodeError:
                break  # a torn metrics line: resume drops it
        assert all(r <= k for r in rounds)  # metrics are written after the checkpoint
    copy.unlink()
    return {"round": k, "torn": torn}


def test_sigkill_at_random_points_then_resume(tiny_bert_dir, tiny_csv, tmp_path):
    from dpfed.cli import main
    from dpfed.runner import resume

    rng = random.Random(20240611)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    kills, finished_early, seen, t0 = 0, 0, [], time.time()
    trial, attempts = 0, 0
    while kills < MIN_KILLS and attempts < MAX_ATTEMPTS:
        out = tmp_path / f"trial-{trial}"
        trial += 1
        for attempt in range(KILLS_PER_TRIAL):
            attempts += 1
            started = (out / "checkpoint.safetensors").is_file()
            argv = (["train", "--resume", str(out), "--format", "json"] if started
                    else _argv(tiny_bert_dir, tiny_csv, out))
            if not started and out.exists():
                shutil.rmtree(out)  # killed in setup before any checkpoint: start afresh
            proc = subprocess.Popen([sys.executable, "-m", "dpfed.cli", *argv], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            t_start = time.time()
            if rng.random() < 0.25:  # anywhere, setup included
                deadline = t_start + rng.uniform(0.5, 12.0)
            else:  # mid-training: after the checkpoint (re)appears
                mark = (out / "checkpoint.json").stat().st_mtime if started else 0.0
                while proc.poll() is None and time.time() - t_start < 60:
                    p = out / "checkpoint.json"
                    if p.is_file() and p.stat().st_mtime > mark:
                        break
                    time.sleep(0.02)
                deadline = time.time() + rng.uniform(0.0, 3.0)
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            else:
                finished_early += 1
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            proc.wait()
            proc.stderr.close()
            seen.append(_check_after_kill(out, tmp_path))
            if proc.returncode == 0:
                break  # the run ended on its own (completed or refused by the budget): next trial
        if not (out / "checkpoint.safetensors").is_file():
            continue  # every attempt died in setup: nothing to resume, nothing spent
        if (out / "summary.json").is_file():  # killed after the run had ended: resume would change nothing
            s = json.loads((out / "summary.json").read_text())
        else:
            s = resume(out)
        assert s["rounds_completed"] >= 1
        assert all(e <= BUDGET for e in s["epsilon_per_client"].values()), s["epsilon_per_client"]
        assert s["stop_reason"] == "completed" or "over by" in s["stop_reason"]
        try:
            main(["budget", str(out), "--format", "json"])
        except SystemExit as exc:
            assert exc.code in (0, None), exc
    print(f"\n{kills} kills, {finished_early} runs finished before their kill, "
          f"{sum(1 for s in seen if s['torn'])} torn ledgers, checkpoint rounds seen "
          f"{sorted({s['round'] for s in seen if s['round'] is not None})}, {time.time() - t0:.0f} s")
    assert kills >= MIN_KILLS
