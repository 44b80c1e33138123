"""Checkpoint/resume, budget refusal and client-level DP (DP-FedAvg) on the tiny BERT fixture."""

from __future__ import annotations

import json
import math

import pytest
import torch

from accounting.events import PoissonGaussianEvent
from accounting.ledger import Ledger
from accounting.prv import epsilon
from dpfed import config as cfgmod
from dpfed.aggregation import ClientLevelDP, FedSBAggregator
from dpfed.runner import CHECKPOINT, SERVER_ID, SERVER_LEDGER, load_checkpoint, prepare, resume, run


def _cfg(model_dir, data, **privacy):
    return cfgmod.from_dict({
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 3, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128},
        "privacy": {"epsilon": 3.0, "delta": 1e-4, **privacy},
        "seed": 0, "device": "cpu",
    })


class _Stop(Exception):
    pass


def _stop_after(round_):
    def progress(kind, info):
        if kind == "round" and info["round"] == round_:
            raise _Stop()
    return progress


def test_resume_after_stop_continues_rounds_and_ledger(tiny_bert_dir, tiny_csv, tmp_path):
    cfg = _cfg(tiny_bert_dir, tiny_csv, noise_multiplier=1.2)  # fixed σ: no calibration, a fast test
    out = tmp_path / "run"
    with pytest.raises(_Stop):
        run(prepare(cfg), out, progress=_stop_after(1))
    meta, _, frozen = load_checkpoint(out)
    assert meta["round"] == 1 and not (out / "summary.json").exists()
    assert meta["ledger_head"] == list(Ledger(out / "ledger.jsonl").head)
    assert len(frozen) == 2 * sum(1 for k in frozen if k.endswith(".B"))
    s = resume(out)
    assert s["rounds_completed"] == 3 and s["stop_reason"] == "completed" and s["resumed"]["from_round"] == 1
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    led = Ledger(out / "ledger.jsonl")
    assert len(led) == 9
    for cid, eps in s["epsilon_per_client"].items():
        assert sorted(led.rounds_completed(cid)) == [1, 2, 3]
        assert math.isclose(eps, epsilon(led.events(cid), delta=1e-4).upper) and eps <= 3.0
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["seed"] == 0 and "split_seed" in run_json


@pytest.mark.slow
def test_resumed_seeded_run_equals_uninterrupted_run(tiny_bert_dir, tiny_csv, tmp_path):
    """With a user seed, per-round seeds make the resumed run draw what the uninterrupted one draws."""
    cfg = _cfg(tiny_bert_dir, tiny_csv, noise_multiplier=1.2)
    full = run(prepare(cfg), tmp_path / "full")
    with pytest.raises(_Stop):
        run(prepare(cfg), tmp_path / "run", progress=_stop_after(2))
    s = resume(tmp_path / "run")
    _, a, _ = load_checkpoint(tmp_path / "full")
    _, b, _ = load_checkpoint(tmp_path / "run")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert math.isclose(full["epsilon_spent"], s["epsilon_spent"]) and full["accuracy"] == s["accuracy"]


def test_os_entropy_seed_is_never_recorded(tiny_bert_dir, tiny_csv, tmp_path):
    cfg = cfgmod.override(_cfg(tiny_bert_dir, tiny_csv), **{"train.rounds": 1})
    cfg = cfgmod.RunConfig(**{**{f: getattr(cfg, f) for f in ("model", "data", "init", "train", "privacy", "device")}})
    job = prepare(cfg)
    s = run(job, tmp_path / "r")
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["seed"] is None and s["seed"] == "os-entropy (not recorded)"
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "r").glob("*.json*"))
    assert str(job.seed) not in text and info["split_seed"] != job.seed


