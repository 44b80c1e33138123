"""Evaluation by generation (``model.task: instruct``): greedy decoding of held-out prompts, matched to the references.

Prompts are left-padded into batches (positions counted from each prompt's first token, as
``transformers``' ``generate`` does), decoded greedily for at most ``max_new_tokens`` tokens or
until an end-of-turn token, and scored two ways:

- exact match: the generated text, stripped of surrounding whitespace, equals the reference;
- normalized match: :func:`normalize_answer` of both agree (lowercase, punctuation and
  whitespace stripped, first word only): "Positive." matches "positive".

When the evaluator's shard carries the frozen-prefix cache (:mod:`dpfed.instruct`), the prompt
runs only through the layers above the cache, on the cached states and the frozen layers'
cached keys and values; the decoding steps run through every layer. A test checks this path
against ``model.generate`` on the full model.
"""

from __future__ import annotations

import inspect
import logging
import re
import unicodedata
from dataclasses import dataclass

import torch
from torch import nn

from dpfed.instruct import DecoderSplit, InstructShard, lm_logits, response_loss

log = logging.getLogger(__name__)

__all__ = ["GenerationScores", "normalize_answer", "greedy_generate", "score_generation", "evaluate_instruct"]

_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and surrounding whitespace stripped, first word only ('' when nothing is left)."""
    text = unicodedata.normalize("NFKC", text).lower()
    words = _PUNCT.sub(" ", text).split()
    return words[0] if words else ""


@dataclass(frozen=True)
class GenerationScores:
    """Greedy generations of the held-out prompts and their two accuracies."""

    predictions: tuple[str, ...]
    references: tuple[str, ...]

    @property
    def exact_match(self) -> float:
        n = len(self.references)
        return sum(p.strip() == r.strip() for p, r in zip(self.predictions, self.references)) / n if n else float("nan")

    @property
    def normalized_match(self) -> float:
        n = len(self.references)
        return (sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(self.predictions, self.references)) / n
                if n else float("nan"))


def _left_pad(rows: list[torch.Tensor], length: int, *, dim: int) -> torch.Tensor:
    """Stack tensors whose size along ``dim`` varies, zero-padded on the left of ``dim`` to ``length``."""
    out = []
    for t in rows:
        pad = length - t.shape[dim]
        if pad:
            shape = list(t.shape)
            shape[dim] = pad
            t = torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)
        out.append(t)
    return torch.stack(out, 0)


def _cache_kw(decoder: nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def greedy_generate(model: nn.Module, shard: InstructShard, indices: list[int], *, max_new_tokens: int,
                    device: torch.device | str) -> list[list[int]]:
    """Greedy continuations of the prompts of records ``indices`` (one batch), each cut after its first stop token."""
    from transformers import DynamicCache

    device = torch.device(device)
    dec = model.get_decoder()
    kw = _cache_kw(dec)
    plens = [shard.prompt_lengths[i] for i in indices]
    longest = max(plens)
    ids = torch.full((len(indices), longest), shard.pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, (i, p) in enumerate(zip(indices, plens)):
        ids[row, longest - p:] = torch.tensor(shard.ids[i][:p], dtype=torch.long)
        mask[row, longest - p:] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, L): each prompt's own positions 0..p-1
    cache = DynamicCache(config=dec.config)
    if shard.prefix is not None and shard.kv is not None:
        shard.ensure_prefix(indices, device)
        split = shard.prefix
        for j in range(split.start):  # the frozen layers' keys/values of the prompts, left-padded
            k = _left_pad([shard.kv[i][j][0] for i in indices], longest, dim=1).to(device)  # (B, kv_heads, L, hd)
            v = _left_pad([shard.kv[i][j][1] for i in indices], longest, dim=1).to(device)
            cache.update(k, v, j)
        hidden = _left_pad([shard.hidden[i][:p] for i, p in zip(indices, plens)], longest, dim=0).to(device)  # (B, L, d)
        # the top layers of the model under evaluation: the shard's split may hold another model with the same frozen
        # layers (dpfed compare reuses one job's shards for every method)
        last = DecoderSplit(model, split.start).top(hidden, mask, position_ids=pos, cache=cache)[:, -1]  # (B, d)
    else:
        last = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   **{kw: cache}).last_hidden_state[:, -1]  # (B, d)
    stops = torch.tensor(shard.stops or (-1,), device=device)
    done = torch.zeros(len(indices), dtype=torch.bool, device=device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        nxt = lm_logits(model, last).float().argmax(-1)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, shard.pad_id), nxt)
        out.append(nxt)
        done = done | torch.isin(nxt, stops)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        last = dec(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                   **{kw: cache}).last_hidden_state[:, -1]
    gen = torch.stack(out, 1).cpu().tolist() if out else [[] for _ in indices]
    result = []
    for row in gen:
        keep = []
        for t in row:
            keep.append(t)
            if t in shard.stops:
                break
        result.append(keep)
    return result


def score_generation(model: nn.Module, shard: InstructShard, *, max_new_tokens: int, batch_size: int,
                     device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> GenerationScores:
    """Greedy generations for every record of ``shard``, decoded, with the references (length-sorted batches)."""
    device = torch.device(device)
    order = sorted(range(len(shard)), key=lambda i: shard.prompt_lengths[i])
    preds: dict[int, str] = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            for i, toks in zip(idx, greedy_generate(model, shard, idx, max_new_tokens=max_new_tokens, device=device)):
                preds[i] = shard.decode(toks) if shard.decode is not None else " ".join(map(str, toks))
    return GenerationScores(tuple(preds[i] for i in range(len(shard))), tuple(shard.responses))


def evaluate_instruct(model: nn.Module, shard: InstructShard, *, max_new_tokens: int, batch_size: int,
                      device: torch.device | str, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """``accuracy`` (normalized match of greedy generations) and ``eval_loss`` (mean response-token loss per record).

    The exact-match accuracy is logged (``dpfed.generation``, INFO); the metrics line carries the
    fields that ``dpfed.release`` declares.
    """
    device = torch.device(device)
    losses = []
    order = sorted(range(len(shard)), key=lambda i: len(shard.ids[i]))
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, len(order), batch_size):
            batch = shard.batch(order[start:start + batch_size], device)
            losses.append(response_loss(model, batch).float().cpu())
    scores = score_generation(model, shard, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device,
                              autocast_dtype=autocast_dtype)
    log.info("generation on %d held-out prompts: normalized match %.4f, exact match %.4f", len(shard),
             scores.normalized_match, scores.exact_match)
    return {"accuracy": scores.normalized_match, "eval_loss": float(torch.cat(losses).mean())}

