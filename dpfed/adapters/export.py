"""Export a trained LoRA-SB adapter: native B/A/R safetensors and a standard PEFT LoRA adapter.

PEFT's LoRA computes ``W0 x + (alpha / r) · lora_B lora_A x``. With ``alpha = r`` (scaling 1),
``lora_B = scale · B R`` (d_out, r) and ``lora_A = A`` (r, d_in) give exactly ``W0 + scale · B R A``.

A classifier's export carries its label mapping (``id2label``, ``label2id``: head index ↔ label,
as ``labels.json`` in the run directory) in ``adapter_config.json`` and in dpfed's own config file.

``base_model_name_or_path`` (and the model card's ``base_model``) is the run's ``model.name``: a hub
id or a local folder as given, or an embedded name (``embedded:all-minilm-l6-v2``) that
:func:`dpfed.model.resolve_model_path` turns into the installed folder, never a path into a virtualenv.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from dpfed.adapters.lorasb import LoRASBLinear
from dpfed.model import SequenceClassifier


def label_mapping(model: nn.Module) -> dict[str, dict]:
    """``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}`` of a classifier, ``{}`` otherwise.

    The mapping is the run's label set, set on the model's config by :func:`dpfed.runner.prepare`.
    """
    if not isinstance(model, SequenceClassifier):
        return {}
    id2label = {int(i): str(n) for i, n in (getattr(model.config, "id2label", None) or {}).items()}
    if sorted(id2label) != list(range(model.num_labels)):  # no mapping for this head (a model built outside prepare)
        return {}
    return {"id2label": {str(i): id2label[i] for i in sorted(id2label)},
            "label2id": {id2label[i]: i for i in sorted(id2label)}}


def _add_labels(peft_dir: Path, labels: dict[str, dict]) -> None:
    """Add the label mapping to the saved ``adapter_config.json`` (stock PEFT ignores the two keys on load)."""
    if not labels:
        return
    path = peft_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(labels)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def native_state(model: nn.Module, adapters: dict[str, LoRASBLinear]) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in adapters.items():
        out[f"{name}.B"] = layer.B.detach().float().cpu().contiguous()
        out[f"{name}.A"] = layer.A.detach().float().cpu().contiguous()
        out[f"{name}.R"] = layer.R.detach().float().cpu().contiguous()
    if isinstance(model, SequenceClassifier):
        out["head.weight"] = model.head.weight.detach().float().cpu().contiguous()
        out["head.bias"] = model.head.bias.detach().float().cpu().contiguous()
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every LoRA-SB or PEFT LoRA layer replaced by its base Linear."""
    from peft.tuners.lora import LoraLayer

    clean = copy.deepcopy(model)
    for name, mod in list(clean.named_modules()):
        if isinstance(mod, (LoRASBLinear, LoraLayer)):
            parent_name, _, child = name.rpartition(".")
            parent = clean.get_submodule(parent_name) if parent_name else clean
            setattr(parent, child, mod.base if isinstance(mod, LoRASBLinear) else mod.get_base_layer())
    return clean


def _name_base(base: nn.Module, base_model: str | None) -> None:
    """Record ``base_model`` as the (copied) base's name, which PEFT writes into the model card."""
    config = getattr(base, "config", None)
    if base_model is not None and config is not None and hasattr(config, "_name_or_path"):
        config._name_or_path = base_model


def to_peft(model: nn.Module, adapters: dict[str, LoRASBLinear], *, base_model: str | None = None) -> nn.Module:
    """A PEFT LoRA model (on a copy of the base) whose outputs equal ``model``'s; ``base_model``: the
    name saved as ``base_model_name_or_path`` (default: what PEFT finds, often None)."""
    from peft import LoraConfig, get_peft_model

    ranks = {layer.rank for layer in adapters.values()}
    if len(ranks) != 1:
        raise ValueError(f"PEFT export needs one rank for all layers, got {sorted(ranks)}")
    r = ranks.pop()
    base = unwrap(model)
    _name_base(base, base_model)
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(adapters), bias="none",
                     modules_to_save=["head"] if isinstance(model, SequenceClassifier) else None)
    peft_model = get_peft_model(base, cfg)
    if base_model is not None:  # get_peft_model sets it from the base object, which has no usable name
        peft_model.peft_config["default"].base_model_name_or_path = base_model
    with torch.no_grad():
        for name, layer in adapters.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.A)
            target.lora_B["default"].weight.copy_(layer.scale * (layer.B @ layer.R))
        if isinstance(model, SequenceClassifier):
            head = peft_model.base_model.model.head
            trained = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
            trained.weight.copy_(model.head.weight)
            trained.bias.copy_(model.head.bias)
    return peft_model


