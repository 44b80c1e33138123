"""White-box (gradient) canaries: the draw, the DP step that carries them, and the planted leak they must catch."""

from __future__ import annotations

import json
import math
import stat

import numpy as np
import pytest

from attacks.plan import audit_plan
import torch

from attacks.canaries import GradientCanarySet, load_canaries, make_gradient_canaries, save_canaries
from dpfed.errors import ConfigError, DataError, PrivacyCheckError
from dpfed.privacy import FixedGradientRecords

SHAPES = {"b.R": 16, "a.R": 9, "head.weight": 20, "head.bias": 2}


def test_draw_is_seeded_distinct_in_range_and_balanced():
    c = make_gradient_canaries(m=40, shapes=SHAPES, num_clients=3, seed=5)
    assert c == make_gradient_canaries(m=40, shapes=SHAPES, num_clients=3, seed=5)
    assert c != make_gradient_canaries(m=40, shapes=SHAPES, num_clients=3, seed=6)
    assert len(set(zip(c.names, c.indices))) == 40
    assert all(0 <= j < SHAPES[n] for n, j in zip(c.names, c.indices))
    assert set(c.signs) == {-1, 1} and c.clients == tuple(i % 3 for i in range(40))
    # every coordinate can be drawn: all 47 of them when m = d
    full = make_gradient_canaries(m=47, shapes=SHAPES, num_clients=1, seed=0)
    assert sorted(zip(full.names, full.indices)) == sorted((n, j) for n, s in SHAPES.items() for j in range(s))
    bits = np.concatenate([make_gradient_canaries(m=47, shapes=SHAPES, num_clients=1, seed=s).included_mask()
                           for s in range(40)])
    assert abs(bits.mean() - 0.5) < 0.05  # 1,880 Bernoulli(1/2) draws: 4.3 standard deviations


def test_draw_rejects_more_canaries_than_coordinates():
    with pytest.raises(ConfigError, match=r"canaries must be <= the number of trainable coordinates \(47\) .* got 48"):
        make_gradient_canaries(m=48, shapes=SHAPES, num_clients=1, seed=0)


def test_fixed_records_hold_exactly_a_clients_included_canaries():
    c = make_gradient_canaries(m=30, shapes=SHAPES, num_clients=2, seed=1)
    for client in (0, 1):
        rec = c.fixed_records(client, clip=0.5)
        rows = [i for i in range(30) if c.included[i] and c.clients[i] == client]
        assert len(rec) == len(rows)
        assert rec.names == tuple(c.names[i] for i in rows) and rec.indices == tuple(c.indices[i] for i in rows)
        assert rec.values == tuple(0.5 * c.signs[i] for i in rows)


def test_scores_read_the_coordinate_moved_along_the_canary():
    c = GradientCanarySet(names=("w", "w", "v"), indices=(0, 3, 1), signs=(1, -1, 1), included=(True, False, True),
                          clients=(0, 0, 0), num_clients=1)
    init = {"w": torch.zeros(2, 2), "v": torch.zeros(3)}
    final = {"w": torch.tensor([[-0.5, 0.0], [0.0, 0.25]]), "v": torch.tensor([0.0, 2.0, 0.0])}
    # SGD moves a canary's coordinate by -lr * sign * C / b: the first moved along (+0.5), the second against
    assert c.movement(init, final).tolist() == [0.5, 0.25, -2.0]
    with pytest.raises(DataError, match="names parameter 'v'"):
        c.scores({"w": init["w"]}, {"w": final["w"]})


