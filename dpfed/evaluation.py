"""Evaluation of the global model on the evaluator's test split.

Classification: accuracy and mean loss. Causal LM: mean token loss. Instruct: accuracy of greedy
generations (normalized match, :mod:`dpfed.generation`) and the mean response-token loss.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dpfed.data import TokenizedShard
from dpfed.generation import evaluate_instruct
from dpfed.instruct import InstructShard
from dpfed.privacy import per_example_loss

__all__ = ["evaluate"]


def evaluate(model: nn.Module, data: TokenizedShard | InstructShard, *, task: str, device: torch.device,
             batch_size: int, autocast_dtype: torch.dtype | None) -> dict[str, float]:
    """Accuracy and mean loss (classification), mean token loss (causal LM), or generation accuracy and response
    loss (instruct; ``data`` is an :class:`~dpfed.instruct.InstructShard`) on ``data``."""
    if task == "instruct":
        if not isinstance(data, InstructShard):
            raise TypeError(f"task 'instruct' evaluates an InstructShard, got {type(data).__name__}")
        return evaluate_instruct(model, data, max_new_tokens=data.max_new_tokens, batch_size=batch_size, device=device,
                                 autocast_dtype=autocast_dtype)
    correct, losses, n = 0, [], len(data)
    order = sorted(range(n), key=lambda i: len(data.ids[i]))  # length-sorted: little padding
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, n, batch_size):
            batch = data.batch(order[start:start + batch_size], device)
            if task == "classification":
                logits = model(batch["input_ids"], batch["attention_mask"], hidden=batch.get("hidden")).float()  # (B, K)
                losses.append(F.cross_entropy(logits, batch["labels"], reduction="none").cpu())
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                losses.append(per_example_loss(model, batch, task=task).float().cpu())
    out = {"eval_loss": float(torch.cat(losses).mean())}
    if task == "classification":
        out["accuracy"] = correct / n
    return out
