"""LoRA-SB layer, per-sample gradients (and the generic per-sample protocol), clipping/noise, aggregation
exactness, PEFT export."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import BertConfig, LlamaConfig

from dpfed.adapters.export import to_peft, unwrap
from dpfed.adapters.init import init_random, randomized_svd
from dpfed.adapters import lorasb
from dpfed.adapters.lorasb import LoRASBLinear, load_trainable_state, trainable_state
from dpfed.aggregation import FedSBAggregator
from dpfed.errors import PrivacyCheckError
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.model import DEFAULT_TARGETS, build_from_config, select_targets
from dpfed.persample import PerSampleLinear, PerSampleModule, per_sample_mode, per_sample_weight_mode
from dpfed.privacy import DPSGDParams, clipped_sum, noised_mean, per_example_loss, per_sample_gradients

torch.set_default_dtype(torch.float32)


def _bert(rank=4, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=32)
    model = build_from_config(cfg, task="classification", num_labels=3)
    names = select_targets(model, DEFAULT_TARGETS["bert"])
    adapters = inject_lorasb(model, names, rank=rank)
    g = torch.Generator().manual_seed(seed)
    init_random(adapters, generator=g)
    with torch.no_grad():
        for layer in adapters.values():
            layer.R.copy_(torch.randn(rank, rank, generator=g) * 0.3)
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))
    return model, adapters


def _llama(rank=4, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = build_from_config(cfg, task="causal-lm")
    adapters = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["llama"]), rank=rank)
    g = torch.Generator().manual_seed(seed)
    init_random(adapters, generator=g)
    with torch.no_grad():
        for layer in adapters.values():
            layer.R.copy_(torch.randn(rank, rank, generator=g) * 0.3)
    return model, adapters


def _batch(bsz=5, seq=7, vocab=50, labels=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (bsz, seq), generator=g)
    mask = torch.ones(bsz, seq, dtype=torch.long)
    mask[0, 4:] = 0  # one padded example
    ids[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, labels, (bsz,), generator=g)}


def test_forward_equals_merged_weight():
    model, adapters = _bert()
    batch = _batch()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
        merged = unwrap(model)
        for name, layer in adapters.items():
            merged.get_submodule(name).weight += layer.delta_weight()
        ref = merged(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, unwrap(model)(batch["input_ids"], batch["attention_mask"]), atol=1e-3)


def test_only_R_and_head_are_trainable_and_A_B_are_buffers():
    model, adapters = _bert()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.endswith(".R") or n.startswith("head.") for n in names)
    assert len([n for n in names if n.endswith(".R")]) == len(adapters) == 12
    layer = next(iter(adapters.values()))
    assert "A" in dict(layer.named_buffers()) and "B" in dict(layer.named_buffers())


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_per_sample_gradients_equal_per_example_loop(kind):
    model, _ = _bert() if kind == "bert" else _llama()
    task = "classification" if kind == "bert" else "causal-lm"
    batch = _batch()
    grads, losses = per_sample_gradients(model, batch, task=task)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(params)
    for b in range(batch["input_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        one = {k: v[b:b + 1] for k, v in batch.items()}
        loss = per_example_loss(model, one, task=task).sum()
        loss.backward()
        assert math.isclose(float(loss), float(losses[b]), rel_tol=1e-5, abs_tol=1e-6)
        for n, p in params.items():
            assert torch.allclose(grads[n][b], p.grad, atol=1e-5, rtol=1e-4), (n, b)
    # frozen weights never get a gradient
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_per_sample_R_gradient_is_the_rxr_einsum():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRASBLinear(base, rank=3)
    g = torch.Generator().manual_seed(0)
    layer.set_factors(B=torch.randn(5, 3, generator=g), A=torch.randn(3, 6, generator=g), R=torch.randn(3, 3, generator=g))
    x = torch.randn(4, 2, 6, generator=g)
    with per_sample_mode(layer, 4) as leaves:
        y = layer(x)
        grad_out = torch.randn(y.shape, generator=g)
        (y * grad_out).sum().backward()
        got = leaves["R"].grad
    u = x @ layer.A.T  # (B, T, r)
    grad_h = grad_out @ layer.B  # (B, T, r)
    want = torch.einsum("bto,bti->boi", grad_h, u)
    assert torch.allclose(got, want, atol=1e-5)


def test_orphan_trainable_parameter_is_refused():
    model, _ = _bert()
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(PrivacyCheckError, match="without a per-sample gradient"):
        per_sample_gradients(model, _batch(), task="classification")


class _Gain(PerSampleModule):
    """A new per-sample layer written against the protocol alone: y = x * gain (+ shift, frozen)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.linspace(-1.0, 1.0, d), requires_grad=False)

    def forward(self, x):  # (B, T, d)
        gain = self.gain if self.per_sample is None else self.per_sample["gain"].unsqueeze(1)  # (d) or (B, 1, d)
        return x * gain + self.shift


