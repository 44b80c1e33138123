"""Config validation, data splits and partitions, payload framing, client write-ahead ledger, σ calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpfed import config as C
from dpfed.data import Records, split_and_partition
from dpfed.errors import ConfigError, DataError
from dpfed.payload import FRAMING_BYTES, Manifest, PayloadError, decode, encode


@pytest.mark.parametrize("section,kwargs,message", [
    ("privacy", {"epsilon": 0.0}, "epsilon must be a finite number > 0, got 0.0"),
    ("privacy", {"epsilon": float("nan")}, "epsilon must be a finite number > 0"),
    ("privacy", {"delta": 0.0}, "delta must be in (0, 1), got 0.0"),
    ("privacy", {"clip": -1.0}, "clip must be a finite number > 0, got -1.0"),
    ("model", {"rank": 0}, "rank must be an integer >= 1, got 0"),
    ("data", {"num_clients": 0}, "clients must be an integer >= 1, got 0"),
    ("data", {"partition": "zipf"}, "partition must be 'iid' or 'dirichlet', got 'zipf'"),
    ("train", {"client_fraction": 1.5}, "client_fraction must be in (0, 1], got 1.5"),
    ("init", {"strategy": "pooled-private"}, "init must be one of ['public', 'dp', 'random'], got 'pooled-private'"),
])
def test_config_rules_name_parameter_rule_and_value(section, kwargs, message):
    cls = {"privacy": C.PrivacyConfig, "model": C.ModelConfig, "data": C.DataConfig, "train": C.TrainConfig,
           "init": C.InitConfig}[section]
    with pytest.raises(ConfigError) as exc:
        cls(**kwargs)
    assert message in str(exc.value)


def test_config_is_frozen_and_round_trips_through_yaml(tmp_path):
    cfg = C.override(C.RunConfig(), **{"train.rounds": 7, "model.target_modules": ("query",)})
    with pytest.raises(Exception):
        cfg.train.rounds = 3  # type: ignore[misc]
    p = tmp_path / "c.yaml"
    p.write_text(C.to_yaml(cfg))
    assert C.load(p) == cfg


def _records(n=1000, k=2):
    return Records(tuple(f"text {i}" for i in range(n)), tuple(i % k for i in range(n)), tuple(str(i) for i in range(k)))


def test_splits_are_disjoint_seeded_and_cover_everything():
    recs = _records()
    cfg = C.DataConfig(num_clients=7, test_fraction=0.2, public_fraction=0.1)
    a = split_and_partition(recs, cfg, seed=3)
    b = split_and_partition(recs, cfg, seed=3)
    assert a == b
    parts = [set(a.test.texts), set(a.public.texts)] + [set(c.texts) for c in a.clients]
    assert sum(len(p) for p in parts) == len(recs)
    assert len(set().union(*parts)) == len(recs)  # disjoint
    assert len(a.test) == 200 and len(a.public) == 100
    assert max(len(c) for c in a.clients) - min(len(c) for c in a.clients) <= 1
    assert split_and_partition(recs, cfg, seed=4) != a


def test_dirichlet_partition_skews_labels_and_keeps_every_record():
    recs = _records(4000)
    iid = split_and_partition(recs, C.DataConfig(num_clients=5, partition="iid"), seed=0)
    skew = split_and_partition(recs, C.DataConfig(num_clients=5, partition="dirichlet", dirichlet_alpha=0.1), seed=0)
    frac = lambda s: [np.mean(c.labels) for c in s.clients]  # noqa: E731
    assert np.std(frac(skew)) > 5 * np.std(frac(iid))
    assert sum(len(c) for c in skew.clients) == sum(len(c) for c in iid.clients)


def test_empty_shard_is_rejected():
    with pytest.raises(DataError, match="client 7 must hold at least one record, got an empty shard"):
        split_and_partition(_records(10), C.DataConfig(num_clients=10, test_fraction=0.3, public_fraction=0.0), seed=0)


def test_payload_is_r2_floats_plus_fixed_framing_and_rejects_bad_messages():
    state = {"l1.R": torch.randn(4, 4), "l2.R": torch.randn(4, 4), "head.weight": torch.randn(2, 8), "head.bias": torch.randn(2)}
    man = Manifest.of(state)
    msg = encode(state, man, round=3)
    assert len(msg) == 4 * (16 + 16 + 16 + 2) + FRAMING_BYTES
    back = decode(msg, man, expect_round=3)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(PayloadError, match="round must be 4"):
        decode(msg, man, expect_round=4)
    with pytest.raises(PayloadError, match="carry"):
        decode(msg[:-4], man)
    bad = dict(state, **{"l1.R": torch.full((4, 4), float("nan"))})
    with pytest.raises(PayloadError, match="finite"):
        decode(encode(bad, man, round=3), man)
    other = Manifest.of({**state, "l1.R": torch.randn(5, 5)})
    with pytest.raises(PayloadError, match="manifest"):
        decode(msg, other)


def test_client_appends_events_before_releasing_the_payload(tmp_path):
    """The ledger already holds the round's event when fit() returns; a failing ledger blocks release."""
    from transformers import BertConfig

    from accounting.ledger import Ledger
    from dpfed.adapters.init import init_random
    from dpfed.client import Client, LocalTraining
    from dpfed.data import TokenizedShard
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import DEFAULT_TARGETS, build_from_config, select_targets
    from dpfed.privacy import DPSGDParams, make_generator

    torch.manual_seed(0)
    model = build_from_config(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16), task="classification")
    ad = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["bert"]), rank=2)
    init_random(ad, generator=make_generator(0))
    g = make_generator(1)
    shard = TokenizedShard([torch.randint(4, 30, (6,), generator=g).tolist() for _ in range(40)],
                           torch.randint(0, 2, (40,), generator=g), 0)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    client = Client(client_id="c0", shard=shard, training=LocalTraining(local_steps=3, batch_size=8, lr=0.1),
                    dp=DPSGDParams(noise_multiplier=1.0, clip=1.0, expected_batch_size=8),
                    sample_generator=make_generator(2), noise_generator=make_generator(3), ledger=ledger)
    state0 = trainable_state(model)
    res = client.fit(model, state0, round=1)
    assert len(Ledger(tmp_path / "ledger.jsonl").records()) == 1
    ev = res.events[0]
    assert ev.count == 3 and math.isclose(ev.sample_rate, 8 / 40) and ev.noise_multiplier == 1.0
    assert any(not torch.equal(res.state[k], state0[k]) for k in state0)

    class Broken:
        def append(self, **kw):
            raise OSError("disk full")

        def events(self, client):
            return []

    client.ledger = Broken()
    with pytest.raises(OSError):
        client.fit(model, state0, round=2)  # no payload without a recorded event


