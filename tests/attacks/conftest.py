"""Synthetic run directories for the audit: a tiny BERT, canaries, attack records, and a hand-planted leak.

``dpfed train`` does not plant canaries yet, so the tests build the files the audit reads, in the
layout and formats the runner writes: ``config.yaml``, ``initial_state.safetensors``,
``adapter/lorasb.safetensors`` (+ ``lorasb_config.json``), ``summary.json``, ``budget.json``,
``canaries.json`` and ``attack_records.json``.

Two runs share one initial model and one canary set:

* ``untouched``: the final state equals the initial state (nothing learned, nothing leaked);
* ``leaky``: R and the head are fitted without any noise to the included canaries and the member
  records (a planted leak, far outside any DP claim).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

EPS_CLAIMED = 0.5
DELTA = 1e-5
M = 200
N_ATTACK = 40
LEAK_STEPS = 200
N_FRESH = 200
KL_WEIGHT = 3.0  # measured: 33-39 of 40 guesses right for weights 1-5 and 150-300 steps


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _summary(splits, *, dp: bool, eps: float) -> dict:
    sizes = {f"client-{i:03d}": len(c) for i, c in enumerate(splits.clients)}
    return {
        "method": "fed-sb",
        "privacy": "record-level DP per client (local DP-SGD)" if dp else "none (--no-dp): no privacy guarantee",
        "epsilon_target": eps if dp else None,
        "delta": DELTA if dp else None,
        "epsilon_spent": eps if dp else None,
        "epsilon_per_client": {k: eps for k in sizes} if dp else {},
        "accountant": "prv (upper bound)" if dp else None,
        "noise_multiplier": 1.1 if dp else None,
        "clip": 1.0 if dp else None,
        "sample_rates": {k: 16 / n for k, n in sizes.items()},
        "rounds_planned": 2,
        "rounds_completed": 2,
        "local_steps": 2,
        "batch_size": 16,
        "clients": len(sizes),
        "clients_per_round": len(sizes),
        "client_sizes": sizes,
        "init": "random",
        "data_fingerprints": {"test": splits.test.fingerprint(), "public": splits.public.fingerprint()},
    }


def write_run(run_dir: Path, *, cfg, model, adapters, initial, splits, canaries, attack_records, dp: bool = True,
              eps: float = EPS_CLAIMED) -> Path:
    from attacks.canaries import save_attack_records, save_canaries
    from dpfed import config as config_mod
    from dpfed.adapters.export import export_adapters
    from dpfed.runner import save_state

    run_dir.mkdir(parents=True)
    cfg = config_mod.override(cfg, **{"privacy.enabled": dp})
    (run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
    save_state(run_dir / "initial_state.safetensors", initial)
    export_adapters(model, adapters, run_dir / "adapter", task=cfg.model.task, base_model=cfg.model.name)
    (run_dir / "summary.json").write_text(json.dumps(_summary(splits, dp=dp, eps=eps)))
    if dp:
        (run_dir / "budget.json").write_text(json.dumps({"epsilon": eps, "delta": DELTA, "accountant": "prv",
                                                         "privacy_unit": "record"}))
    save_canaries(run_dir / "canaries.json", canaries)
    save_attack_records(run_dir / "attack_records.json", attack_records)
    return run_dir


@pytest.fixture(scope="module")
def synthetic_runs(tiny_bert_dir, tiny_csv, tmp_path_factory, one_thread):
    """{"untouched": dir, "leaky": dir, "nodp": dir (leaky model, --no-dp), "parts": objects for other tests}."""
    import torch

    from attacks.canaries import choose_attack_records, make_canaries, plant
    from dpfed.adapters.init import init_head_random, init_random
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.config import DataConfig, InitConfig, ModelConfig, PrivacyConfig, RunConfig
    from dpfed.data import Records, load_records, load_tokenizer, split_and_partition, tokenize
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import DEFAULT_TARGETS, load_base, select_targets
    from dpfed.privacy import make_generator, per_example_loss

    root = tmp_path_factory.mktemp("audit-runs")
    cfg = RunConfig(
        model=ModelConfig(name=tiny_bert_dir, rank=4, max_length=32),
        data=DataConfig(source=tiny_csv, text_column="sentence", label_column="sentiment", num_clients=3,
                        test_fraction=0.2, public_fraction=0.0),
        init=InitConfig(strategy="random"),
        privacy=PrivacyConfig(epsilon=EPS_CLAIMED, delta=DELTA),
        seed=0,
        device="cpu",
    )
    records = load_records(cfg.data, task="classification")
    splits = split_and_partition(records, cfg.data, seed=1)
    # the held-out pool for non-members: carved out of the test split here, before "training"
    heldout = splits.test.subset(range(len(splits.test) // 2))
    splits = type(splits)(test=splits.test.subset(range(len(splits.test) // 2, len(splits.test))),
                          public=splits.public, clients=splits.clients)
    tok = load_tokenizer(tiny_bert_dir)
    canaries = make_canaries(m=M, label_names=records.label_names, num_clients=3, seed=7, tokenizer=tok)
    attack = choose_attack_records(splits, heldout=heldout, n=N_ATTACK, seed=9, canaries=canaries)
    planted = plant(splits, canaries, seed=8)

    model = load_base(tiny_bert_dir, task="classification", num_labels=2)
    adapters = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["bert"]), rank=4)
    gen = make_generator(0)
    init_random(adapters, generator=gen)
    init_head_random(model, generator=gen)
    initial = trainable_state(model)
    common = dict(cfg=cfg, model=model, adapters=adapters, initial=initial, splits=planted, canaries=canaries,
                  attack_records=attack)
    untouched = write_run(root / "untouched", **common)

    # planted leak: fit R and head, without noise, to the included canaries and the member records
    inc = [i for i in range(canaries.m) if canaries.included[i]]
    train = Records(tuple(canaries.texts[i] for i in inc) + tuple(r["text"] for r in attack["members"]),
                    tuple(canaries.labels[i] for i in inc) + tuple(r["label"] for r in attack["members"]),
                    records.label_names)
    batch = tokenize(train, tok, max_length=32).batch(range(len(train)))
    # ...while keeping predictions on other random-word texts (fresh draws, not the excluded canaries)
    # close to the initial model's, so that the fit memorises rather than generalises to every canary
    fresh = make_canaries(m=N_FRESH, label_names=records.label_names, num_clients=1, seed=99, tokenizer=tok).records()
    fresh_batch = tokenize(fresh, tok, max_length=32).batch(range(len(fresh)))
    with torch.no_grad():
        logp0 = torch.log_softmax(model(fresh_batch["input_ids"], fresh_batch["attention_mask"]), -1)  # (F, K)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(LEAK_STEPS):
        opt.zero_grad()
        logp = torch.log_softmax(model(fresh_batch["input_ids"], fresh_batch["attention_mask"]), -1)
        kl = (logp0.exp() * (logp0 - logp)).sum(-1).mean()
        (per_example_loss(model, batch, task="classification").mean() + KL_WEIGHT * kl).backward()
        opt.step()
    leaky = write_run(root / "leaky", **common)
    nodp = write_run(root / "nodp", **common, dp=False)
    return {"untouched": untouched, "leaky": leaky, "nodp": nodp, "canaries": canaries, "splits": splits,
            "planted": planted, "heldout": heldout, "attack": attack, "tokenizer": tok}


@pytest.fixture(scope="module")
def run_writer():
    """:func:`write_run`, for tests that build their own synthetic runs."""
    return write_run


@pytest.fixture
def noise_secretly_off(monkeypatch):
    """The planted bug of the end-to-end audits: calling it turns the sites' noise off while their ledgers still
    claim the configured epsilon (``dpfed.client.noised_mean`` with sigma 0)."""
    from dpfed import client as client_mod
    from dpfed.privacy import DPSGDParams

    def plant() -> None:
        real = client_mod.noised_mean

        def silent(sums, *, params, generator):
            return real(sums, params=DPSGDParams(noise_multiplier=0.0, clip=params.clip,
                                                 expected_batch_size=params.expected_batch_size), generator=None)

        monkeypatch.setattr(client_mod, "noised_mean", silent)

    return plant