def test_a_new_per_sample_module_gets_per_example_gradients_and_an_unknown_one_is_refused():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(_Gain(6), PerSampleLinear(6, 3).load(torch.randn(3, 6, generator=g)))
    model[1].bias.requires_grad_(False)  # a frozen bias stays shared: no leaf
    x = torch.randn(4, 5, 6, generator=g)
    with per_sample_mode(model, 4) as leaves:
        model(x).pow(2).sum().backward()
    assert list(leaves) == ["0.gain", "1.weight"]
    assert model[0].per_sample is None and model[1].per_sample is None  # cleared on exit
    for b in range(4):
        ref = torch.autograd.grad(model(x[b:b + 1]).pow(2).sum(), [model[0].gain, model[1].weight])
        for leaf, r in zip(leaves.values(), ref):
            torch.testing.assert_close(leaf.grad[b], r, rtol=1e-5, atol=1e-6)
    model.append(nn.LayerNorm(3))  # trainable weight and bias, owned by no per-sample module
    with pytest.raises(PrivacyCheckError, match=r"without a per-sample gradient path: \['2.weight', '2.bias'\]"):
        with per_sample_mode(model, 4):
            pass
    assert model[0].per_sample is None  # cleared after a refusal too
    with pytest.raises(TypeError, match="_Gain has no frozen weight"):
        with per_sample_weight_mode({"gain": model[0]}, 4):
            pass


def test_lorasb_keeps_the_per_sample_names_for_existing_callers():
    assert lorasb.per_sample_mode is per_sample_mode and lorasb.per_sample_weight_mode is per_sample_weight_mode
    assert lorasb.PerSampleLinear is PerSampleLinear and issubclass(LoRASBLinear, PerSampleModule)


def test_clipping_bounds_each_example_and_noise_has_right_mean_and_std():
    g = torch.Generator().manual_seed(0)
    per = {"a": torch.randn(64, 3, 3, generator=g) * 5, "b": torch.randn(64, 4, generator=g) * 5}
    sums, norms = clipped_sum(per, clip=1.0)
    # reference: loop over examples
    ref = {k: torch.zeros_like(v[0]) for k, v in per.items()}
    for i in range(64):
        n = math.sqrt(sum(float(v[i].pow(2).sum()) for v in per.values()))
        assert math.isclose(n, float(norms[i]), rel_tol=1e-5)
        for k, v in per.items():
            ref[k] += v[i] * min(1.0, 1.0 / (n + 1e-6))
    for k in ref:
        assert torch.allclose(sums[k], ref[k], atol=1e-5)
    # noise: many draws of the noised mean of a fixed sum; mean = sum / b, std = σ C / b
    params = DPSGDParams(noise_multiplier=2.0, clip=0.5, expected_batch_size=8.0)
    gen = torch.Generator().manual_seed(123)
    draws = torch.stack([noised_mean(sums, params=params, generator=gen)["a"] for _ in range(4000)])  # (N, 3, 3)
    want_mean = sums["a"] / 8.0
    want_std = 2.0 * 0.5 / 8.0
    se = want_std / math.sqrt(4000)
    assert torch.all((draws.mean(0) - want_mean).abs() < 5 * se)
    emp_std = draws.std(0)
    assert torch.all((emp_std - want_std).abs() < 0.05 * want_std)  # ~4.5 standard errors of the std