def export_adapters(model: nn.Module, adapters: dict[str, LoRASBLinear], out_dir: Path, *, task: str,
                    base_model: str) -> None:
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(native_state(model, adapters), str(out_dir / "lorasb.safetensors"))
    meta = {"format": "dpfed-lorasb/1", "base_model": base_model, "task": task,
            "rank": next(iter(adapters.values())).rank, "scale": next(iter(adapters.values())).scale,
            "target_modules": list(adapters),
            "load": "W = W0 + scale * B @ R @ A for each target module; head.* is the classification head",
            **label_mapping(model)}
    (out_dir / "lorasb_config.json").write_text(json.dumps(meta, indent=2) + "\n")
    # embeddings are never adapted: say so, or PEFT looks base_model_name_or_path up on the hub to check its vocabulary
    to_peft(model, adapters, base_model=base_model).save_pretrained(str(out_dir / "peft"), save_embedding_layers=False)
    _add_labels(out_dir / "peft", label_mapping(model))


def export_lora(model: nn.Module, layers: dict[str, nn.Module], out_dir: Path, *, method: str, task: str,
                base_model: str, initial_base: dict[str, torch.Tensor]) -> None:
    """A LoRA baseline's result as a standard PEFT adapter (``out_dir/peft``).

    FedEx-LoRA and FLoRA change the base weights of the adapted layers (they fold into W0);
    those layers' ``W0_now − W0_pretrained`` go to ``out_dir/base_delta.safetensors``, which must be
    added to the base model before the PEFT adapter is applied.
    """
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    from dpfed.adapters.lora import ADAPTER, factors

    out_dir.mkdir(parents=True, exist_ok=True)
    first = next(iter(layers.values()))
    r = first.r[ADAPTER]
    alpha = first.lora_alpha[ADAPTER]
    base = unwrap(model)
    if hasattr(base, "peft_config"):  # left by inject_adapter_in_model; the export builds a fresh PEFT model
        del base.peft_config
    _name_base(base, base_model)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(layers), bias="none",
                     modules_to_save=["head"] if isinstance(model, SequenceClassifier) else None)
    deltas = {}
    with torch.no_grad():
        for name in layers:  # the exported base is the pretrained one; folds go to base_delta
            w = base.get_submodule(name).weight
            deltas[name] = (w.detach().float() - initial_base[name].float()).cpu().contiguous()
            w.copy_(initial_base[name].to(w))
    peft_model = get_peft_model(base, cfg)
    if base_model is not None:  # get_peft_model sets it from the base object, which has no usable name
        peft_model.peft_config["default"].base_model_name_or_path = base_model
    with torch.no_grad():
        for name, layer in layers.items():
            B, A = factors(layer)
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(A)
            target.lora_B["default"].weight.copy_(B)
        if isinstance(model, SequenceClassifier):
            head = peft_model.base_model.model.head
            trained = head.modules_to_save["default"] if hasattr(head, "modules_to_save") else head
            trained.weight.copy_(model.head.weight)
            trained.bias.copy_(model.head.bias)
    peft_model.save_pretrained(str(out_dir / "peft"), save_embedding_layers=False)  # embeddings never adapted
    _add_labels(out_dir / "peft", label_mapping(model))
    folded = any(float(d.abs().max()) > 0 for d in deltas.values())
    if folded:
        save_file({f"{n}.weight": d for n, d in deltas.items()}, str(out_dir / "base_delta.safetensors"))
    meta = {"format": "dpfed-lora/1", "method": method, "base_model": base_model, "task": task, "rank": r,
            "lora_alpha": alpha, "target_modules": list(layers), "peft_adapter": "peft",
            "base_delta": "base_delta.safetensors" if folded else None,
            "load": ("add base_delta to the adapted layers' weights, then load the PEFT adapter" if folded
                     else "load the PEFT adapter on the pretrained base"), **label_mapping(model)}
    (out_dir / "lora_config.json").write_text(json.dumps(meta, indent=2) + "\n")
