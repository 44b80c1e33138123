"""What travels in a Flower message of this app, and the check every site reply must pass.

Server → site (``train``): ``arrays`` (the global trainable state: every R and the head),
``config`` (round, the dpfed run config as YAML, the split seed, the label names, the planned
σ, the digest of the frozen factors). The handshake (``query``) carries the same ``config``
and, once per site, ``frozen`` (the shared B and A), which the site keeps in its Flower
context. Site → server: ``arrays`` (its new state), ``metrics`` and ``site`` (its id, round and
the privacy events it recorded in its own ledger), or ``refusal`` (why it did not train:
its budget, a config it will not accept).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from dpfed.payload import Manifest

ARRAYS, FROZEN, CONFIG, METRICS, SITE, REFUSAL = "arrays", "frozen", "config", "metrics", "site", "refusal"
STATE_KEY = "dpfed-frozen"  # the site's Flower context: the frozen factors it received in the handshake
FLOAT32 = "float32"


class ReplyError(ValueError):
    """A site reply that must not be averaged; the message says which check failed."""


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Name → tensor as an :class:`ArrayRecord` of float32 numpy arrays (sorted names)."""
    return ArrayRecord({n: Array(state[n].detach().to("cpu", torch.float32).contiguous().numpy())
                        for n in sorted(state)})


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(np.array(record[n].numpy(), copy=True)) for n in record}


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes and little-endian float32 values."""
    h = hashlib.sha256()
    for n in sorted(state):
        t = state[n].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{n}:{'x'.join(map(str, t.shape))};".encode())
        h.update(t.numpy().astype("<f4").tobytes())
    return h.hexdigest()


def run_record(*, server_round: int, cfg_yaml: str, split_seed: int, label_names: tuple[str, ...],
               noise_multiplier: float | None, frozen_sha256: str) -> ConfigRecord:
    return ConfigRecord({
        "server-round": int(server_round), "dpfed-config": cfg_yaml, "split-seed": str(split_seed),
        "label-names": json.dumps(list(label_names)),
        "noise-multiplier": -1.0 if noise_multiplier is None else float(noise_multiplier),
        "frozen-sha256": frozen_sha256,
    })


@dataclass(frozen=True)
class RunMessage:
    """The server's ``config`` record, parsed (the site validates the YAML itself)."""

    server_round: int
    cfg_yaml: str
    split_seed: int
    label_names: tuple[str, ...]
    noise_multiplier: float | None
    frozen_sha256: str


