"""The LoRA baselines (FedIT, FFA-LoRA, FedEx-LoRA, FLoRA) next to Fed-SB: aggregation, bytes, sync."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from dpfed import config as cfgmod
from dpfed.aggregation import (
    FoldResidual,
    FoldStack,
    LoRAAggregator,
    LoRALayerKeys,
    SendMean,
)
from dpfed.comm import module_traffic
from dpfed.method_specs import METHOD_NAMES
from dpfed.payload import FRAMING_BYTES
from dpfed.runner import prepare, run

METHODS = METHOD_NAMES


def _states(rng, clients=3, d_out=6, d_in=5, r=2):
    return [{"l.B": torch.tensor(rng.normal(size=(d_out, r)), dtype=torch.float32),
             "l.A": torch.tensor(rng.normal(size=(r, d_in)), dtype=torch.float32),
             "head": torch.tensor(rng.normal(size=(3,)), dtype=torch.float32)} for _ in range(clients)]


def _reference(states, sizes, s):
    """Brute force in numpy float64: Σ p_i s B_i A_i, and FedIT's s · mean(B) · mean(A)."""
    p = np.array(sizes, dtype=float) / sum(sizes)
    ideal = sum(pi * s * st["l.B"].numpy().astype(float) @ st["l.A"].numpy().astype(float) for pi, st in zip(p, states))
    mb = sum(pi * st["l.B"].numpy().astype(float) for pi, st in zip(p, states))
    ma = sum(pi * st["l.A"].numpy().astype(float) for pi, st in zip(p, states))
    return ideal, s * mb @ ma


def test_fedit_error_is_the_brute_force_reference():
    states, sizes = _states(np.random.default_rng(0)), [10, 20, 30]
    agg = LoRAAggregator({"l": LoRALayerKeys(b="l.B", a="l.A", scaling=2.0)}, step=SendMean()).aggregate(states, sizes)
    ideal, fedit = _reference(states, sizes, 2.0)
    expected = np.linalg.norm(ideal - fedit) / np.linalg.norm(ideal)
    assert expected > 0.05 and agg.error == pytest.approx(expected, rel=1e-6)
    assert agg.fold == {}
    np.testing.assert_allclose(agg.state["head"].numpy(), sum(w * s["head"].numpy() for w, s in zip([1/6, 2/6, 3/6], states)),
                               rtol=1e-6)


def test_fedex_and_flora_are_exact_against_the_reference():
    states, sizes = _states(np.random.default_rng(1)), [5, 5, 10]
    ideal, _ = _reference(states, sizes, 0.5)
    keys = {"l": LoRALayerKeys(b="l.B", a="l.A", scaling=0.5)}
    fedex = LoRAAggregator(keys, step=FoldResidual()).aggregate(states, sizes)
    got = 0.5 * fedex.state["l.B"].double().numpy() @ fedex.state["l.A"].double().numpy() + fedex.fold["l"].double().numpy()
    np.testing.assert_allclose(got, ideal, atol=1e-6)
    assert fedex.error < 1e-6 and torch.equal(fedex.down["l.residual"], fedex.fold["l"])
    fresh = torch.full((2, 5), 0.25)
    flora = LoRAAggregator(keys, step=FoldStack(lambda name: fresh)).aggregate(states, sizes)
    np.testing.assert_allclose(flora.fold["l"].double().numpy(), ideal, atol=1e-6)
    assert flora.error < 1e-6
    assert torch.equal(flora.state["l.A"], fresh) and not flora.state["l.B"].any()  # re-initialised
    assert sorted(k for k in flora.down if ".stack." in k) == [f"l.stack.{i}.{m}" for i in range(3) for m in "AB"]


def test_ffa_with_frozen_a_is_exact():
    rng = np.random.default_rng(2)
    a = torch.tensor(rng.normal(size=(2, 5)), dtype=torch.float32)
    states = [{"l.B": s["l.B"]} for s in _states(rng)]
    keys = {"l": LoRALayerKeys(b="l.B", a="l.A", scaling=1.0, frozen_a=a)}
    agg = LoRAAggregator(keys, step=SendMean()).aggregate(states, [1, 1, 1])
    assert agg.error < 1e-6 and set(agg.state) == {"l.B"}


