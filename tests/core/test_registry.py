"""The method registry (dpfed.methods, dpfed.method_specs) and the model-family table (dpfed.families)."""

from __future__ import annotations

import pytest
import torch

from dpfed import comm as C
from dpfed import model as M
from dpfed.errors import ConfigError
from dpfed.families import (
    FAMILIES,
    MODEL_TYPES,
    default_targets,
    prefix_cache_supported,
)
from dpfed.method_specs import METHOD_NAMES, SPECS, method_spec
from dpfed.methods import METHODS, FedSB, Method, method_class

PROTOCOL = ("inject", "build", "effective_deltas", "frozen_state", "load_frozen_state", "aggregate", "client_apply",
            "payload_formula", "export")


def test_registries_agree_and_every_class_follows_the_protocol():
    assert tuple(METHODS) == METHOD_NAMES == tuple(SPECS)
    from dpfed import config

    assert config.METHODS == METHOD_NAMES
    for name, cls in METHODS.items():
        assert cls.spec is SPECS[name] and cls.name == name and method_class(name) is cls
        assert all(callable(getattr(cls, attr, None)) for attr in PROTOCOL), name
    assert {a for a in dir(Method) if not a.startswith("_")} >= set(PROTOCOL)


@pytest.mark.parametrize("lookup", [method_spec, method_class])
def test_unknown_method_names_the_known_ones(lookup):
    with pytest.raises(ConfigError, match="method must be one of fed-sb, fedit, ffa-lora, fedex-lora, flora, got 'lora'"):
        lookup("lora")


def test_old_names_still_work():
    from dpfed.methods import FedSBMethod, LoRAMethod

    assert FedSBMethod is FedSB
    with pytest.raises(ConfigError, match="LoRA baseline"):
        LoRAMethod("fed-sb", torch.nn.Linear(2, 2), {}, weighting="size", seed=0)
    assert M.DEFAULT_TARGETS == {"bert": FAMILIES["bert"].target_modules, "llama": FAMILIES["llama"].target_modules}
    assert M.model_family("roberta") == "bert" and M.model_family("gemma2") == "llama"
    assert M._layer_index("encoder.layer.3.attention.self.query") == 3


def test_spec_traffic_is_the_comm_formula():
    for name, spec in SPECS.items():
        t = C.module_traffic(name, rank=3, clients=5, d_in=7, d_out=11)
        assert t == spec.traffic(rank=3, clients=5, d_in=7, d_out=11)
        assert C.module_setup_down(name, rank=3, d_in=7, d_out=11) == spec.setup_params(rank=3, d_in=7, d_out=11)


def _cfg(model_dir, data, method):
    from dpfed import config as cfgmod

    return cfgmod.from_dict({
        "model": {"name": model_dir, "rank": 4, "max_length": 32, "lora_alpha": 8.0},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3},
        "init": {"strategy": "random", "head": "random"},
        "train": {"method": method, "rounds": 1, "local_steps": 1, "batch_size": 16},
        "privacy": {"epsilon": 3.0, "delta": 1e-4, "noise_multiplier": 1.0},
        "seed": 0, "device": "cpu",
    })


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_registry_inject_and_build_reproduce_prepare(tiny_bert_dir, tiny_csv, method):
    """What the runner builds today equals ``cls.inject`` + ``cls.build`` with the same generator, bit for bit."""
    from dpfed.privacy import make_generator
    from dpfed.runner import child_seed, prepare

    job = prepare(_cfg(tiny_bert_dir, tiny_csv, method))
    cls = METHODS[method]
    assert type(job.method) is cls
    model = M.load_base(tiny_bert_dir, task="classification", num_labels=2)
    names = M.select_targets(model, default_targets(model.config.model_type))
    assert names == list(job.adapters)
    adapters = cls.inject(model, names, rank=4, alpha=8.0, generator=make_generator(child_seed(job.seed, 2, 2)))
    built = cls.build(model, adapters, weighting="size", seed=job.seed)
    assert type(built) is cls and built.layers is adapters
    ours = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in job.model.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}
    if cls is FedSB:
        return  # LoRA-SB's factors come from the init strategy, after injection
    from dpfed.adapters.lora import factors

    for n in names:
        (b0, a0), (b1, a1) = factors(job.adapters[n]), factors(adapters[n])
        assert torch.equal(a0, a1) and torch.equal(b0, b1) and not b1.any()
        assert a1.requires_grad == cls.spec.trains_a
    assert set(built.frozen_state()) == set(job.method.frozen_state())


def test_inject_refuses_a_rank_above_the_layer(tiny_bert_dir):
    model = M.load_base(tiny_bert_dir, task="classification", num_labels=2)
    names = M.select_targets(model, ("query",))
    for cls in METHODS.values():
        with pytest.raises(ConfigError, match="rank must be <= min"):
            cls.inject(M.load_base(tiny_bert_dir, task="classification", num_labels=2), names, rank=10_000,
                       alpha=None, generator=torch.Generator())


# ----------------------------------------------------------------- model families


def test_one_family_table_for_model_comm_and_prefix_cache():
    assert set(M.FAMILY_OF) == set(MODEL_TYPES) == set(C.BERT_MODEL_TYPES | C.DECODER_MODEL_TYPES)
    assert C.BERT_MODULES == M.DEFAULT_TARGETS["bert"] and C.DECODER_MODULES == M.DEFAULT_TARGETS["llama"]
    for model_type in MODEL_TYPES:
        assert prefix_cache_supported(model_type) == (model_type in FAMILIES["bert"].model_types)
    assert not prefix_cache_supported("gpt2")
    for bad in ("phi3", "mixtral", "distilbert"):  # their blocks do not have the family's module names
        with pytest.raises(ConfigError, match="or pass target_modules explicitly"):
            default_targets(bad)
        with pytest.raises(ConfigError, match="model_type must be one of"):
            C.model_shape({"model_type": bad, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                           "num_attention_heads": 2})


@pytest.mark.parametrize("kind", ["electra", "camembert", "roberta"])
def test_every_prefix_cache_family_member_splits_exactly(kind):
    """The frozen-prefix split equals the full forward (ELECTRA: with its embedding projection)."""
    from transformers import CamembertConfig, ElectraConfig, RobertaConfig

    dims = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 40}
    config = {"electra": lambda: ElectraConfig(embedding_size=16, **dims), "camembert": lambda: CamembertConfig(**dims),
              "roberta": lambda: RobertaConfig(**dims)}[kind]()
    assert prefix_cache_supported(config.model_type)
    torch.manual_seed(0)
    model = M.build_from_config(config, task="classification")
    names = M.select_targets(model, default_targets(config.model_type), (-1,))
    assert names and all(M.layer_index(n) == 2 for n in names)
    model.prefix_start = 2
    ids = torch.randint(5, 100, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 5:] = 0
    assert model.prefix_matches(ids, mask, atol=1e-5)
