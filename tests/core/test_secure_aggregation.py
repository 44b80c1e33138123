"""Distributed DP with secure aggregation (issue 16), in process: ``privacy.aggregation: secure``.

One round is one DP-SGD step over every participating site (FedSGD): each site clips its
records' gradients, encodes each record on the integer grid, adds its Skellam share and hands
only its message to the (simulated) secure aggregation; the server sees the sum. Tiny BERT
fixtures, a few seconds each.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from accounting.events import PoissonSkellamEvent, event_from_dict, event_to_dict
from accounting.ledger import Ledger, MemoryLedger
from accounting.prv import epsilon as prv_epsilon
from accounting.skellam import epsilon as skellam_epsilon, from_event
from dpfed import config as cfgmod
from dpfed import secure_encoding as se
from dpfed.adapters.lorasb import load_trainable_state, trainable_state
from dpfed.errors import ConfigError
from dpfed.payload import FRAMING_BYTES
from dpfed.privacy import clip_factors, per_example_loss, poisson_sample
from dpfed.release import Basis, declared
from dpfed.seeds import site_generators

SEED = 5


def _cfg(model_dir: str, source: str, **privacy) -> cfgmod.RunConfig:
    return cfgmod.from_dict({
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": source, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                 "public_fraction": 0.0},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 3, "local_steps": 1, "batch_size": 16, "eval_batch_size": 128, "lr": 0.5},
        "privacy": {"epsilon": 3.0, "delta": 1e-4, "aggregation": "secure", **privacy}, "seed": SEED, "device": "cpu",
    })


@pytest.fixture(scope="module")
def job(tiny_bert_dir, tiny_csv):
    from dpfed.runner import prepare

    return prepare(_cfg(tiny_bert_dir, tiny_csv))


def _sites(job, ledger, **kw):
    from dpfed.session import InProcessSites

    return InProcessSites(job, ledger=ledger, seed=job.seed, diagnostics_dir=None, **kw)


# -- the event ------------------------------------------------------------------------------------
def test_the_skellam_event_round_trips_and_prv_dispatches_it_to_the_skellam_rdp_bound():
    ev = PoissonSkellamEvent(mu=2.0e5, l2_sensitivity=300.0, l1_sensitivity=9000.0, sample_rate=0.1, count=3)
    assert event_from_dict(json.loads(json.dumps(event_to_dict(ev)))) == ev
    got = prv_epsilon([ev], delta=1e-5)
    assert got.upper == pytest.approx(skellam_epsilon([from_event(ev)], delta=1e-5), rel=1e-12)
    with pytest.raises(ValueError, match="l1_sensitivity"):
        PoissonSkellamEvent(mu=1.0, l2_sensitivity=3.0, l1_sensitivity=2.0, sample_rate=0.1, count=1)


def test_mixed_gaussian_and_skellam_events_compose_by_adding_rdp():
    """A DP initialisation (Gaussian) and secure rounds (Skellam) in one ledger: RDP curves add; never below either."""
    import numpy as np

    from accounting import rdp, skellam
    from accounting.events import PoissonGaussianEvent

    sk = PoissonSkellamEvent(mu=1.0e5, l2_sensitivity=258.0, l1_sensitivity=11000.0, sample_rate=0.13, count=8)
    ga = PoissonGaussianEvent(noise_multiplier=2.0, sample_rate=0.26, count=1)
    both = prv_epsilon([ga, sk], delta=1e-5).upper
    assert both > max(prv_epsilon([sk], delta=1e-5).upper, rdp.epsilon([ga], delta=1e-5)) - 1e-12
    curve = skellam.rdp_curve([from_event(sk)]) + rdp.rdp_curve([ga], orders=skellam.ORDERS)
    want, _ = rdp.epsilon_from_rdp(orders=skellam.ORDERS, rdp=curve, delta=1e-5)
    assert both == pytest.approx(want, rel=1e-12) and np.isfinite(both)
    with pytest.raises(ValueError, match="no Gaussian equivalent"):
        rdp.epsilon([sk], delta=1e-5)  # the Gaussian-only accountants refuse it rather than under-count


# -- a real round -----------------------------------------------------------------------------------
def test_decoded_sum_is_exactly_the_sites_integer_sums_plus_their_noise(job, monkeypatch):
    """Inside a real round: secure_sum = Σ (encoded clipped sum + Skellam share), as integers, without wrap-around."""
    import dpfed.client

    seen = []
    real = dpfed.client.site_message

    def spy(int_sum, noise, *, encoding):
        seen.append((int_sum.clone(), noise.clone()))
        return real(int_sum, noise, encoding=encoding)

    monkeypatch.setattr(dpfed.client, "site_message", spy)
    enc = job.secure
    summed = _sites(job, MemoryLedger()).secure_round(1, [0, 1, 2], trainable_state(job.model), lambda *a: None)
    assert len(seen) == 3 and summed.sites == ("client-000", "client-001", "client-002") and summed.discarded is None
    exact = sum(i + n for i, n in seen)  # int64, no modulus
    assert torch.equal(se.centered(summed.total, bits=enc.bits), exact)
    assert int(exact.abs().max()) <= enc.margin().signal + enc.margin().noise < 2 ** (enc.bits - 1)
    assert all(bool(n.abs().sum() > 0) for _, n in seen)  # every site added its share
    decoded = se.decode(summed.total, encoding=enc)
    want = se.unrotate(exact.to(torch.float64) / enc.scale, signs=se.rotation_signs(enc.padded_dim, seed=enc.rotation_seed))
    assert torch.allclose(decoded, want[: enc.dim], atol=1e-12, rtol=0)


def test_the_summed_noise_has_the_calibrated_variance_and_the_calibration_meets_epsilon(job):
    enc = job.secure
    cfg = job.cfg
    sens = enc.sensitivity
    gens = [torch.Generator().manual_seed(100 + i) for i in range(enc.min_sites)]
    draws = torch.stack([sum(se.noise_share(encoding=enc, generator=g) for g in gens) for _ in range(40)])
    var = draws.to(torch.float64).var().item()  # 40 × padded_dim samples of Sk(mu_total)
    assert var == pytest.approx(enc.mu_total, rel=0.05)
    assert enc.noise_std(enc.min_sites) == pytest.approx(math.sqrt(enc.mu_total) / enc.scale)
    q_max = max(c for c in (min(1.0, cfg.train.batch_size / n) for n in job.population_sizes()))
    ev = PoissonSkellamEvent(mu=enc.mu_total, l2_sensitivity=sens.l2, l1_sensitivity=sens.l1, sample_rate=q_max,
                             count=cfg.train.rounds)
    assert prv_epsilon([ev], delta=cfg.privacy.delta).upper <= cfg.privacy.epsilon
    less = dataclasses.replace(ev, mu=enc.mu_total / 1.01)
    assert prv_epsilon([less], delta=cfg.privacy.delta).upper > cfg.privacy.epsilon  # calibrated, not wasteful


def test_a_secure_round_is_one_fedsgd_step_computed_by_hand(tiny_bert_dir, tiny_csv):
    """Noise off (the noise-free twin): the new state is global − lr · Σ clip(g) / (b · K), up to the integer grid."""
    from dpfed.runner import prepare
    from dpfed.session import secure_step

    job = prepare(_cfg(tiny_bert_dir, tiny_csv), noise_enabled=False)
    enc, cfg, model = job.secure, job.cfg, job.model
    start = trainable_state(model)
    sites = _sites(job, MemoryLedger())
    summed = sites.secure_round(1, [0, 1, 2], start, lambda *a: None)
    new = secure_step(job, summed, start)
    # the slow twin: the same Poisson samples, one backward pass per record, joint clipping, a float sum
    total = torch.zeros(enc.dim, dtype=torch.float64)
    records = 0
    names = sorted(start)
    for i, client in enumerate(sites.clients):
        sample_gen, _ = site_generators(job.seed, i, 1, history=0)
        for j in poisson_sample(client.num_examples, client.sample_rate, generator=sample_gen).tolist():
            load_trainable_state(model, start)
            model.zero_grad(set_to_none=True)
            per_example_loss(model, client.shard.batch([j], job.device), task="classification").sum().backward()
            params = dict(model.named_parameters())
            g = torch.cat([params[n].grad.reshape(-1).to(torch.float64) for n in names])
            total += g * clip_factors(g.norm().reshape(1), clip=cfg.privacy.clip)
            records += 1
    assert records > 0
    decoded = se.decode(summed.total, encoding=enc)
    # each record's rounding error has independent coordinates in (-1, 1), mean 0, variance <= 1/4 (integer units)
    grid = 3 * math.sqrt(records * enc.padded_dim / 4) / enc.scale
    assert float((decoded - total).norm()) <= grid
    assert float(torch.nn.functional.cosine_similarity(decoded, total, dim=0)) > 0.99
    # the server's step: divided by the expected total batch b · K (not the realised sample), SGD with train.lr
    expected = cfg.train.batch_size * 3
    hand = {n: start[n].double() - v for n, v in
            se.unflatten(total * cfg.train.lr / expected, {n: v.shape for n, v in start.items()}).items()}
    diff = torch.cat([(new[n].double() - hand[n]).reshape(-1) for n in names]).norm()
    assert float(diff) <= cfg.train.lr * grid / expected + 1e-5


# -- dropouts, summary, ledger -------------------------------------------------------------------------
def _dropping_run(model_dir, source, out, **train):
    """3 rounds with min_sites 2; in round 2 two of the three sites drop out before training. ``train``:
    more ``train_rounds`` arguments (``keep_rounds``, ``stop_after``). Returns (job, train_rounds' result, ledger)."""
    from dpfed.runner import prepare
    from dpfed.session import start, train_rounds

    job = prepare(_cfg(model_dir, source, min_sites=2))
    ledger = Ledger(out / "ledger.jsonl")
    state, eval0, init_info = start(job, out, ledger=ledger, server_ledger=None, progress=lambda *a: None)
    sites = _sites(job, ledger, dropout=lambda rnd, site: rnd == 2 and site != "client-000")
    result = train_rounds(job, out, transport=sites, ledger=ledger, server_ledger=None, global_state=state,
                          start_round=1, seed=job.seed, eval0=eval0, init_info=init_info, progress=lambda *a: None,
                          resumed=None, **train)
    return job, result, ledger


@pytest.fixture(scope="module")
def dropped_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("secure-run")
    job, summary, ledger = _dropping_run(tiny_bert_dir, tiny_csv, out, keep_rounds=True)
    return job, out, summary, ledger


def test_a_round_with_fewer_than_min_sites_is_discarded_and_the_senders_still_spend(dropped_run):
    from safetensors.torch import load_file

    job, out, summary, ledger = dropped_run
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["secure_sites"] for x in lines] == [3, 1, 3]
    assert lines[1]["round_discarded"].startswith("1 site message(s), fewer than min_sites=2")
    assert lines[0]["round_discarded"] is None and lines[2]["round_discarded"] is None
    assert summary["rounds_discarded"] == [2] and summary["rounds_completed"] == 3
    r1, r2, r3 = (load_file(out / "rounds" / f"round-00{k}.safetensors") for k in (1, 2, 3))
    assert all(torch.equal(r1[n], r2[n]) for n in r1)  # the discarded round released nothing
    assert any(not torch.equal(r2[n], r3[n]) for n in r2)
    # the site whose message left spent the round; the sites that dropped out before sending did not
    rounds = {s: [r.round for r in ledger.records() if r.client == s] for s in ("client-000", "client-001")}
    assert rounds == {"client-000": [1, 2, 3], "client-001": [1, 3]}
    assert all(isinstance(r.event, PoissonSkellamEvent) and r.event.mu == job.secure.mu_total for r in ledger.records())


