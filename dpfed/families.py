"""Model families: one table that every module asks (no torch here, so ``dpfed.comm`` can use it).

A family is a set of Hugging Face ``model_type`` values whose transformer blocks share the
names and shapes of their adaptable linear layers. It answers: which modules are adapted by
default (in block order), the shape of each as a function of the config, and whether the
frozen-prefix split of :class:`dpfed.model.SequenceClassifier` (hidden states below the lowest
adapted layer computed once) is exact for it.

A model type not listed here can still be trained by naming ``target_modules`` explicitly; it
then gets no prefix cache, and ``dpfed comm`` cannot count it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from dpfed.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """One family of transformer blocks.

    ``modules``: target module (a suffix of the ``nn.Linear``'s path in a block) → ``(d_in, d_out)``
    as symbols, in block order: ``hidden`` (``hidden_size``), ``intermediate``
    (``intermediate_size``), ``q`` (``num_attention_heads · head_dim``) and ``kv``
    (``num_key_value_heads · head_dim``, grouped-query attention). ``prefix_cache``: the
    encoder's layers can be run from cached hidden states (``SequenceClassifier.bottom`` /
    ``_top``); the runner still checks the split against the full forward before using it.
    """

    name: str
    model_types: frozenset[str]
    modules: Mapping[str, tuple[str, str]]
    prefix_cache: bool

    @property
    def target_modules(self) -> tuple[str, ...]:
        """The default target modules: every adaptable linear layer of a block."""
        return tuple(self.modules)


FAMILIES: Mapping[str, Family] = MappingProxyType({
    "bert": Family(
        name="bert",
        model_types=frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"}),
        modules=MappingProxyType({
            "query": ("hidden", "hidden"),
            "key": ("hidden", "hidden"),
            "value": ("hidden", "hidden"),
            "attention.output.dense": ("hidden", "hidden"),
            "intermediate.dense": ("hidden", "intermediate"),
            "output.dense": ("intermediate", "hidden"),
        }),
        prefix_cache=True,
    ),
    "llama": Family(
        name="llama",
        model_types=frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"}),
        modules=MappingProxyType({
            "q_proj": ("hidden", "q"),
            "k_proj": ("hidden", "kv"),
            "v_proj": ("hidden", "kv"),
            "o_proj": ("q", "hidden"),
            "gate_proj": ("hidden", "intermediate"),
            "up_proj": ("hidden", "intermediate"),
            "down_proj": ("intermediate", "hidden"),
        }),
        prefix_cache=False,
    ),
})
"""Every known family by name. BERT-style encoders and Llama-style decoders (separate q/k/v/o and
gate/up/down projections; Phi-3's fused ``qkv_proj`` and Mixtral's experts do not fit)."""

MODEL_TYPES: tuple[str, ...] = tuple(sorted(t for fam in FAMILIES.values() for t in fam.model_types))
"""Every model type with a family, sorted."""

_BY_MODEL_TYPE: Mapping[str, Family] = MappingProxyType(
    {t: fam for fam in FAMILIES.values() for t in fam.model_types})

LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block)\.(\d+)\.")
"""The block index in a module path (``encoder.layer.3.…``, ``model.layers.3.…``, ``h.3``, ``block.3``)."""


def find_family(model_type: str) -> Family | None:
    """The family of ``model_type``, or ``None`` when it has none."""
    return _BY_MODEL_TYPE.get(model_type)


def family_of(model_type: str, *, hint: str = "") -> Family:
    """The family of ``model_type``; ``ConfigError`` naming the known types otherwise (``hint`` appended)."""
    fam = find_family(model_type)
    if fam is None:
        raise ConfigError(f"model_type must be one of {', '.join(MODEL_TYPES)}{hint}, got {model_type!r}")
    return fam


def default_targets(model_type: str) -> tuple[str, ...]:
    """The family's default target modules for ``model_type`` (``ConfigError`` when it has no family)."""
    return family_of(model_type, hint=" (or pass target_modules explicitly)").target_modules


def prefix_cache_supported(model_type: str) -> bool:
    """Whether the frozen-prefix split is implemented for ``model_type`` (``False`` for unknown types)."""
    fam = find_family(model_type)
    return fam is not None and fam.prefix_cache


def layer_index(name: str) -> int | None:
    """The block index in module path ``name``, or ``None`` outside the repeated blocks."""
    m = LAYER_INDEX.search(f".{name}.")
    return int(m.group(1)) if m else None
