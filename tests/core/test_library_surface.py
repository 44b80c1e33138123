"""The library surface: ``dpfed.__all__`` resolves lazily, every export is documented, imports stay light."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig

import dpfed
from dpfed.adapters.init import init_random
from dpfed.adapters.lorasb import trainable_state
from dpfed.data import TokenizedShard
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.model import DEFAULT_TARGETS, build_from_config, select_targets
from dpfed.privacy import make_generator


def _imported_after(statement: str) -> dict[str, bool]:
    """Which heavy or upward modules a fresh interpreter holds after running ``statement``."""
    watch = ["torch", "transformers", "prv_accountant", "attacks", "dpfed.adapters", "dpfed.adapters.lorasb"]
    code = f"import sys\n{statement}\nimport json\nprint(json.dumps({{m: m in sys.modules for m in {watch!r}}}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_dpfed_loads_neither_torch_nor_attacks():
    loaded = _imported_after("import dpfed")
    assert not any(loaded.values()), loaded


def test_per_sample_and_privacy_do_not_import_the_adapters():
    for module in ("dpfed.persample", "dpfed.privacy"):
        loaded = _imported_after(f"import {module}")
        assert loaded["torch"] and not loaded["dpfed.adapters"] and not loaded["attacks"], (module, loaded)


@pytest.mark.parametrize("name", dpfed.__all__)
def test_every_export_resolves_to_its_module_object_and_has_a_docstring(name):
    obj = getattr(dpfed, name)
    assert obj is getattr(importlib.import_module(dpfed._EXPORTS[name]), name)
    doc = obj.__doc__  # a class's own docstring, never one inherited from its base
    assert doc and doc.strip(), f"dpfed.{name} has no docstring"
    assert not doc.startswith(f"{name}("), f"dpfed.{name} has only the generated dataclass signature as docstring"


def test_the_surface_is_listed_and_unknown_names_fail_as_attributes():
    assert len(set(dpfed.__all__)) == len(dpfed.__all__)
    assert set(dpfed.__all__) <= set(dir(dpfed))
    with pytest.raises(AttributeError, match="module 'dpfed' has no attribute 'no_such_piece'"):
        dpfed.no_such_piece  # noqa: B018
    assert not hasattr(dpfed, "no_such_piece")


def test_a_client_round_on_the_surface_with_an_in_memory_ledger():
    """The pieces compose as a library user would call them: a client round recorded in a MemoryLedger."""
    torch.manual_seed(0)  # test-only: the tiny model's random weights
    model = build_from_config(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=16), task="classification")
    adapters = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["bert"]), rank=2)
    init_random(adapters, generator=make_generator(0))
    g = make_generator(1)
    shard = TokenizedShard([torch.randint(4, 30, (6,), generator=g).tolist() for _ in range(40)],
                           torch.randint(0, 2, (40,), generator=g), 0)
    ledger = dpfed.MemoryLedger()
    client = dpfed.Client(client_id="c0", shard=shard,
                          training=dpfed.LocalTraining(local_steps=3, batch_size=8, lr=0.1),
                          dp=dpfed.DPSGDParams(noise_multiplier=1.0, clip=1.0, expected_batch_size=8),
                          sample_generator=make_generator(2), noise_generator=make_generator(3), ledger=ledger)
    state0 = trainable_state(model)
    result = client.fit(model, state0, round=1)
    assert ledger.events("c0") == list(result.events) and len(ledger) == 1
    event = result.events[0]
    assert isinstance(event, dpfed.PoissonGaussianEvent) and event.count == 3 and event.noise_multiplier == 1.0
    assert math.isclose(event.sample_rate, 8 / 40)  # the rate the float64 draw realises, a hair above b / n
    spent = dpfed.spent(ledger, "c0", delta=1e-5)
    assert spent == dpfed.epsilon(result.events, delta=1e-5) and 0 < spent.upper < math.inf
    merged = dpfed.FedSBAggregator().aggregate([result.state, state0], [40, 40])
    assert all(torch.allclose(merged[n], (result.state[n] + state0[n]) / 2) for n in state0)