def _cfg(model_dir, data, method, **over):
    raw = {
        "model": {"name": model_dir, "rank": 4, "max_length": 32, "lora_alpha": 8.0},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3},
        "init": {"strategy": "random", "head": "random"},
        "train": {"method": method, "rounds": 2, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128, "lr": 0.5},
        "privacy": {"epsilon": 3.0, "delta": 1e-4, "noise_multiplier": 1.0},
        "seed": 0, "device": "cpu",
    }
    for k, v in over.items():
        sec, key = k.split(".")
        raw[sec][key] = v
    return cfgmod.from_dict(raw)


@pytest.fixture(scope="module")
def runs(tiny_bert_dir, tiny_csv, tmp_path_factory):
    out = {}
    for m in METHODS:
        job = prepare(_cfg(tiny_bert_dir, tiny_csv, m))
        before = {n: t.detach().clone() for n, t in job.method.frozen_state().items()}
        run_dir = tmp_path_factory.mktemp(m) / "run"
        s = run(job, run_dir)
        out[m] = (job, s, before, run_dir)
    return out


def _layer_shapes(job):
    from dpfed.adapters.lora import factors

    shapes = []
    for layer in job.adapters.values():
        if job.cfg.train.method == "fed-sb":
            shapes.append((layer.in_features, layer.out_features))
        else:
            B, A = factors(layer)
            shapes.append((A.shape[1], B.shape[0]))
    return shapes


@pytest.mark.parametrize("method", METHODS)
def test_bytes_equal_the_formula(runs, method):
    job, s, _, run_dir = runs[method]
    head = sum(p.numel() for n, p in job.model.named_parameters() if n.startswith("head."))
    shapes = _layer_shapes(job)
    traffic = [module_traffic(method, rank=4, clients=3, d_in=i, d_out=o) for i, o in shapes]
    assert s["bytes_up_per_client_round"] == FRAMING_BYTES + 4 * (sum(t.up for t in traffic) + head)
    assert s["trainable_params"] == sum(t.up for t in traffic) + head
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # round 1 receives the initial state; round 2 what the method's server sends after a round
    first = FRAMING_BYTES + 4 * s["trainable_params"]
    after = FRAMING_BYTES + 4 * (sum(t.down for t in traffic) + head)
    assert [ln["bytes_down"] for ln in lines] == [3 * first, 3 * after]


@pytest.mark.parametrize("method", METHODS)
def test_aggregation_error_zero_only_for_exact_methods(runs, method):
    from dpfed.method_specs import method_spec

    _, s, _, _ = runs[method]
    if not method_spec(method).exact:  # FedIT
        assert s["aggregation_error_max"] > 1e-3
    else:
        assert s["aggregation_error_max"] < 1e-5
    assert s["epsilon_spent"] == pytest.approx(runs["fed-sb"][1]["epsilon_spent"])  # same σ, q, steps: same ε
    assert s["noise_multiplier"] == 1.0


def test_ffa_a_identical_on_all_clients_and_never_trained(runs):
    from dpfed.adapters.lora import factors

    job, _, before, run_dir = runs["ffa-lora"]
    for name, layer in job.adapters.items():
        B, A = factors(layer)
        assert not A.requires_grad and torch.equal(A, before[f"{name}.A"])
        assert B.requires_grad and B.abs().sum() > 0
    from dpfed.runner import load_checkpoint

    _, trainable, frozen = load_checkpoint(run_dir)
    assert not any(".lora_A." in k for k in trainable)  # clients send B (and the head) only
    for name in job.adapters:
        assert torch.equal(frozen[f"{name}.A"], before[f"{name}.A"])


