"""Communication cost of federated LoRA methods: pure arithmetic on layer shapes.

Nothing here imports torch or touches a model: the shapes come from a Hugging Face
``config.json`` (a bundled one under ``configs/models/`` or any path). Every count is an
exact integer number of parameters; bytes are parameters times the bytes per number of the
chosen dtype.

Two views are offered, and they answer different questions:

* :func:`method_comm` / :func:`compare_methods`: the honest per-round traffic of each
  method (upload and download per client, and the sum over all clients), following the
  payloads that the method's aggregation actually needs (REFERENCE.md, "Baselines").
* :func:`paper_communication`: the single number per method that the Fed-SB paper
  (arXiv 2502.15436) reports as "communication cost", which is what its "up to 230x"
  compares. It is not the traffic of a round; see its docstring for what it counts.

Per adapted linear layer ``W0`` of shape ``(d_out, d_in)``, rank ``r``, ``c`` clients:

===========  ===================  =========================================  ==================
method       up per client        down per client                            paper counts
===========  ===================  =========================================  ==================
fedit        r(d_in+d_out)        r(d_in+d_out) (mean A, mean B)             r(d_in+d_out)
ffa-lora     r·d_out              r·d_out (mean B)                           r·d_out
fedex-lora   r(d_in+d_out)        r(d_in+d_out) + d_in·d_out (dense resid.)  c·r(d_in+d_out)
flora        r(d_in+d_out)        c·r(d_in+d_out) (all clients' A, B)        c·r(d_in+d_out)
fed-sb       r²                   r² (mean R)                                r²
===========  ===================  =========================================  ==================
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfed.errors import ConfigError
from dpfed.families import FAMILIES, family_of
from dpfed.method_specs import METHOD_NAMES, Traffic, method_spec

METHODS: tuple[str, ...] = METHOD_NAMES
"""Methods this module knows, in display order (Fed-SB first: ratios are relative to it)."""

DTYPE_BYTES: Mapping[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per transmitted number for each supported dtype."""

BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"
"""Where the bundled shape files live (``configs/models/<name>.json`` in the repository)."""

DECODER_MODEL_TYPES = FAMILIES["llama"].model_types
"""Llama-style decoders with separate q/k/v/o and gate/up/down projections (``dpfed.families``)."""

BERT_MODEL_TYPES = FAMILIES["bert"].model_types
"""BERT-style encoders (``attention.self.{query,key,value}``, ``attention.output.dense``, ...)."""

DECODER_MODULES: tuple[str, ...] = FAMILIES["llama"].target_modules
BERT_MODULES: tuple[str, ...] = FAMILIES["bert"].target_modules


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LinearShape:
    """One adapted linear layer: ``y = W0 x`` with ``W0`` of shape ``(d_out, d_in)``."""

    name: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class ModelShape:
    """The adaptable linear layers of one transformer block, repeated ``num_layers`` times.

    ``modules`` holds the *selected* target modules of one block (all of the family's
    modules unless narrowed with :meth:`select`); every count in this module is summed over
    ``modules`` and multiplied by ``num_layers``.
    """

    name: str
    model_type: str
    num_layers: int
    modules: tuple[LinearShape, ...]
    source: str | None = None

    @property
    def module_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modules)

    def select(self, target_modules: Iterable[str] | None) -> ModelShape:
        """Keep only ``target_modules`` (exact names, family order); ``None`` keeps all.

        Raises ``ConfigError`` for an unknown or repeated name, or an empty selection.
        """
        if target_modules is None:
            return self
        raw = [str(t) for t in target_modules]
        wanted = [t.strip() for t in raw]
        if not wanted or any(not t for t in wanted):
            raise ConfigError(f"target_modules must be a non-empty list of module names, got {raw!r}")
        known = self.module_names
        for t in wanted:
            if t not in known:
                raise ConfigError(
                    f"target_modules must be among {', '.join(known)} for model_type "
                    f"'{self.model_type}', got '{t}'"
                )
        if len(set(wanted)) != len(wanted):
            raise ConfigError(f"target_modules must not repeat a module, got {wanted!r}")
        chosen = tuple(m for m in self.modules if m.name in wanted)
        return ModelShape(self.name, self.model_type, self.num_layers, chosen, self.source)