def test_drift_residuals_take_out_a_rank_one_drift_and_keep_the_canaries():
    """A strong rank-one drift hides the canaries from the raw movement, not from the residual score."""
    from attacks import metrics as mt

    g = torch.Generator().manual_seed(0)
    shape = (24, 24)
    c = make_gradient_canaries(m=200, shapes={"W": 576, "b": 24}, num_clients=1, seed=2)
    drift = 3.0 * torch.outer(torch.randn(24, generator=g), torch.randn(24, generator=g))
    delta = {"W": drift.clone(), "b": torch.randn(24, generator=g)}
    for name, j, sgn, inc in zip(c.names, c.indices, c.signs, c.included):
        if inc:
            delta[name].view(-1)[j] -= 0.3 * sgn  # SGD steps against the canary's gradient
    init = {"W": torch.zeros(shape), "b": torch.zeros(24)}
    final = {k: init[k] + delta[k] for k in init}
    bits = c.included_mask()
    assert mt.auc(c.movement(init, final), bits) < 0.7
    assert mt.auc(c.scores(init, final), bits) > 0.95
    # the residual is in robust units per tensor, and needs both states of every named tensor
    from attacks.canaries import drift_residuals

    res = drift_residuals(init, final)
    assert float(res["W"].abs().median()) == pytest.approx(1.0) and float(res["b"].abs().median()) == pytest.approx(1.0)
    assert torch.equal(res["b"], delta["b"].double() / delta["b"].double().abs().median())  # vectors: rescaled only


def test_canaries_file_round_trip_is_private(tmp_path):
    c = make_gradient_canaries(m=20, shapes=SHAPES, num_clients=2, seed=3)
    save_canaries(tmp_path / "canaries.json", c)
    assert stat.S_IMODE((tmp_path / "canaries.json").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "canaries.json").read_text())["kind"] == "gradient"
    back = load_canaries(tmp_path / "canaries.json")
    assert back == c and back.fingerprint() == c.fingerprint()
    d = json.loads((tmp_path / "canaries.json").read_text())
    d["canaries"][0]["coordinate"] = d["canaries"][1]["coordinate"]
    d["canaries"][0]["param"] = d["canaries"][1]["param"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="distinct"):
        load_canaries(tmp_path / "bad.json")


def test_fixed_gradient_records_validate():
    r = FixedGradientRecords(names=("w",), indices=(3,), values=(2.0,))
    g = r.per_sample([0, 0], {"w": torch.Size([2, 2]), "v": torch.Size([3])})
    assert g["w"].shape == (2, 2, 2) and g["w"][:, 1, 1].tolist() == [2.0, 2.0] and g["w"].abs().sum() == 4.0
    assert g["v"].abs().sum() == 0
    with pytest.raises(PrivacyCheckError, match="not a trainable parameter"):
        FixedGradientRecords(names=("x",), indices=(0,), values=(1.0,)).per_sample([0], {"w": torch.Size([2])})
    with pytest.raises(PrivacyCheckError, match="outside 'w'"):
        FixedGradientRecords(names=("w",), indices=(9,), values=(1.0,)).per_sample([0], {"w": torch.Size([2])})
    with pytest.raises(ConfigError, match="finite"):
        FixedGradientRecords(names=("w",), indices=(0,), values=(math.inf,))


def test_summed_equals_clipped_sum_of_the_per_sample_gradients():
    from dpfed.privacy import clipped_sum

    r = FixedGradientRecords(names=("w", "v", "w"), indices=(3, 0, 1), values=(2.0, -0.3, -5.0))
    shapes = {"w": torch.Size([2, 2]), "v": torch.Size([3])}
    rows = [0, 1, 2, 0]
    ref, _ = clipped_sum(r.per_sample(rows, shapes), clip=1.0)
    got = r.summed(rows, shapes, clip=1.0)
    for n in shapes:
        torch.testing.assert_close(got[n], ref[n])
    raw = r.summed(rows, shapes, clip=None)
    torch.testing.assert_close(raw["w"], r.per_sample(rows, shapes)["w"].sum(0))


def _tiny_client_model():
    from transformers import BertConfig

    from dpfed.adapters.init import init_random
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import DEFAULT_TARGETS, build_from_config, select_targets
    from dpfed.privacy import make_generator

    torch.manual_seed(0)  # test-only: the tiny model's random weights
    model = build_from_config(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0), task="classification")
    init_random(inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["bert"]), rank=2), generator=make_generator(0))
    return model