def test_crash_after_append_is_counted_and_budget_refuses(tiny_bert_dir, tiny_csv, tmp_path):
    """A crash after the clients appended round 2 but before its checkpoint: those events stay counted;
    with σ calibrated for exactly 3 rounds, the over-counted run must refuse its last round."""
    cfg = _cfg(tiny_bert_dir, tiny_csv)
    out = tmp_path / "run"
    with pytest.raises(_Stop):
        run(prepare(cfg), out, progress=_stop_after(1))
    led = Ledger(out / "ledger.jsonl")
    sigma = json.loads((out / "run.json").read_text())["noise_multiplier"]
    q = led.events("client-000")[0].sample_rate
    for i in range(3):  # round 2 was spent, the crash hit before its checkpoint
        led.append(client=f"client-{i:03d}", round=2, event=PoissonGaussianEvent(
            noise_multiplier=sigma, sample_rate=led.events(f"client-{i:03d}")[0].sample_rate, count=2))
    with open(out / "ledger.jsonl", "ab") as fh:  # and a torn line for client-000's round 3
        fh.write(b'{"client":"client-000","event":{"count":2,"noise_multiplier":%s,"sample_rate":%r,"type":"poisson_g'
                 % (str(sigma).encode(), q))
    s = resume(out)
    # the torn fragment names no complete event: every client's in-flight round is re-appended (conservative),
    # so each client holds 3 rounds, all that σ allows: round 2 of the resumed run is refused
    assert s["rounds_completed"] == 1
    assert "client client-000 would reach epsilon" in s["stop_reason"] and "over by" in s["stop_reason"]
    led = Ledger(out / "ledger.jsonl")
    assert all(len(led.events(f"client-{i:03d}")) == 3 for i in range(3))
    assert (out / "ledger.jsonl.torn").is_file()
    assert all(e <= 3.0 for e in s["epsilon_per_client"].values())


def test_client_level_noise_scale_and_clipping():
    g = {"R": torch.zeros(200, 200), "head": torch.zeros(10)}
    agg = ClientLevelDP(FedSBAggregator(weighting="uniform"), clip=0.5, noise_multiplier=2.0, expected_clients=4.0,
                        generator=torch.Generator().manual_seed(1))
    out = agg.aggregate([], [], global_state=g)  # no client sampled: noise only
    std = float(torch.cat([v.reshape(-1) for v in out.values()]).std())
    assert abs(std / (2.0 * 0.5 / 4.0) - 1) < 0.02  # 40 010 draws: relative s.e. of the std ~ 0.4 %
    agg.noise_multiplier = 0.0
    big = {"R": torch.full((200, 200), 1.0), "head": torch.zeros(10)}  # norm 200, clipped to 0.5
    small = {"R": torch.zeros(200, 200), "head": torch.full((10,), 0.01)}  # norm ~0.032, kept
    out = agg.aggregate([big, small], [10, 1000], global_state=g)
    assert agg.last_norms[0] == pytest.approx(200.0) and agg.last_norms[1] == pytest.approx(0.1 ** 0.5 * 0.1)
    total = torch.sqrt(out["R"].pow(2).sum()) * 4.0
    assert float(total) == pytest.approx(0.5, rel=1e-6)
    assert torch.allclose(out["head"], torch.full((10,), 0.01 / 4.0))
    with pytest.raises(ValueError, match="uniform weighting"):
        ClientLevelDP(FedSBAggregator(weighting="size"), clip=1.0, noise_multiplier=1.0, expected_clients=1.0,
                      generator=torch.Generator())


def test_both_guarantees_in_summary_and_server_ledger_matches_planning(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    from accounting.planning import bound

    cfg = cfgmod.override(_cfg(tiny_bert_dir, tiny_csv, unit="both", client_clip=0.1, client_epsilon=8.0,
                               client_delta=1e-2), **{"train.rounds": 2, "train.client_fraction": 0.67})
    s = run(prepare(cfg), tmp_path / "r")
    cl = s["client_level"]
    assert s["privacy_unit"] == "both" and 0 < s["epsilon_spent"] <= 3.0
    assert cl["trust"] == "requires a trusted aggregator (the server adds the noise)"
    assert cl["clip"] == 0.1 and cl["delta"] == 1e-2 and "Poisson" in cl["sampling"]
    led = Ledger(tmp_path / "r" / SERVER_LEDGER)
    events = led.events(SERVER_ID)
    assert len(events) == 2 and all(e.unit == "client" and e.sample_rate == 0.67 for e in events)
    planned = bound([PoissonGaussianEvent(noise_multiplier=cl["noise_multiplier"], sample_rate=0.67, count=2,
                                          unit="client")], delta=1e-2)
    assert cl["epsilon"] == pytest.approx(planned.upper, rel=1e-9) and cl["epsilon"] <= 8.0
    assert (tmp_path / "r" / CHECKPOINT).is_file()
    code, out, err = run_cli(["budget", str(tmp_path / "r"), "--format", "json"])  # both levels, separately
    assert code == 0, err
    report = json.loads(out)
    assert report["max_epsilon"] == pytest.approx(s["epsilon_spent"])
    assert report["client_level"]["epsilon"] == pytest.approx(cl["epsilon"])
    assert report["client_level"]["remaining"] == pytest.approx(8.0 - cl["epsilon"])