def test_sigma_calibration_hits_epsilon_within_prv_error():
    from accounting.events import PoissonGaussianEvent
    from accounting.prv import epsilon
    from dpfed.runner import calibrate

    cfg = C.override(C.RunConfig(), **{"train.rounds": 3, "train.local_steps": 4, "train.batch_size": 64,
                                        "privacy.epsilon": 2.0, "privacy.delta": 1e-5})
    sizes = [500, 800, 1000]
    sigma = calibrate(cfg, sizes)
    worst = max(epsilon([PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=64 / n, count=12)], delta=1e-5).upper
                for n in sizes)
    assert worst <= 2.0
    lower_sigma = sigma * 0.99
    eps_lower = epsilon([PoissonGaussianEvent(noise_multiplier=lower_sigma, sample_rate=64 / 500, count=12)], delta=1e-5)
    assert eps_lower.upper > 2.0 - 1e-9  # σ is (nearly) the smallest that fits: 1% less noise overshoots
    # an independent accountant agrees that the bound is an upper bound (RDP is looser, never tighter by more than the PRV error)
    from accounting.rdp import epsilon as rdp_epsilon

    ev = [PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=64 / 500, count=12)]
    b = epsilon(ev, delta=1e-5)
    assert rdp_epsilon(ev, delta=1e-5) >= b.lower