def test_dp_step_with_canaries_equals_a_per_example_reference():
    """One noise-free DP step: Δθ = -lr/b · (Σ clipped real gradients, one by one + Σ sign·C·e_canary)."""
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.client import Client, LocalTraining
    from dpfed.data import TokenizedShard
    from dpfed.privacy import DPSGDParams, make_generator, per_example_loss, poisson_sample

    model = _tiny_client_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    g = make_generator(1)
    n_real, b, lr, clip = 40, 12, 0.3, 0.05
    shard = TokenizedShard([torch.randint(4, 30, (6,), generator=g).tolist() for _ in range(n_real)],
                           torch.randint(0, 2, (n_real,), generator=g), 0)
    shapes = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    canaries = make_gradient_canaries(m=20, shapes=shapes, num_clients=1, seed=4)
    fixed = canaries.fixed_records(0, clip=clip)
    client = Client(client_id="c0", shard=shard, training=LocalTraining(local_steps=1, batch_size=b, lr=lr),
                    dp=DPSGDParams(noise_multiplier=1.0, clip=clip, expected_batch_size=b),
                    sample_generator=make_generator(7), noise_generator=make_generator(8), noise_enabled=False,
                    fixed=fixed)
    n = n_real + len(fixed)
    assert client.num_examples == n and client.sample_rate == pytest.approx(b / n)
    assert client.round_events()[0].sample_rate == pytest.approx(b / n)
    idx = poisson_sample(n, b / n, generator=make_generator(7)).tolist()  # the sample the client will draw
    assert any(i >= n_real for i in idx) and any(i < n_real for i in idx)
    state0 = trainable_state(model)
    expected = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state0.items()}
    params = dict(model.named_parameters())
    for i in idx:
        if i < n_real:
            loss = per_example_loss(model, shard.batch([i]), task="classification")[0]
            grads = torch.autograd.grad(loss, [params[k] for k in names])
            norm = math.sqrt(sum(float(x.double().pow(2).sum()) for x in grads))
            for k, x in zip(names, grads):
                expected[k] += x.double() * min(1.0, clip / norm)
        else:
            j = i - n_real
            expected[fixed.names[j]].view(-1)[fixed.indices[j]] += fixed.values[j]  # norm C: unchanged by clipping
    res = client.fit(model, state0, round=1)
    for k in names:
        torch.testing.assert_close(res.state[k].double() - state0[k].double(), -lr / b * expected[k],
                                   atol=2e-6, rtol=1e-4)
    assert res.num_examples == n


def test_dp_init_counts_gradient_canaries_in_its_sample_rate(tiny_bert_dir, tiny_csv, tmp_path, one_thread):
    """init: dp samples each site's whole population, canaries included (their W0 gradient is zero)."""
    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 4, "max_length": 16},
        "data": {"source": tiny_csv, "text_column": "sentence", "label_column": "sentiment", "num_clients": 2,
                 "canaries": 60, "canary_kind": "gradient"},
        "init": {"strategy": "dp", "dp_batch_size": 32},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 16, "lr": 0.5},
        "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 0, "device": "cpu"})
    job = prepare(cfg, audit=audit_plan(cfg))
    summary = run(job, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "ledger.jsonl").read_text().splitlines()]
    for i, shard in enumerate(job.shards):
        cid = f"client-{i:03d}"
        n_i = len(shard) + len(job.fixed_records[i])
        assert len(job.fixed_records[i]) > 0 and summary["client_sizes"][cid] == n_i
        rates = {r["round"]: r["event"]["sample_rate"] for r in rows if r["client"] == cid}
        assert rates == {0: pytest.approx(32 / n_i), 1: pytest.approx(16 / n_i)}


