"""``init: dp``: per-example base-weight gradients, the client's accounted release, the run's ledger."""

from __future__ import annotations

import json
import math

import pytest
import torch

from accounting.events import PoissonGaussianEvent
from accounting.ledger import Ledger
from accounting.prv import epsilon
from dpfed import config as cfgmod
from dpfed.adapters.init import factors_from_gradient, zero_factors
from dpfed.client import Client, LocalTraining
from dpfed.data import Records, tokenize
from dpfed.errors import ConfigError
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.model import load_base, select_targets
from dpfed.privacy import DPSGDParams, make_generator, per_example_loss, per_sample_weight_gradients
from dpfed.runner import calibrate, prepare, run


def _model(model_dir, rank=4):
    torch.manual_seed(0)  # the tiny fixture's head init only; the code under test takes explicit generators
    model = load_base(model_dir, task="classification", num_labels=2)
    names = select_targets(model, ("query", "value", "intermediate.dense"), None)
    adapters = inject_lorasb(model, names, rank=rank)
    with torch.no_grad():
        model.head.weight.normal_(0, 0.5)
    return model.eval(), adapters


def _shard(model_dir, n=12):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [f"record {i} is {'good' if i % 2 else 'bad'} and {'very ' * (i % 4)}long" for i in range(n)]
    recs = Records(texts=tuple(texts), labels=tuple(i % 2 for i in range(n)), label_names=("neg", "pos"))
    return tokenize(recs, tok, max_length=24)


def test_per_sample_weight_gradients_match_a_per_example_loop(tiny_bert_dir):
    model, adapters = _model(tiny_bert_dir)
    zero_factors(adapters)
    shard = _shard(tiny_bert_dir, n=5)
    batch = shard.batch(range(5), "cpu")
    grads = per_sample_weight_gradients(model, adapters, batch, task="classification")
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated anywhere
    for b in range(5):
        one = shard.batch([b], "cpu")
        ws = [layer.base.weight for layer in adapters.values()]
        for w in ws:
            w.requires_grad_(True)
        ref = torch.autograd.grad(per_example_loss(model, one, task="classification").sum(), ws)
        for w in ws:
            w.requires_grad_(False)
        for (name, g), r in zip(grads.items(), ref):
            assert g.shape[1:] == r.shape
            torch.testing.assert_close(g[b], r, rtol=1e-4, atol=1e-6, msg=f"{name} example {b}")


def _client(shard, tmp_path, budget=None):
    return Client(client_id="client-000", shard=shard, training=LocalTraining(local_steps=1, batch_size=4, lr=0.1),
                  dp=None, sample_generator=make_generator(1), noise_generator=None,
                  ledger=Ledger(tmp_path / "ledger.jsonl"), budget=budget)


def test_contribution_is_in_the_ledger_and_has_the_right_noise_scale(tiny_bert_dir, tmp_path):
    model, adapters = _model(tiny_bert_dir)
    zero_factors(adapters)
    shard = _shard(tiny_bert_dir)
    client = _client(shard, tmp_path)
    # C tiny: every example is clipped to norm 1e-6, so the release is (almost) pure noise of std σC/b
    params = DPSGDParams(noise_multiplier=2.0, clip=1e-6, expected_batch_size=6)
    out = client.init_contribution(model, adapters, params=params, sample_generator=make_generator(2),
                                   noise_generator=make_generator(3))
    flat = torch.cat([v.flatten() for v in out.values()])
    expected = 2.0 * 1e-6 / 6
    assert flat.numel() > 5000
    assert abs(flat.std().item() / expected - 1) < 0.05
    assert abs(flat.mean().item()) < 5 * expected / math.sqrt(flat.numel())
    led = Ledger(tmp_path / "ledger.jsonl")
    assert led.events("client-000") == [PoissonGaussianEvent(noise_multiplier=2.0, sample_rate=0.5, count=1)]
    assert led.rounds_completed("client-000") == {0}


def test_contribution_carries_the_signal_when_noise_is_small(tiny_bert_dir, tmp_path):
    """With σ small relative to the clipped signal, the release is the clipped per-example gradient sum / b."""
    model, adapters = _model(tiny_bert_dir)
    zero_factors(adapters)
    shard = _shard(tiny_bert_dir, n=8)
    client = _client(shard, tmp_path)
    params = DPSGDParams(noise_multiplier=1e-9, clip=1e3, expected_batch_size=8)  # q = 1, no clipping, noise std 1e-6
    out = client.init_contribution(model, adapters, params=params, sample_generator=make_generator(2),
                                   noise_generator=make_generator(3))
    ws = [layer.base.weight for layer in adapters.values()]
    for w in ws:
        w.requires_grad_(True)
    ref = torch.autograd.grad(per_example_loss(model, shard.batch(range(8), "cpu"), task="classification").sum(), ws)
    for w in ws:
        w.requires_grad_(False)
    for (name, v), r in zip(out.items(), ref):
        torch.testing.assert_close(v, r / 8, rtol=1e-3, atol=1e-5, msg=name)


