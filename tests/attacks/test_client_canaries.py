"""Canary clients for the client-level claim: the exact null, the planted leak, and a DP run."""

from __future__ import annotations


import numpy as np
import pytest

from attacks.plan import audit_plan
import torch

from attacks import client_canaries as cc


def _state(d1=30, d2=20):
    return {"b.R": torch.zeros(d1), "a.head": torch.zeros(d2)}


def test_directions_are_unit_seeded_and_bits_balanced():
    a = cc.make_canary_clients(k=400, state=_state(), seed=3)
    b = cc.make_canary_clients(k=400, state=_state(), seed=3)
    assert torch.equal(a.directions, b.directions) and a.included == b.included
    torch.testing.assert_close(a.directions.norm(dim=1), torch.ones(400, dtype=torch.float64))
    assert 150 < sum(a.included) < 250 and a.names == ("a.head", "b.R")
    s = cc.canary_state(_state(), a, 0, clip=2.0)
    flat = cc.flatten(s, a.names)
    torch.testing.assert_close(flat, 2.0 * a.directions[0])


def test_null_cdf_matches_monte_carlo():
    d = 7
    rng = np.random.default_rng(0)
    c = rng.standard_normal((200_000, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    cos = c[:, 0]  # cos with the fixed direction e_1
    for t in (-0.5, -0.1, 0.0, 0.3, 0.7):
        assert cc.null_cdf(np.array([t]), d)[0] == pytest.approx(np.mean(cos <= t), abs=4e-3)


def _run(theta_shift, *, k=200, seed=0):
    state = _state(2000, 1000)  # d ≫ k: each canary's direction stands out of the sum (Andrew et al., Sec. 3)
    canaries = cc.make_canary_clients(k=k, state=state, seed=seed)
    theta0 = {n: torch.zeros_like(v) for n, v in state.items()}
    return canaries, theta0, theta_shift(canaries, theta0)


def test_planted_client_leak_is_detected_and_no_leak_is_not():
    rng = np.random.default_rng(1)

    def leak(canaries, theta0):  # the server averages the included canaries' updates with no noise
        total = canaries.directions[torch.tensor(canaries.included)].sum(0)
        flat = total + 0.01 * torch.from_numpy(rng.standard_normal(total.numel()))
        out, off = {}, 0
        for n in canaries.names:
            out[n] = flat[off:off + theta0[n].numel()].reshape(theta0[n].shape).float()
            off += theta0[n].numel()
        return out

    canaries, theta0, final = _run(leak)
    res = cc.audit(canaries, theta0=theta0, theta_final=final, delta=1e-5, confidence=0.95)
    assert res["epsilon_lower_bound"] > 1.0 and res["correct"] >= 0.9 * res["guesses"]
    assert res["null_ks_p_value"] > 1e-3  # the excluded canaries follow the exact null

    def independent(canaries, theta0):  # a model that ignores the canaries
        g = torch.Generator().manual_seed(5)
        return {n: torch.randn(v.shape, generator=g) for n, v in theta0.items()}

    canaries, theta0, final = _run(independent)
    res = cc.audit(canaries, theta0=theta0, theta_final=final, delta=1e-5, confidence=0.95)
    assert res["epsilon_lower_bound"] < 0.5
    assert res["null_ks_p_value"] > 1e-3


def test_client_level_run_with_canary_clients_then_audit(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    import json

    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence",
                              "--label-column", "sentiment", "--clients", "4", "--rounds", "3", "--local-steps", "1",
                              "--batch-size", "16", "--rank", "4", "--epsilon", "3", "--delta", "1e-4", "--seed", "0",
                              "--init", "random", "--canaries", "20", "--privacy-unit", "both", "--client-epsilon", "5",
                              "--client-delta", "1e-2", "--out", str(run), "--format", "json"])
    assert code == 0, err
    from dpfed import config as cfgmod

    # canary clients are a config key (data.canary_clients); rerun with them through the runner
    cfg = cfgmod.override(cfgmod.load(run / "config.yaml"), **{"data.canary_clients": 60})
    from dpfed.runner import prepare, run as run_job

    run_job(prepare(cfg, audit=audit_plan(cfg)), tmp_path / "run2")
    assert (tmp_path / "run2" / cc.CANARY_CLIENTS_FILE).is_file()
    code, out, err = run_cli(["audit", str(tmp_path / "run2"), "--format", "json"])
    assert code == 0, err
    res = json.loads(out)["client_level_audit"]
    assert res["canary_clients"] == 60 and res["epsilon_claimed"] <= 5.0
    assert res["verdict"] == "consistent" and res["epsilon_lower_bound"] <= res["epsilon_claimed"]
    assert "Client-level audit" in (tmp_path / "run2" / "audit.md").read_text()


def test_canary_clients_need_a_client_level_claim():
    from dpfed import config as cfgmod
    from dpfed.errors import ConfigError

    with pytest.raises(ConfigError, match="canary_clients audits a client-level claim"):
        cfgmod.from_dict({"data": {"canary_clients": 10}})