def _planted_run(tiny_bert_dir, tiny_csv, out, *, plant_leak=None):
    from attacks.audit import audit_run
    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 16, "max_length": 16},
        "data": {"source": tiny_csv, "text_column": "sentence", "label_column": "sentiment", "num_clients": 2,
                 "canaries": 1000, "canary_kind": "gradient"},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 10, "local_steps": 10, "batch_size": 64, "lr": 5.0},
        "privacy": {"epsilon": 1.0, "delta": 1e-4}, "seed": 0, "device": "cpu"})
    job = prepare(cfg, audit=audit_plan(cfg))
    if plant_leak is not None:  # the planted bug: noise secretly off, the ledgers still claim epsilon = 1
        plant_leak()
    summary = run(job, out)
    assert summary["epsilon_spent"] <= 1.0
    return audit_run(out)


def test_planted_leak_noise_secretly_off_is_a_violation(tiny_bert_dir, tiny_csv, tmp_path, one_thread, noise_secretly_off):
    r = _planted_run(tiny_bert_dir, tiny_csv, tmp_path / "leak", plant_leak=noise_secretly_off)
    assert r["canaries"] == 1000 and r["epsilon_claimed"] <= 1.0
    assert r["verdict"] == "violation", (r["epsilon_lower_bound"], r["correct"], r["guesses"])
    assert r["epsilon_lower_bound"] > 1.5 and r["correct"] >= 180
    assert r["epsilon_lower_bound"] <= r["epsilon_lower_bound_ceiling"]


def test_same_run_with_its_noise_is_consistent(tiny_bert_dir, tiny_csv, tmp_path, one_thread):
    r = _planted_run(tiny_bert_dir, tiny_csv, tmp_path / "dp")
    assert r["verdict"] == "consistent" and r["epsilon_lower_bound"] <= r["epsilon_claimed"]


def test_cli_train_with_gradient_canaries_then_audit(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence",
                              "--label-column", "sentiment", "--clients", "2", "--rounds", "2", "--local-steps", "2",
                              "--batch-size", "16", "--rank", "4", "--epsilon", "3", "--delta", "1e-4", "--seed", "0",
                              "--init", "random", "--canaries", "100", "--canary-kind", "gradient", "--out", str(run),
                              "--format", "json"])
    assert code == 0, err
    summary = json.loads(out)
    canaries = load_canaries(run / "canaries.json")
    assert isinstance(canaries, GradientCanarySet) and canaries.m == 100
    # included canaries are part of the clients' populations n_i (and so of q_i = b / n_i and of delta < 1/n_i)
    from dpfed import config as cfgmod
    from dpfed.runner import prepare

    loaded = cfgmod.load(run / "config.yaml")
    job = prepare(loaded, split_seed=json.loads((run / "run.json").read_text())["split_seed"], audit=audit_plan(loaded))
    rates = {json.loads(line)["client"]: json.loads(line)["event"]["sample_rate"]
             for line in (run / "ledger.jsonl").read_text().splitlines()}
    for i, shard in enumerate(job.shards):
        cid = f"client-{i:03d}"
        n_i = len(shard) + sum(1 for inc, c in zip(canaries.included, canaries.clients) if inc and c == i)
        assert summary["client_sizes"][cid] == n_i and rates[cid] == pytest.approx(16 / n_i)
    code, out, err = run_cli(["audit", str(run), "--format", "json"])
    assert code == 0, err
    audit = json.loads(out)
    assert audit["one_run"]["canary_kind"] == "gradient" and "canary_gradient" in audit["attacks"]
    assert audit["verdict"] == "consistent" and audit["headline_attack"] == "reference"
    assert "white-box gradient (Dirac) canaries" in (run / "audit.md").read_text()
    assert "<img" in (run / "audit.html").read_text()


@pytest.mark.parametrize("over,message", [
    ({"data.canary_kind": "dirac"}, "canary_kind must be one of ['random-words', 'gradient'], got 'dirac'"),
    ({"data.canaries": 10, "train.method": "fedit"}, "data.canaries and data.canary_clients need method fed-sb"),
])
def test_config_refuses_bad_canary_kinds(over, message):
    from dpfed import config as C

    with pytest.raises(ConfigError) as exc:
        C.override(C.RunConfig(), **over)
    assert message in str(exc.value)