def bundled_models() -> tuple[str, ...]:
    """Names of the bundled shape files (``configs/models/*.json`` without the suffix)."""
    if not BUNDLED_MODELS_DIR.is_dir():
        return ()
    return tuple(sorted(p.stem for p in BUNDLED_MODELS_DIR.glob("*.json")))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"model config must be readable JSON, got {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config must be a JSON object, got {type(data).__name__} in {str(path)!r}")
    return data


def load_model_config(model: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Return ``(name, config)`` for a config mapping, a path, or a bundled model name.

    A path may name a ``config.json`` file or a directory holding one. A string that is not
    an existing path is looked up among :func:`bundled_models` (case-insensitive, with or
    without ``.json``) and then among their ``_source`` model ids (e.g. ``google/gemma-2-9b``).
    """
    if isinstance(model, Mapping):
        cfg = dict(model)
        return str(cfg.get("_name_or_path") or cfg.get("_source") or cfg.get("model_type", "config")), cfg
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return str(model), _read_json(path)
    key = str(model).strip().lower().removesuffix(".json")
    names = bundled_models()
    if key in names:
        return key, _read_json(BUNDLED_MODELS_DIR / f"{key}.json")
    for name in names:
        cfg = _read_json(BUNDLED_MODELS_DIR / f"{name}.json")
        if str(cfg.get("_source", "")).lower() == key:
            return name, cfg
    raise ConfigError(
        f"model must be a bundled name ({', '.join(names) or 'none installed'}) "
        f"or a path to a config.json, got {str(model)!r}"
    )


def _positive_int(cfg: Mapping[str, Any], field: str, model_type: str) -> int:
    value = cfg.get(field)
    if value is None:
        raise ConfigError(f"config field '{field}' is required for model_type '{model_type}', got none")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config field '{field}' must be a positive integer, got {value!r}")
    return value


def model_shape(
    model: str | os.PathLike[str] | Mapping[str, Any],
    *,
    target_modules: Iterable[str] | None = None,
) -> ModelShape:
    """Per-layer ``(d_in, d_out)`` of every adaptable linear layer, from an HF config.

    Decoders (Llama, Mistral, Qwen2/3, Gemma 1/2/3): q_proj ``h → n_heads·head_dim``,
    k_proj and v_proj ``h → n_kv_heads·head_dim`` (grouped-query attention), o_proj
    ``n_heads·head_dim → h``, gate_proj/up_proj ``h → I``, down_proj ``I → h``; ``head_dim``
    is the config's (Gemma-2 has 256) or ``h / n_heads``; ``n_kv_heads`` defaults to
    ``n_heads``. BERT-style encoders: query, key, value, attention.output.dense ``h → h``,
    intermediate.dense ``h → I``, output.dense ``I → h``. Embeddings, heads, biases and
    norms are not adaptable here. A config nesting its text model under ``text_config``
    (multimodal wrappers) is read from there.
    """
    name, cfg = load_model_config(model)
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = {**cfg["text_config"], "_source": cfg.get("_source")}
    model_type = str(cfg.get("model_type", ""))
    h = _positive_int(cfg, "hidden_size", model_type)
    inter = _positive_int(cfg, "intermediate_size", model_type)
    layers = _positive_int(cfg, "num_hidden_layers", model_type)
    heads = _positive_int(cfg, "num_attention_heads", model_type)
    family = family_of(model_type)
    dims = {"hidden": h, "intermediate": inter}
    symbols = {s for pair in family.modules.values() for s in pair}
    if symbols & {"q", "kv"}:  # attention projections sized by heads (grouped-query attention)
        kv_heads = _positive_int(cfg, "num_key_value_heads", model_type) if cfg.get(
            "num_key_value_heads") is not None else heads
        if cfg.get("head_dim") is not None:
            head_dim = _positive_int(cfg, "head_dim", model_type)
        elif h % heads == 0:
            head_dim = h // heads
        else:
            raise ConfigError(
                f"hidden_size must be divisible by num_attention_heads = {heads} when head_dim "
                f"is absent, got {h}"
            )
        dims.update(q=heads * head_dim, kv=kv_heads * head_dim)
    modules = tuple(LinearShape(m, dims[d_in], dims[d_out]) for m, (d_in, d_out) in family.modules.items())
    shape = ModelShape(name, model_type, layers, modules, cfg.get("_source"))
    return shape.select(target_modules)


# --------------------------------------------------------------------------- validation


def dtype_bytes(dtype: str) -> int:
    """Bytes per number for ``dtype`` (fp32 → 4, bf16 and fp16 → 2)."""
    key = str(dtype).strip().lower()
    if key not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[key]


def _check_method(method: str) -> str:
    method_spec(method)
    return method


def _check_clients(clients: int) -> int:
    if isinstance(clients, bool) or not isinstance(clients, int) or clients < 1:
        raise ConfigError(f"clients must be an integer >= 1, got {clients!r}")
    return clients


def check_rank(shape: ModelShape, rank: int, *, method: str | None = None) -> int:
    """Reject a rank below 1 or above ``min(d_in, d_out)`` of any selected module."""
    where = f" (method {method})" if method else ""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank must be an integer >= 1{where}, got {rank!r}")
    for m in shape.modules:
        limit = min(m.d_in, m.d_out)
        if rank > limit:
            raise ConfigError(
                f"rank must be <= min(d_in, d_out) = {limit} for module '{m.name}'{where}, got {rank}"
            )
    return rank


# --------------------------------------------------------------------------- formulas


def module_traffic(method: str, *, rank: int, clients: int, d_in: int, d_out: int) -> Traffic:
    """Per-round parameters of one adapted layer for one client (REFERENCE.md, "Baselines").

    FedIT: A (r×d_in) and B (d_out×r) up, their means down. FFA-LoRA: B only both ways (A
    is frozen from a shared seed). FedEx-LoRA: A and B up; mean A, mean B and the dense
    residual ``mean(B_i A_i) − mean(B) mean(A)`` (d_out×d_in) down. FLoRA: A and B up; all
    ``c`` clients' A and B stacked (rank c·r) down. Fed-SB (arXiv 2502.15436, Sec. 3):
    R (r×r) up, mean R down. The formulas are the methods' specs (``dpfed.method_specs``).
    """
    return method_spec(method).traffic(rank=rank, clients=clients, d_in=d_in, d_out=d_out)


def module_setup_down(method: str, *, rank: int, d_in: int, d_out: int) -> int:
    """One-off parameters a client downloads before round 1 for one layer.

    Fed-SB: the server's frozen B and A (from one SVD estimate), r(d_in+d_out). The LoRA
    baselines start from a shared seed (A random, B = 0): nothing to download.
    """
    return method_spec(method).setup_params(rank=rank, d_in=d_in, d_out=d_out)


@dataclass(frozen=True)
class MethodComm:
    """Per-round communication of one method on one model (all layers, selected modules).

    ``params_up`` / ``params_down`` are per client per round; ``total_*`` sum over the
    ``clients`` clients of a round (server ↔ clients traffic, up plus down).
    ``setup_params_down`` is the one-off download before round 1 (per client).
    ``paper_params`` is :func:`paper_communication` for the same setting.
    """

    method: str
    rank: int
    clients: int
    dtype: str
    bytes_per_param: int
    params_up: int
    params_down: int
    setup_params_down: int
    paper_params: int

    @property
    def bytes_up(self) -> int:
        return self.params_up * self.bytes_per_param

    @property
    def bytes_down(self) -> int:
        return self.params_down * self.bytes_per_param

    @property
    def total_params_up(self) -> int:
        return self.clients * self.params_up

    @property
    def total_params_down(self) -> int:
        return self.clients * self.params_down

    @property
    def total_params(self) -> int:
        return self.total_params_up + self.total_params_down

    @property
    def total_bytes(self) -> int:
        return self.total_params * self.bytes_per_param

    def as_dict(self) -> dict[str, Any]:
        b = self.bytes_per_param
        return {
            "method": self.method,
            "rank": self.rank,
            "per_client_per_round": {
                "params_up": self.params_up,
                "params_down": self.params_down,
                "bytes_up": self.bytes_up,
                "bytes_down": self.bytes_down,
            },
            "all_clients_per_round": {
                "params_up": self.total_params_up,
                "params_down": self.total_params_down,
                "params_total": self.total_params,
                "bytes_up": self.total_params_up * b,
                "bytes_down": self.total_params_down * b,
                "bytes_total": self.total_bytes,
            },
            "setup_per_client": {
                "params_down": self.setup_params_down,
                "bytes_down": self.setup_params_down * b,
            },
            "paper_params": self.paper_params,
        }


def paper_communication(shape: ModelShape, method: str, *, rank: int, clients: int) -> int:
    """Parameters as the Fed-SB paper (arXiv 2502.15436) counts "communication cost".

    Summed over ``shape.num_layers`` layers and the selected modules, per layer:

    * fed-sb: ``r²`` (one R);
    * fedit: ``r(d_in+d_out)`` (one A and one B);
    * ffa-lora: ``r·d_out`` (one B; the paper quotes no FFA-LoRA figure: assumed by analogy);
    * flora and fedex-lora: ``c·r(d_in+d_out)`` (the c clients' stacked A and B, i.e. what
      every client downloads in FLoRA; the paper counts FedEx-LoRA the same way).

    This reproduces the paper's numbers: Gemma-2-9B, 25 clients, FLoRA/FedEx-LoRA r = 32 →
    2,700,902,400 vs Fed-SB r = 200 → 11,760,000 (229.7×, "up to 230x"); Mistral-7B FedIT
    r = 32 → 83,886,080 vs Fed-SB r = 200 → 8,960,000.

    Counted: the size of one adapter message of one round (for FLoRA/FedEx-LoRA, the
    aggregate of c client adapters). Not counted: the other direction (upload vs download),
    the number of clients that send or receive it (except through FLoRA's stack), FedEx-
    LoRA's dense ``d_out×d_in`` residual (the reference code adds it to ``W0``), Fed-SB's
    one-off B and A broadcast, the number of rounds, bytes per number, and anything outside
    the adapted modules (classifier heads, norms, biases). For real traffic use
    :func:`method_comm`.
    """
    _check_method(method)
    _check_clients(clients)
    check_rank(shape, rank, method=method)
    spec = method_spec(method)
    per_layer = sum(spec.paper_params(rank=rank, clients=clients, d_in=m.d_in, d_out=m.d_out) for m in shape.modules)
    return shape.num_layers * per_layer


def method_comm(
    shape: ModelShape, method: str, *, rank: int, clients: int, dtype: str = "fp32"
) -> MethodComm:
    """Honest per-round traffic of ``method`` on ``shape`` (see :func:`module_traffic`).

    Not counted: message framing and protocol overhead, compression or quantisation of
    payloads, client sampling (``clients`` is the number taking part in the round),
    modules outside the selection (classifier heads, embeddings, norms, biases), and the
    base model that every client is assumed to hold already.
    """
    _check_method(method)
    _check_clients(clients)
    nbytes = dtype_bytes(dtype)
    check_rank(shape, rank, method=method)
    up = down = setup = 0
    for m in shape.modules:
        t = module_traffic(method, rank=rank, clients=clients, d_in=m.d_in, d_out=m.d_out)
        up += t.up
        down += t.down
        setup += module_setup_down(method, rank=rank, d_in=m.d_in, d_out=m.d_out)
    n = shape.num_layers
    return MethodComm(
        method=method,
        rank=rank,
        clients=clients,
        dtype=str(dtype).strip().lower(),
        bytes_per_param=nbytes,
        params_up=n * up,
        params_down=n * down,
        setup_params_down=n * setup,
        paper_params=paper_communication(shape, method, rank=rank, clients=clients),
    )


def compare_methods(
    shape: ModelShape,
    ranks: Mapping[str, int | Sequence[int]],
    *,
    clients: int,
    dtype: str = "fp32",
) -> tuple[MethodComm, ...]:
    """:func:`method_comm` for every ``(method, rank)`` in ``ranks``, in :data:`METHODS` order.

    Everything is validated before anything is computed, so a bad rank for the last method
    fails as fast as one for the first.
    """
    _check_clients(clients)
    dtype_bytes(dtype)
    if not ranks:
        raise ConfigError("ranks must name at least one method, got none")
    plan: list[tuple[str, int]] = []
    for method in ranks:
        _check_method(method)
    for method in METHODS:
        if method not in ranks:
            continue
        value = ranks[method]
        values = (value,) if isinstance(value, int) else tuple(value)
        if not values:
            raise ConfigError(f"rank for method {method} must be given, got an empty list")
        for r in values:
            check_rank(shape, r, method=method)
            plan.append((method, r))
    return tuple(method_comm(shape, m, rank=r, clients=clients, dtype=dtype) for m, r in plan)


def ratios_vs_fed_sb(rows: Sequence[MethodComm]) -> dict[tuple[str, int], list[dict[str, float | int]]]:
    """For each row, its cost over each Fed-SB row's: total bytes per round and paper count.

    Keyed by ``(method, rank)``; each value lists one entry per Fed-SB rank present
    (empty when no Fed-SB row is present).
    """
    refs = [r for r in rows if r.method == "fed-sb"]
    out: dict[tuple[str, int], list[dict[str, float | int]]] = {}
    for row in rows:
        out[(row.method, row.rank)] = [
            {
                "fed_sb_rank": ref.rank,
                "total_bytes_ratio": row.total_bytes / ref.total_bytes,
                "paper_params_ratio": row.paper_params / ref.paper_params,
            }
            for ref in refs
        ]
    return out


# --------------------------------------------------------------------------- parsing


_NAMED_RANK = re.compile(r"^\s*([a-z][a-z-]*)\s*=\s*(\S+)\s*$", re.IGNORECASE)


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{what} must be an integer, got {text.strip()!r}") from None


def parse_rank_spec(spec: str) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """Parse ``"32"``, ``"16,32"`` or ``"fed-sb=200,fedit=32,32"``.

    Returns ``(default_ranks, named)``: unnamed values apply to every method without a
    named rank; a method may be named more than once to compare several of its ranks.
    """
    items = [s for s in str(spec).split(",")]
    if not str(spec).strip() or any(not s.strip() for s in items):
        raise ConfigError(f"rank must be a comma list of N or METHOD=N, got {spec!r}")
    default: list[int] = []
    named: dict[str, list[int]] = {}
    for item in items:
        match = _NAMED_RANK.match(item)
        if match:
            method = match.group(1).lower()
            _check_method(method)
            value = _parse_int(match.group(2), f"rank for method {method}")
            bucket = named.setdefault(method, [])
        else:
            value = _parse_int(item, "rank")
            bucket = default
        if value in bucket:
            raise ConfigError(f"rank must not repeat a value for the same method, got {value} twice in {spec!r}")
        bucket.append(value)
    return tuple(default), {m: tuple(v) for m, v in named.items()}


def resolve_ranks(spec: str, methods: Sequence[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Ranks per method from a ``--rank`` spec and an optional ``--methods`` list.

    Without ``methods``: all methods if the spec has an unnamed value, else the named ones.
    With ``methods``: each needs a rank (named or unnamed), and a named method must be listed.
    """
    default, named = parse_rank_spec(spec)
    if methods is None:
        chosen = list(METHODS) if default else [m for m in METHODS if m in named]
    else:
        chosen = [_check_method(m) for m in methods]
        if not chosen:
            raise ConfigError("methods must name at least one method, got none")
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"methods must not repeat a method, got {list(methods)!r}")
        for m in named:
            if m not in chosen:
                raise ConfigError(f"rank names method {m}, which must then be in methods, got {', '.join(chosen)}")
    out: dict[str, tuple[int, ...]] = {}
    for m in chosen:
        ranks = named.get(m, default)
        if not ranks:
            raise ConfigError(f"rank must be given for method {m} (as {m}=N or an unnamed N), got none")
        out[m] = ranks
    return out


def parse_name_list(text: str, what: str) -> list[str]:
    """Split a comma list, rejecting empty items (``what`` names the parameter)."""
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise ConfigError(f"{what} must be a comma list of names, got {text!r}")
    return items