@pytest.mark.parametrize("method", ["fedex-lora", "flora"])
def test_client_rebuilds_the_server_model_from_the_down_message(tiny_bert_dir, tiny_csv, method):
    """Server folds; a client copy applies only the down message; both end with identical weights and outputs."""
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.methods import METHODS as REGISTRY

    job = prepare(_cfg(tiny_bert_dir, tiny_csv, method))
    client_model = copy.deepcopy(job.model)
    client_layers = {n: client_model.get_submodule(n) for n in job.adapters}
    client_method = REGISTRY[method].build(client_model, client_layers, weighting="size", seed=job.seed)
    g = torch.Generator().manual_seed(0)
    states = []
    for _ in range(3):  # three clients' trained states: random perturbations of the global one
        states.append({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in trainable_state(job.model).items()})
    agg = job.method.aggregate(states, [10, 20, 30], round=1)
    from dpfed.adapters.lorasb import load_trainable_state

    load_trainable_state(job.model, agg.state)
    client_method.client_apply(agg.down, round=1)
    server_eff, client_eff = job.method.effective_deltas(), client_method.effective_deltas()
    for n in server_eff:
        torch.testing.assert_close(client_eff[n], server_eff[n], atol=1e-5, rtol=1e-5)
    for n, p in job.model.named_parameters():
        torch.testing.assert_close(dict(client_model.named_parameters())[n], p, atol=1e-5, rtol=1e-5, msg=n)
    batch = job.test.batch(range(8), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(client_model(batch["input_ids"], batch["attention_mask"]),
                                   job.model(batch["input_ids"], batch["attention_mask"]), atol=1e-5, rtol=1e-5)
    # the fold moved W0 by exactly the clients' mean product minus what the adapter now adds
    assert any(float(d.abs().max()) > 0 for d in agg.fold.values())


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedex-lora", "flora"])
def test_every_trained_factor_gets_per_sample_gradients_matching_a_loop(tiny_bert_dir, tiny_csv, method):
    from dpfed.privacy import per_example_loss, per_sample_gradients

    job = prepare(_cfg(tiny_bert_dir, tiny_csv, method))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in job.model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))  # B ≠ 0 so that A's gradient is non-zero
    batch = job.shards[0].batch(range(4), "cpu")
    grads, _ = per_sample_gradients(job.model, batch, task="classification")
    trained = {n: p for n, p in job.model.named_parameters() if p.requires_grad}
    assert set(grads) == set(trained)
    if method == "ffa-lora":
        assert not any(".lora_A." in n for n in trained)
    for b in range(4):
        one = {k: v[b:b + 1] for k, v in batch.items()}
        ref = torch.autograd.grad(per_example_loss(job.model, one, task="classification").sum(), list(trained.values()))
        for (n, _), r in zip(trained.items(), ref):
            torch.testing.assert_close(grads[n][b], r, rtol=1e-4, atol=1e-6, msg=f"{n} example {b}")


def test_lora_export_reloads_with_peft(runs, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from dpfed.adapters.export import unwrap

    for method in ("fedit", "fedex-lora"):
        job, _, _, run_dir = runs[method]
        adapter = run_dir / "adapter"
        meta = json.loads((adapter / "lora_config.json").read_text())
        base = unwrap(job.model)
        with torch.no_grad():
            for name in job.adapters:  # start from the pretrained base, as a user would
                base.get_submodule(name).weight.copy_(job.method.initial_base[name])
            if meta["base_delta"]:
                for key, d in load_file(str(adapter / meta["base_delta"])).items():
                    base.get_submodule(key[: -len(".weight")]).weight.add_(d)
        assert (meta["base_delta"] is not None) == (method == "fedex-lora")
        loaded = PeftModel.from_pretrained(base, str(adapter / "peft"))
        batch = job.test.batch(range(8), "cpu")
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch["input_ids"], batch["attention_mask"]),
                                       job.model(batch["input_ids"], batch["attention_mask"]), atol=1e-4, rtol=1e-4)


def test_baselines_refuse_dp_init_and_client_level(tiny_bert_dir, tiny_csv):
    from dpfed.errors import ConfigError

    with pytest.raises(ConfigError, match="init 'dp' .* fed-sb only"):
        _cfg(tiny_bert_dir, tiny_csv, "fedit", **{"init.strategy": "dp"})
    with pytest.raises(ConfigError, match="DP-FedAvg.*fed-sb only"):
        _cfg(tiny_bert_dir, tiny_csv, "flora", **{"privacy.unit": "client", "privacy.client_epsilon": 3.0})