def test_the_summary_carries_both_epsilons_within_the_target(dropped_run):
    from dpfed.rundir_check import verify_run_ledgers
    from dpfed.session import colluding_server_epsilon

    job, out, summary, ledger = dropped_run
    eps, coll = summary["epsilon_spent"], summary["epsilon_colluding_server"]
    assert 0 < eps <= job.cfg.privacy.epsilon < coll
    assert coll == pytest.approx(max(colluding_server_epsilon(ledger.events(s), min_sites=2, delta=1e-4)
                                     for s in ledger.clients()))
    sa = summary["secure_aggregation"]
    assert sa["min_sites"] == 2 and sa["mu_site"] == pytest.approx(sa["mu_total"] / 2)
    assert summary["bytes_up_per_client_round"] == sa["message_bytes"] == 4 * sa["padded_dim"] + FRAMING_BYTES
    assert summary["accountant"].startswith("rdp")
    for name in ("secure_aggregation", "epsilon_colluding_server", "rounds_discarded"):
        assert declared("summary", name).basis in (Basis.PUBLIC, Basis.POST)
    checks = verify_run_ledgers(out).checks  # the ledger check knows the Skellam event and its μ
    assert any("Skellam" in c for c in checks)


def test_a_resumed_secure_run_equals_the_uninterrupted_one(dropped_run, tiny_bert_dir, tiny_csv, tmp_path):
    """The dropped run stopped after its discarded round 2, then ``dpfed train --resume``: the recorded encoding
    (μ, bits, rotation seed) comes back, round 3 equals the uninterrupted run's, the discarded round is still listed."""
    from safetensors.torch import load_file

    from dpfed.runner import load_checkpoint, resume

    _, full, full_summary, full_ledger = dropped_run
    out = tmp_path / "run"
    _, paused, _ = _dropping_run(tiny_bert_dir, tiny_csv, out, stop_after=2)
    assert paused == {"paused_after_round": 2} and not (out / "summary.json").exists()
    summary = resume(out)
    assert summary["rounds_completed"] == 3 and summary["resumed"]["from_round"] == 2
    assert summary["rounds_discarded"] == [2] == full_summary["rounds_discarded"]
    assert summary["secure_aggregation"] == full_summary["secure_aggregation"]
    want = load_file(full / "rounds" / "round-003.safetensors")
    got = load_checkpoint(out)[1]
    assert all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want)
    assert [(r.client, r.round, r.event) for r in Ledger(out / "ledger.jsonl").records()] == \
        [(r.client, r.round, r.event) for r in full_ledger.records()]
    assert summary["epsilon_per_client"] == pytest.approx(full_summary["epsilon_per_client"], rel=1e-12)
    assert summary["epsilon_colluding_server"] == pytest.approx(full_summary["epsilon_colluding_server"], rel=1e-12)