def test_contribution_refused_when_the_init_alone_exceeds_the_budget(tiny_bert_dir, tmp_path):
    from dpfed.client import Budget
    from dpfed.errors import BudgetError

    model, adapters = _model(tiny_bert_dir)
    client = _client(_shard(tiny_bert_dir), tmp_path, budget=Budget(0.1, 1e-5))
    with pytest.raises(BudgetError, match="client-000 would reach epsilon .* > budget 0.1"):
        client.init_contribution(model, adapters, params=DPSGDParams(noise_multiplier=0.5, clip=1.0, expected_batch_size=6),
                                 sample_generator=make_generator(2), noise_generator=make_generator(3))
    assert len(Ledger(tmp_path / "ledger.jsonl")) == 0  # nothing released, nothing recorded


def test_factors_from_gradient_are_the_truncated_svd_of_the_sign_step():
    from dpfed.adapters.lorasb import LoRASBLinear

    g = torch.Generator().manual_seed(0)
    layer = LoRASBLinear(torch.nn.Linear(20, 12), rank=3)
    grad = torch.randn(12, 20, generator=g)
    factors_from_gradient({"l": layer}, {"l": grad}, lr=0.1, generator=make_generator(5))
    delta = -0.1 * torch.sign(grad)
    U, S, Vh = torch.linalg.svd(delta)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    torch.testing.assert_close(layer.delta_weight(), best, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(layer.B.T @ layer.B, torch.eye(3), atol=1e-5, rtol=0)


def _cfg(model_dir, data, **over):
    raw = {
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3},
        "init": {"strategy": "dp", "head": "random", "dp_noise_multiplier": 3.0, "dp_batch_size": 16},
        "train": {"rounds": 2, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128},
        "privacy": {"epsilon": 3.0, "delta": 1e-4},
        "seed": 0, "device": "cpu",
    }
    for k, v in over.items():
        sec, key = k.split(".")
        raw[sec][key] = v
    return cfgmod.from_dict(raw)


def test_dp_init_run_accounts_the_init_in_every_ledger(tiny_bert_dir, tiny_csv, tmp_path):
    cfg = _cfg(tiny_bert_dir, tiny_csv)
    job = prepare(cfg)
    sizes = [len(s) for s in job.shards]
    sigma_plain = calibrate(cfgmod.override(cfg, **{"init.strategy": "random"}), sizes)
    assert job.noise_multiplier >= sigma_plain  # the init's cost is planned into the same budget
    s = run(job, tmp_path / "run")
    led = Ledger(tmp_path / "run" / "ledger.jsonl")
    assert sorted(led.clients()) == ["client-000", "client-001", "client-002"]
    for cid, n in zip(sorted(led.clients()), sizes):
        evs = led.events(cid)
        init_ev = PoissonGaussianEvent(noise_multiplier=3.0, sample_rate=16 / n, count=1)
        assert evs[0] == init_ev and led.rounds_completed(cid) == {0, 1, 2}
        train = [PoissonGaussianEvent(noise_multiplier=job.noise_multiplier, sample_rate=16 / n, count=2)] * 2
        assert evs[1:] == train
        eps = epsilon([init_ev] + train, delta=1e-4).upper
        assert math.isclose(s["epsilon_per_client"][cid], eps) and eps <= 3.0
        assert eps > epsilon(train, delta=1e-4).upper  # the init is not free
    info = json.loads((tmp_path / "run" / "run.json").read_text())["init_info"]
    assert info["dp_init_contributors"] == 3 and info["dp_init_noise_multiplier"] == 3.0
    assert 0 < info["dp_init_epsilon_alone"] < 3.0
    for layer in job.adapters.values():  # B, A from the SVD: orthonormal, not zero
        torch.testing.assert_close(layer.B.T @ layer.B, torch.eye(4), atol=1e-4, rtol=0)
        torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(4), atol=1e-4, rtol=0)


def test_dp_init_is_refused_without_record_level_dp(tiny_bert_dir, tiny_csv):
    with pytest.raises(ConfigError, match="init 'dp' needs record-level DP"):
        _cfg(tiny_bert_dir, tiny_csv, **{"privacy.enabled": False})


def test_dp_init_that_spends_the_whole_budget_is_refused(tiny_bert_dir, tiny_csv):
    cfg = _cfg(tiny_bert_dir, tiny_csv, **{"init.dp_noise_multiplier": 0.3, "init.dp_batch_size": 60})
    with pytest.raises(ConfigError, match="init.dp_noise_multiplier must leave budget for training"):
        prepare(cfg)