def test_noise_requires_a_generator():
    with pytest.raises(PrivacyCheckError):
        noised_mean({"a": torch.zeros(2)}, params=DPSGDParams(noise_multiplier=1.0, clip=1.0, expected_batch_size=1.0),
                    generator=None)


def test_averaging_R_is_exact_for_the_merged_update():
    model, adapters = _bert()
    g = torch.Generator().manual_seed(5)
    base_state = trainable_state(model)
    states, sizes = [], [10, 30, 60]
    for _ in sizes:
        s = {k: v + torch.randn(v.shape, generator=g) for k, v in base_state.items()}
        states.append(s)
    agg = FedSBAggregator(weighting="size").aggregate(states, sizes)
    w = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    for name, layer in adapters.items():
        deltas = []
        for s in states:
            load_trainable_state(model, s)
            deltas.append(layer.delta_weight().double())
        mean_delta = sum(wi * d for wi, d in zip(w, deltas))
        load_trainable_state(model, agg)
        err = (layer.delta_weight().double() - mean_delta).norm() / mean_delta.norm()
        assert err < 1e-6


def test_randomized_svd_matches_full_svd():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(40, 8, generator=g) @ torch.randn(8, 30, generator=g)  # rank 8
    U, S, Vh = randomized_svd(m, rank=8, generator=g)
    assert torch.allclose(U @ torch.diag(S) @ Vh, m, atol=1e-3)
    assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-4)
    assert torch.allclose(S, torch.linalg.svdvals(m)[:8], rtol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_peft_export_reproduces_outputs(kind, tmp_path):
    from peft import PeftModel

    model, adapters = _bert() if kind == "bert" else _llama()
    batch = _batch()
    peft_model = to_peft(model, adapters)
    peft_model.save_pretrained(str(tmp_path))
    fresh = PeftModel.from_pretrained(unwrap(model) if kind == "llama" else _fresh_classifier(model), str(tmp_path))
    with torch.no_grad():
        if kind == "bert":
            ours = model(batch["input_ids"], batch["attention_mask"])
            theirs = fresh(batch["input_ids"], batch["attention_mask"])
        else:
            ours = model(input_ids=batch["input_ids"]).logits
            theirs = fresh(input_ids=batch["input_ids"]).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def _fresh_classifier(model):
    """The same base weights with an untrained head: the head must come from the adapter file."""
    clean = unwrap(model)
    with torch.no_grad():
        clean.head.weight.zero_()
        clean.head.bias.zero_()
    return clean


def test_autocast_forward_equals_explicit_fp32_cast_and_per_sample_grads_sum_to_plain():
    """Under autocast the layer lets the matmul cast x (no fp32 copy of x); the output must be the
    same as casting x to fp32 first, and per-sample gradients must still sum to the plain one."""
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(16, 12).to(torch.bfloat16)
    layer = LoRASBLinear(base, rank=4)
    layer.set_factors(B=torch.randn(12, 4, generator=g), A=torch.randn(4, 16, generator=g),
                      R=torch.randn(4, 4, generator=g))
    x = torch.randn(3, 5, 16, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        y = base(x)
        want = y + (((x.float() @ layer.A.T) @ layer.R.T) @ layer.B.T).to(y.dtype)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    plain = layer.R.grad.clone()
    with per_sample_mode(layer, 3) as leaves:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        per = leaves["R"].grad
    assert per.shape == (3, 4, 4) and per.is_contiguous()
    assert torch.allclose(per.sum(0), plain, rtol=2e-2, atol=1e-2)