def test_resume_restores_the_recorded_encoding_of_an_os_entropy_seed_run(tiny_bert_dir, tiny_csv, tmp_path):
    """Without a user seed the rotation seed is drawn anew by every prepare(): resume must take run.json's."""
    from dpfed.runner import prepare
    from dpfed.session import reopen, start

    cfg = cfgmod.RunConfig(**{f: getattr(_cfg(tiny_bert_dir, tiny_csv), f)
                              for f in ("model", "data", "init", "train", "privacy", "device")})  # seed None
    job = prepare(cfg)
    out = tmp_path / "run"
    start(job, out, ledger=Ledger(out / "ledger.jsonl"), server_ledger=None, progress=lambda *a: None)
    again = reopen(out, progress=lambda *a: None)
    assert again.job.secure == job.secure and again.first == 1
    assert prepare(cfg).secure.rotation_seed != job.secure.rotation_seed  # what a rebuilt encoding would get


def test_the_ledger_check_refuses_a_skellam_event_with_another_mu(dropped_run, tmp_path):
    import shutil

    from dpfed.errors import DpfedError
    from dpfed.rundir_check import verify_run_ledgers

    _, out, _, _ = dropped_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    info = json.loads((copy / "summary.json").read_text())
    info["secure_aggregation"]["mu_total"] *= 2
    (copy / "summary.json").write_text(json.dumps(info))
    with pytest.raises(DpfedError, match="mu_total"):
        verify_run_ledgers(copy)


