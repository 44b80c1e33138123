"""Per-record losses of a model, and the membership scores built from them. Higher score = "member".

* loss attack (Yeom et al., arXiv 1709.01604): ``score = -loss_final``;
* loss reduction, the one-run audit's canary score (Steinke, Nasr & Jagielski, arXiv 2305.08846,
  Sec. 5): ``score = loss_initial - loss_final``;
* reference attack (the likelihood-ratio idea of Carlini et al., arXiv 2112.03570, and RMIA, Zarifzadeh et
  al., arXiv 2312.03262, with one free reference model): ``score = -(loss_final - loss_reference)``,
  the log-likelihood ratio of the record under the final and the reference model. Here the reference
  is the model before federated fine-tuning (base weights, initial adapter and head), which saw no
  private record, so this score equals the loss reduction.

The loss is :func:`dpfed.privacy.per_example_loss`: cross-entropy of the record's label
(classification), mean next-token loss (causal LM), or, for instruct, the training loss: mean
next-token loss over the response tokens only, the prompt masked (:func:`dpfed.instruct.response_loss`
on the records tokenised as in training, :func:`dpfed.instruct.tokenize_instruct`); in float32
without autocast.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from dpfed.data import Records, tokenize
from dpfed.instruct import PromptResponseRecords, tokenize_instruct
from dpfed.privacy import per_example_loss

__all__ = ["per_record_loss", "loss_score", "loss_reduction", "reference_score"]


def per_record_loss(
    model: nn.Module,
    records: Records,
    tokenizer,
    *,
    task: str,
    max_length: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> np.ndarray:
    """Loss of every record under ``model`` (eval mode, no gradient), in record order, shape (n,).

    Task ``instruct``: ``records`` are :class:`dpfed.instruct.PromptResponseRecords`, rendered as the
    run rendered them (``chat_template``, ``system_prompt``: the run's ``model.chat_template`` and
    ``data.system_prompt``); the loss is over the response tokens only.
    """
    if task == "classification" and records.labels is None:
        raise ValueError("records must have labels for task 'classification'; got labels None")
    if task == "instruct" and not isinstance(records, PromptResponseRecords):
        raise ValueError(f"records must be PromptResponseRecords for task 'instruct'; got {type(records).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    n = len(records)
    out = np.empty(n, dtype=np.float64)
    if n == 0:
        return out
    if task == "instruct":  # prompt and response tokens as in training; labels -100 on the prompt
        shard = tokenize_instruct(records, tokenizer, max_length=max_length, chat_template=chat_template,
                                  system_prompt=system_prompt, model_config=model.config)
    else:
        shard = tokenize(records, tokenizer, max_length=max_length)
    order = sorted(range(n), key=lambda i: len(shard.ids[i]))  # length-sorted: little padding
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = order[start:start + batch_size]
                batch = shard.batch(idx, device)
                losses = per_example_loss(model, batch, task=task).float().cpu().numpy()  # (B,)
                out[idx] = losses
    finally:
        model.train(was_training)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"losses must be finite; got {int(np.sum(~np.isfinite(out)))} non-finite values")
    return out


def loss_score(loss_final: np.ndarray) -> np.ndarray:
    """Loss attack: ``-loss_final`` (low loss = member)."""
    return -np.asarray(loss_final, dtype=np.float64)


def loss_reduction(*, loss_initial: np.ndarray, loss_final: np.ndarray) -> np.ndarray:
    """``loss_initial - loss_final``: how much training lowered the record's loss."""
    a = np.asarray(loss_initial, dtype=np.float64)
    b = np.asarray(loss_final, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"loss_initial and loss_final must have the same shape; got {a.shape} and {b.shape}")
    return a - b


def reference_score(*, loss_final: np.ndarray, loss_reference: np.ndarray) -> np.ndarray:
    """Reference attack: ``-(loss_final - loss_reference)``, the log-likelihood ratio final / reference."""
    return loss_reduction(loss_initial=loss_reference, loss_final=loss_final)