def parse_run_record(record: ConfigRecord) -> RunMessage:
    from dpfed.errors import ConfigError

    try:
        sigma = float(record["noise-multiplier"])
        labels = json.loads(str(record["label-names"]))
        out = RunMessage(int(record["server-round"]), str(record["dpfed-config"]), int(str(record["split-seed"])),
                         tuple(str(x) for x in labels), None if sigma < 0 else sigma, str(record["frozen-sha256"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"server message config must carry round, dpfed-config, split-seed, label-names, "
                          f"noise-multiplier and frozen-sha256, got {sorted(record)} ({type(exc).__name__})") from None
    if out.noise_multiplier is not None and not math.isfinite(out.noise_multiplier):
        raise ConfigError(f"noise-multiplier from the server must be finite, got {out.noise_multiplier}")
    return out


def refusal(reason: str, *, site_id: str, server_round: int) -> RecordDict:
    return RecordDict({REFUSAL: ConfigRecord({"reason": reason, "site-id": site_id, "round": int(server_round)})})


def reply_record(*, state: Mapping[str, torch.Tensor], site_id: str, server_round: int, num_examples: int,
                 events: list[dict[str, Any]], steps: int, epsilon_spent: float | None) -> RecordDict:
    """A site's reply; every field passes :func:`dpfed.release.release` (channel ``site_reply``) first."""
    from dpfed.release import release

    release("site_reply", {"state": state, "site_id": site_id, "round": server_round, "num_examples": num_examples,
                           "events": events, "steps": steps, "epsilon_spent": epsilon_spent}, unit="both")
    metrics = {"num-examples": int(num_examples), "steps": int(steps)}
    if epsilon_spent is not None:
        metrics["epsilon-spent"] = float(epsilon_spent)
    return RecordDict({
        ARRAYS: to_record(state),
        METRICS: MetricRecord(metrics),
        SITE: ConfigRecord({"site-id": site_id, "round": int(server_round), "events": json.dumps(events)}),
    })


@dataclass(frozen=True)
class Accepted:
    """A reply that passed :func:`check_reply`: what the aggregation and the server's records use."""

    site_id: str
    state: dict[str, torch.Tensor]
    num_examples: int
    events: tuple
    metrics: dict[str, float]
    flower_bytes: int


def check_reply(content: RecordDict, *, manifest: Manifest, site_id: str, server_round: int,
                num_examples: int | None = None, dp: bool = True) -> Accepted:
    """Accept a site's reply or raise :class:`ReplyError` naming the failed check.

    Checks the expected records and keys (exactly the manifest's names), every array's
    declared and decoded dtype (float32) and shape, finite values, the site id and round, a
    positive integer ``num-examples`` (equal to what the site announced, when given) and,
    under DP, a non-empty list of valid privacy events.
    """
    from accounting.events import event_from_dict

    for key in (ARRAYS, METRICS, SITE):
        if key not in content:
            raise ReplyError(f"reply must carry '{key}', got records {sorted(content)}")
    try:
        arrays, metrics, site = content.array_records[ARRAYS], content.metric_records[METRICS], content.config_records[SITE]
    except KeyError as exc:
        raise ReplyError(f"reply record {exc} has the wrong record type") from None
    names = set(arrays)
    if names != set(manifest.names):
        missing, extra = sorted(set(manifest.names) - names)[:3], sorted(names - set(manifest.names))[:3]
        raise ReplyError(f"reply arrays must be exactly the global state's names: missing {missing}, unexpected {extra}")
    state = {}
    for name, shape in zip(manifest.names, manifest.shapes):
        arr = arrays[name]
        if arr.dtype != FLOAT32 or tuple(arr.shape) != shape:
            raise ReplyError(f"{name} must be {FLOAT32} of shape {shape}, got {arr.dtype} of shape {tuple(arr.shape)}")
        try:
            value = arr.numpy()
        except Exception as exc:  # np.load raises several types for bad bytes; pickles are refused
            raise ReplyError(f"{name} does not decode as a numpy array ({type(exc).__name__})") from None
        if value.dtype != np.float32 or tuple(value.shape) != shape:
            raise ReplyError(f"{name} must decode to float32 {shape}, got {value.dtype} {tuple(value.shape)}")
        if not np.isfinite(value).all():
            raise ReplyError(f"{name} must be finite, got NaN or inf")
        state[name] = torch.from_numpy(np.array(value, copy=True))
    got_id, got_round = site.get("site-id"), site.get("round")
    if got_id != site_id or got_round != server_round:
        raise ReplyError(f"reply must come from site {site_id!r} for round {server_round}, got {got_id!r}, round {got_round!r}")
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ReplyError(f"num-examples must be an integer >= 1, got {n!r}")
    if num_examples is not None and n != num_examples:
        raise ReplyError(f"num-examples must equal the {num_examples} records the site announced, got {n}")
    try:
        events = tuple(event_from_dict(e) for e in json.loads(str(site.get("events", "[]"))))
    except Exception as exc:  # JSON and AccountingInputError
        raise ReplyError(f"events must be a JSON list of privacy events ({type(exc).__name__}: {exc})") from None
    if dp and not events:
        raise ReplyError("events must list the privacy events the site recorded, got none under DP")
    return Accepted(site_id, state, int(n), events, {k: float(v) for k, v in metrics.items()
                                                     if isinstance(v, (int, float)) and not isinstance(v, bool)},
                    int(arrays.count_bytes()))