# -- the release boundary -------------------------------------------------------------------------------
def test_the_server_gets_only_the_sum(job):
    """Structural: the transport's secure round hands the server a SecureSum (the modular sum, who sent), no message."""
    from dpfed.session import SecureSum

    summed = _sites(job, MemoryLedger()).secure_round(1, [0, 1, 2], trainable_state(job.model), lambda *a: None)
    assert type(summed) is SecureSum
    assert {f.name for f in dataclasses.fields(summed)} == {"round", "total", "sites", "discarded"}
    assert summed.total.shape == (job.secure.padded_dim,) and summed.total.dtype == torch.int64


def test_a_secure_run_releases_nothing_that_distinguishes_neighbours(tiny_bert_dir, tiny_csv, tmp_path):
    """The side-channel rule of tests/core/test_side_channel.py under aggregation secure: two datasets that differ in
    one training record (an outlier with its label flipped), same seed: every public field is byte-identical."""
    from test_side_channel import OUTLIER, _check_fields, _metrics, _rows, _run, _swap, _write

    from dpfed.runner import prepare

    rows = _rows(tiny_csv)
    probe = prepare(_cfg(tiny_bert_dir, tiny_csv))
    held = set(probe.splits.test.texts) | set(probe.splits.public.texts)
    k = next(i for i, r in enumerate(rows) if i > 0 and r[0] not in held and sum(x[0] == r[0] for x in rows) == 1)
    changed = [list(r) for r in rows]
    changed[k] = [OUTLIER, "neg" if rows[k][1] == "pos" else "pos"]
    base, other = _write(tmp_path / "base.csv", rows), _write(tmp_path / "other.csv", changed)
    data = tmp_path / "data.csv"
    a = _run(_cfg(tiny_bert_dir, _swap(data, base)), tmp_path / "a")
    b = _run(_cfg(tiny_bert_dir, _swap(data, other)), tmp_path / "b")
    problems = []
    for la, lb in zip(_metrics(a), _metrics(b)):
        problems += _check_fields("metrics", la, lb, "record", f"metrics.jsonl round {la['round']}")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    problems += _check_fields("summary", sa, sb, "record", "summary.json")
    assert sa["eval_loss"] != sb["eval_loss"]  # the noised state did see the outlier
    assert not problems, "\n".join(problems)


# -- configuration refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--local-steps", "2"], "error: train.local_steps must be 1 with privacy.aggregation 'secure' (one DP-SGD step "
                             "over all sites per round; several local steps per round are not compatible with this "
                             "analysis), got 2"),
    (["--local-steps", "1", "--privacy-unit", "both", "--client-epsilon", "3"],
     "error: privacy.aggregation 'secure' protects records (record-level DP against everyone who sees only the sum): "
     "it needs privacy.unit 'record', got 'both'"),
    (["--local-steps", "1", "--method", "fedit"],
     "error: privacy.aggregation 'secure' sums one gradient of R and the head per site, which only Fed-SB's shared "
     "B, A make exact: it needs train.method 'fed-sb', got 'fedit'"),
    (["--local-steps", "1", "--secure-min-sites", "11"], "error: privacy.min_sites must be <= the sites chosen per round (10), "
                                                  "got 11"),
])
def test_secure_refusals_are_one_line_exit_2(argv, message, run_cli, tmp_path):
    code, _, err = run_cli(["train", "--aggregation", "secure", *argv, "--out", str(tmp_path / "o")])
    assert code == 2 and err.strip() == message
    assert not (tmp_path / "o" / "config.yaml").exists()


def test_flower_runs_secure_aggregation_with_two_or_more_sites_per_round(tiny_bert_dir, tiny_csv):
    """SecAgg+ sums two or more sites: a Flower run with one site per round is refused with one line."""
    pytest.importorskip("flwr")
    from dpfed.flower.settings import check_supported

    check_supported(_cfg(tiny_bert_dir, tiny_csv))  # 3 sites per round: accepted
    one = cfgmod.override(_cfg(tiny_bert_dir, tiny_csv), **{"train.client_fraction": 0.3})
    with pytest.raises(ConfigError, match=r"sites per round must be >= 2 for privacy.aggregation 'secure' on Flower "
                                          r"\(SecAgg\+ sums two or more sites\), got 1"):
        check_supported(one)
