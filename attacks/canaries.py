"""Canaries for the one-run audit, and the member / non-member records of the real-record attacks.

One-run audit (Steinke, Nasr & Jagielski, arXiv 2305.08846, Algorithm 1): ``m`` canaries are
fixed first; then each is included in training independently with probability 1/2. Included
canaries are appended to a client shard and go through exactly the same Poisson sampling,
clipping and noise as real records, so the claim under test ("every record of every client is
(epsilon, delta)-DP") covers them.

Order of draws, each from its own child of ``SeedSequence(seed)``, so that the inclusion bits
are independent of everything else:

1. canary texts (random vocabulary words) and labels (uniform over ``label_names``), or, for
   gradient canaries, the coordinates and signs;
2. the client of every canary, round-robin over all ``m`` canaries, *before* the bits: an
   included canary goes to that client, an excluded one would have. Assigning clients to the
   included canaries only would let one bit move other canaries between clients, and then
   toggling that bit would change more than one record of more than one client;
3. the inclusion bits, Bernoulli(1/2).

Two kinds. ``random-words`` canaries are texts (with random labels for classification), planted
into the shards: they exercise the whole input pipeline. ``gradient`` canaries
(:class:`GradientCanarySet`) are white-box Dirac canaries, records whose per-sample gradient is
fixed on one trainable coordinate: they exercise the mechanism from the per-sample gradient on,
and on the small adapters here they are the only kind with the power to catch a broken mechanism
(measured in the README). The same three draws apply to both.

The canaries and bits are written to ``canaries.json`` in the run directory; training code reads
only the planted :class:`dpfed.data.Splits` (gradient canaries: each client's
:class:`dpfed.privacy.FixedGradientRecords`), and only the audit reads the file back. The test
split never receives a canary, so evaluation never counts one.

Real-record attacks (loss and reference attacks) need members and non-members from the same
distribution: :func:`choose_attack_records` takes members uniformly from the client shards and
non-members from a ``heldout`` pool carved out of the data before training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfed.data import Records, Splits
from dpfed.jsonio import read_json_object
from dpfed.errors import ConfigError, DataError
from dpfed.instruct import PromptResponseRecords

log = logging.getLogger(__name__)

__all__ = [
    "CANARIES_FILE",
    "ATTACK_RECORDS_FILE",
    "KINDS",
    "CanarySet",
    "GradientCanarySet",
    "vocabulary_words",
    "make_canaries",
    "make_gradient_canaries",
    "drift_residuals",
    "plant",
    "save_canaries",
    "load_canaries",
    "choose_attack_records",
    "save_attack_records",
    "load_attack_records",
    "attack_records_as_records",
]

CANARIES_FILE = "canaries.json"
ATTACK_RECORDS_FILE = "attack_records.json"
CANARIES_FORMAT = "dpfed-canaries/1"
ATTACK_RECORDS_FORMAT = "dpfed-attack-records/1"
ATTACK_TASKS = ("classification", "causal-lm", "instruct")  # instruct rows carry a "response" too
KINDS = ("random-words",)  # input-space canaries; "gradient" canaries are a GradientCanarySet

# Streams of SeedSequence(seed) used by make_canaries; fixed so that a seed always gives the same set.
_STREAM_TEXT, _STREAM_BITS = 0, 1
_MAX_REDRAWS = 100


@dataclass(frozen=True)
class CanarySet:
    """``m`` canaries, their secret inclusion bits and the client each one is (or would be) planted in.

    ``labels`` is None for causal-LM canaries. ``clients[i]`` is fixed for every canary, included
    or not (see the module docstring for why).
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    included: tuple[bool, ...]
    clients: tuple[int, ...]
    num_clients: int
    label_names: tuple[str, ...] = ()
    kind: str = "random-words"
    length: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        m = len(self.texts)
        if m < 1:
            raise ConfigError(f"canaries must hold at least one canary; got {m}")
        for name in ("included", "clients"):
            if len(getattr(self, name)) != m:
                raise ConfigError(f"canary {name} must have one entry per canary ({m}); got {len(getattr(self, name))}")
        if self.labels is not None and len(self.labels) != m:
            raise ConfigError(f"canary labels must have one entry per canary ({m}); got {len(self.labels)}")
        if self.labels is not None and any(not 0 <= y < len(self.label_names) for y in self.labels):
            raise ConfigError(f"canary labels must be in [0, {len(self.label_names)}) (label_names {list(self.label_names)})")
        if any(not 0 <= c < self.num_clients for c in self.clients):
            raise ConfigError(f"canary clients must be in [0, num_clients = {self.num_clients})")
        if len(set(self.texts)) != m:
            raise ConfigError("canary texts must be distinct; got duplicates")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def m(self) -> int:
        return len(self.texts)

    @property
    def task(self) -> str:
        return "causal-lm" if self.labels is None else "classification"

    def included_mask(self) -> np.ndarray:
        return np.asarray(self.included, dtype=bool)

    def records(self) -> Records:
        """All ``m`` canaries, included or not, as records (for scoring)."""
        return Records(self.texts, self.labels, self.label_names)

    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(_canaries_to_dict(self)).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class GradientCanarySet:
    """``m`` white-box (Dirac) canaries: records whose per-sample gradient is ``sign * C`` on one coordinate.

    Canary ``i`` has gradient ``signs[i] * clip`` at flat coordinate ``indices[i]`` of trainable
    parameter ``names[i]``; coordinates are distinct, drawn uniformly from all trainable
    coordinates. Its norm is exactly the clip norm C, the most any record contributes to a clipped
    sum. Included canaries join their client's population and go through its Poisson sampling,
    clipping and noise (:class:`dpfed.privacy.FixedGradientRecords`). SGD moves the coordinate by
    ``-lr * sign * C / b`` per step it is sampled in, so the score is ``-sign`` times the change of
    that coordinate, read after the training drift is taken out (:func:`drift_residuals`) (Nasr et
    al., arXiv 2302.07956; Steinke, Nasr & Jagielski, arXiv 2305.08846, Sec. 6). They audit the
    mechanism from the per-sample gradient on (sampling, clipping, noise, aggregation,
    accounting), not the input pipeline.
    """

    names: tuple[str, ...]
    indices: tuple[int, ...]
    signs: tuple[int, ...]
    included: tuple[bool, ...]
    clients: tuple[int, ...]
    num_clients: int
    seed: int = 0
    kind: str = "gradient"

    def __post_init__(self) -> None:
        m = len(self.names)
        if m < 1:
            raise ConfigError(f"canaries must hold at least one canary; got {m}")
        for name in ("indices", "signs", "included", "clients"):
            if len(getattr(self, name)) != m:
                raise ConfigError(f"canary {name} must have one entry per canary ({m}); got {len(getattr(self, name))}")
        if any(s not in (-1, 1) for s in self.signs):
            raise ConfigError("gradient canary signs must be -1 or +1")
        if len(set(zip(self.names, self.indices))) != m:
            raise ConfigError("gradient canary coordinates must be distinct; got duplicates")
        if any(not 0 <= c < self.num_clients for c in self.clients):
            raise ConfigError(f"canary clients must be in [0, num_clients = {self.num_clients})")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def m(self) -> int:
        return len(self.names)

    @property
    def length(self) -> int:
        return 1

    def included_mask(self) -> np.ndarray:
        return np.asarray(self.included, dtype=bool)

    def fingerprint(self) -> str:
        return hashlib.sha256(_canonical(_gradient_canaries_to_dict(self)).encode()).hexdigest()[:16]

    def fixed_records(self, client: int, *, clip: float):
        """The included canaries of ``client`` as :class:`dpfed.privacy.FixedGradientRecords` (gradient sign * clip)."""
        from dpfed.privacy import FixedGradientRecords

        rows = [i for i in range(self.m) if self.included[i] and self.clients[i] == client]
        return FixedGradientRecords(names=tuple(self.names[i] for i in rows), indices=tuple(self.indices[i] for i in rows),
                                    values=tuple(float(self.signs[i]) * float(clip) for i in rows))

    def _at_coordinates(self, tensors: dict[str, Any], initial: dict[str, Any]) -> np.ndarray:
        out = np.empty(self.m, dtype=np.float64)
        for i, (name, j, sgn) in enumerate(zip(self.names, self.indices, self.signs)):
            if name not in tensors or name not in initial:
                raise DataError(f"gradient canary {i} names parameter {name!r}, which the run's states do not hold")
            t = tensors[name].reshape(-1)
            if j >= t.numel() or t.numel() != initial[name].numel():
                raise DataError(f"gradient canary {i}: coordinate {j} does not fit parameter {name!r} ({t.numel()} entries)")
            out[i] = -sgn * float(t[j])
        return out

    def movement(self, initial: dict[str, Any], final: dict[str, Any]) -> np.ndarray:
        """``-sign * (final - initial)`` at every canary's coordinate: how far SGD moved it along the canary."""
        return self._at_coordinates({n: final[n] - initial[n] for n in final if n in initial}, initial)

    def scores(self, initial: dict[str, Any], final: dict[str, Any]) -> np.ndarray:
        """The audit's score: the canary's movement after the training drift is taken out (:func:`drift_residuals`)."""
        return self._at_coordinates(drift_residuals(initial, final), initial)


def drift_residuals(initial: dict[str, Any], final: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Name → the change ``final - initial`` with its dominant rank-one part removed, in robust units.

    Without noise, the change of every trained matrix is mostly one rank-one direction (the real
    records' mean gradient, summed over steps: its top singular value held 60-97% of the energy of
    the adapter's r x r updates in a measured no-DP demo run), and that drift, not the canaries, then
    decides which coordinates moved most. A Dirac canary is a single entry, spread evenly over any
    rank-one fit, so subtracting the best rank-one approximation (truncated SVD, Eckart-Young) of
    each matrix with both sides >= 2 removes most of the drift and little of a canary. Each tensor
    is then divided by the median absolute value of its residual, so that tensors that moved by
    different amounts (head, adapter) share one scale. Vectors are only rescaled. Depends on the
    two states alone, never on the inclusion bits, so it is a valid one-run statistic.
    """
    out: dict[str, torch.Tensor] = {}
    for name in final:
        if name not in initial:
            continue
        d = final[name].double() - initial[name].double()
        if d.dim() == 2 and min(d.shape) >= 2:
            u, s, vh = torch.linalg.svd(d, full_matrices=False)
            d = d - s[0] * torch.outer(u[:, 0], vh[0])
        scale = float(d.abs().median())
        out[name] = d / scale if scale > 0 else d
    return out


def _check_draw(m: Any, num_clients: Any, seed: Any) -> None:
    """The arguments every canary draw shares; ConfigError naming the parameter, the rule and the value."""
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 2:
        raise ConfigError(f"canaries m must be an integer >= 2, got {m!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ConfigError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"canary seed must be an integer >= 0, got {seed!r}")


def make_gradient_canaries(*, m: int, shapes: dict[str, int], num_clients: int, seed: int) -> GradientCanarySet:
    """Draw ``m`` distinct coordinates and signs, assign clients round-robin, then the bits ~ Bernoulli(1/2).

    ``shapes`` maps each trainable parameter name to its number of entries; coordinates are drawn
    uniformly without replacement from all of them (in sorted name order), so ``m`` must not exceed
    their total. Same streams as :func:`make_canaries`: content first, bits from their own child.
    """
    _check_draw(m, num_clients, seed)
    names = sorted(shapes)
    sizes = np.array([int(shapes[n]) for n in names], dtype=np.int64)
    d = int(sizes.sum())
    if m > d:
        raise ConfigError(f"canaries must be <= the number of trainable coordinates ({d}) for gradient canaries, got {m}")
    text_ss, bits_ss = np.random.SeedSequence(int(seed)).spawn(2)
    rng = np.random.default_rng(text_ss)
    flat = rng.choice(d, size=int(m), replace=False)  # random order: clients go round-robin over it
    signs = tuple(int(x) for x in rng.choice(np.array([-1, 1]), size=int(m)))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    owner = np.searchsorted(np.cumsum(sizes), flat, side="right")
    included = tuple(bool(b) for b in np.random.default_rng(bits_ss).random(int(m)) < 0.5)
    return GradientCanarySet(names=tuple(names[o] for o in owner), indices=tuple(int(f - starts[o]) for f, o in zip(flat, owner)),
                             signs=signs, included=included, clients=tuple(i % int(num_clients) for i in range(int(m))),
                             num_clients=int(num_clients), seed=int(seed))


def vocabulary_words(tokenizer, *, min_chars: int = 2) -> tuple[str, ...]:
    """Whole words of ``tokenizer``'s vocabulary, in id order: the alphabet of random-word canaries.

    Special tokens, WordPiece continuations (``##x``) and non-alphabetic pieces are dropped; the
    word-start markers of BPE / SentencePiece vocabularies (``Ġ``, ``▁``) are stripped. Uniform draws
    from a large vocabulary are mostly rare words, which is what makes such canaries easy to
    memorise (Panda et al., arXiv 2503.06808, use rare and new tokens for the same reason).
    """
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    vocab = tokenizer.get_vocab()
    seen: set[str] = set()
    words = []
    for tok in sorted(vocab, key=vocab.get):
        if tok in special or tok.startswith("##"):
            continue
        w = tok
        for marker in ("Ġ", "▁"):
            if w.startswith(marker):
                w = w[len(marker):]
        if len(w) < min_chars or not (w.isascii() and w.isalpha()) or w in seen:
            continue
        seen.add(w)
        words.append(w)
    return tuple(words)


def make_canaries(
    *,
    m: int,
    label_names: tuple[str, ...] | list[str] | None,
    num_clients: int,
    seed: int,
    vocab_words: tuple[str, ...] | list[str] | None = None,
    tokenizer: Any = None,
    kind: str = "random-words",
    length: int = 8,
) -> CanarySet:
    """Draw ``m`` canaries, assign each a client, then draw the inclusion bits ~ Bernoulli(1/2).

    Args:
        m: number of canaries (>= 2; the audit guesses on a fixed fraction of them).
        label_names: class names of the task (classification: each canary gets a uniformly random
            label); empty or None for causal LM (no labels).
        num_clients: number of client shards; canary ``i`` belongs to client ``i mod num_clients``.
        seed: seed of all three draws (texts and labels, bits; clients are deterministic).
        vocab_words: alphabet of the random texts; or pass ``tokenizer`` to use
            :func:`vocabulary_words` of its vocabulary. Exactly one of the two.
        kind: ``random-words``: ``length`` words drawn uniformly with replacement.
        length: words per canary.

    Raises:
        ConfigError naming the parameter, the rule and the value.
    """
    _check_draw(m, num_clients, seed)
    if kind not in KINDS:
        raise ConfigError(f"canary kind must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 1:
        raise ConfigError(f"canary length must be an integer >= 1, got {length!r}")
    if (vocab_words is None) == (tokenizer is None):
        raise ConfigError("make_canaries needs exactly one of vocab_words or tokenizer")
    words = tuple(vocab_words) if vocab_words is not None else vocabulary_words(tokenizer)
    if len(set(words)) < 2:
        raise ConfigError(f"vocab_words must hold at least 2 distinct words, got {len(set(words))}")
    names = tuple(label_names or ())
    if len(names) == 1:
        raise ConfigError(f"label_names must be empty (causal LM) or hold >= 2 classes, got {list(names)}")
    m, num_clients, seed, length = int(m), int(num_clients), int(seed), int(length)

    text_ss, bits_ss = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(text_ss)
    texts: list[str] = []
    seen: set[str] = set()
    redraws = 0
    while len(texts) < m:
        t = " ".join(words[i] for i in rng.integers(0, len(words), size=length))
        if t in seen:
            redraws += 1
            if redraws > _MAX_REDRAWS:
                raise ConfigError(f"canary length {length} over {len(words)} words cannot give {m} distinct canaries; raise length")
            continue
        seen.add(t)
        texts.append(t)
    labels = tuple(int(y) for y in rng.integers(0, len(names), size=m)) if names else None
    clients = tuple(i % num_clients for i in range(m))
    # drawn last, from its own stream: independent of texts, labels and clients
    included = tuple(bool(b) for b in np.random.default_rng(bits_ss).random(m) < 0.5)
    return CanarySet(tuple(texts), labels, included, clients, num_clients, names, kind, length, seed)


def plant(splits: Splits, canaries: CanarySet, *, seed: int) -> Splits:
    """Insert every included canary into its client's shard, at a seeded random position.

    The test and public splits are returned unchanged. Under Poisson sampling the position of a
    record in its shard does not change the distribution of anything; random positions only guard
    against code that treats a shard's tail specially. Plant *before* tokenising shards and
    calibrating sigma, so that n_i (hence q_i = b / n_i and delta < 1/n_min) counts the canaries.

    Raises:
        ConfigError if the canaries were made for another number of clients or task;
        DataError if a canary text equals a record text of any split.
    """
    k = len(splits.clients)
    if canaries.num_clients != k:
        raise ConfigError(f"canaries were made for num_clients = {canaries.num_clients}, but the splits have {k} clients")
    task_labels = splits.clients[0].labels is not None
    if task_labels != (canaries.labels is not None):
        raise ConfigError(f"canaries are for task {canaries.task!r}, but the client records "
                          f"{'have' if task_labels else 'have no'} labels")
    if task_labels and tuple(splits.clients[0].label_names) != canaries.label_names:
        raise ConfigError(f"canary label_names {list(canaries.label_names)} must equal the data's {list(splits.clients[0].label_names)}")
    canary_texts = set(canaries.texts)
    for name, recs in [("test", splits.test), ("public", splits.public), *[(f"client {i}", c) for i, c in enumerate(splits.clients)]]:
        clash = canary_texts.intersection(recs.texts)
        if clash:
            raise DataError(f"canary text must not occur in the data; {len(clash)} canary text(s) occur in the {name} split")
    rng = np.random.default_rng(seed)
    new_clients = []
    for c, shard in enumerate(splits.clients):
        texts = list(shard.texts)
        labels = None if shard.labels is None else list(shard.labels)
        for i in range(canaries.m):
            if not (canaries.included[i] and canaries.clients[i] == c):
                continue
            pos = int(rng.integers(0, len(texts) + 1))
            texts.insert(pos, canaries.texts[i])
            if labels is not None:
                labels.insert(pos, canaries.labels[i])  # type: ignore[index]
        new_clients.append(Records(tuple(texts), None if labels is None else tuple(labels), shard.label_names))
    planted = sum(canaries.included)
    log.info("planted %d of %d canaries across %d clients", planted, canaries.m, k)
    return Splits(test=splits.test, public=splits.public, clients=tuple(new_clients))


# --------------------------------------------------------------------------------------------
# canaries.json
# --------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _canaries_to_dict(c: CanarySet) -> dict[str, Any]:
    return {
        "format": CANARIES_FORMAT,
        "note": "audit only: the secret inclusion bits of the one-run audit; training never reads this file",
        "kind": c.kind,
        "task": c.task,
        "m": c.m,
        "length": c.length,
        "seed": c.seed,
        "num_clients": c.num_clients,
        "label_names": list(c.label_names),
        "canaries": [
            {"index": i, "text": c.texts[i], "label": None if c.labels is None else c.labels[i],
             "included": c.included[i], "client": c.clients[i]}
            for i in range(c.m)
        ],
    }


def _gradient_canaries_to_dict(c: GradientCanarySet) -> dict[str, Any]:
    return {
        "format": CANARIES_FORMAT,
        "note": "audit only: the secret inclusion bits of the one-run audit; training never reads this file",
        "kind": "gradient",
        "task": "any",
        "m": c.m,
        "length": 1,
        "seed": c.seed,
        "num_clients": c.num_clients,
        "label_names": [],
        "canaries": [
            {"index": i, "param": c.names[i], "coordinate": c.indices[i], "sign": c.signs[i],
             "included": c.included[i], "client": c.clients[i]}
            for i in range(c.m)
        ],
    }


def _write_private_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def save_canaries(path: str | os.PathLike[str], canaries: CanarySet | GradientCanarySet) -> None:
    """Write ``canaries.json`` (mode 0600): texts and labels (or coordinates and signs), bits, clients, seed."""
    as_dict = _gradient_canaries_to_dict if isinstance(canaries, GradientCanarySet) else _canaries_to_dict
    _write_private_json(Path(path), as_dict(canaries))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    return read_json_object(path, what=what)


def load_canaries(path: str | os.PathLike[str]) -> CanarySet | GradientCanarySet:
    """Read and validate ``canaries.json``; DataError naming the file and the field otherwise."""
    path = Path(path)
    d = _read_json(path, "canary file")
    if d.get("format") != CANARIES_FORMAT:
        raise DataError(f"{path}: format must be {CANARIES_FORMAT!r}, got {d.get('format')!r}")
    rows = d.get("canaries")
    if not isinstance(rows, list) or not rows:
        raise DataError(f"{path}: canaries must be a non-empty list")
    try:
        if d.get("kind") == "gradient":
            for i, r in enumerate(rows):
                if (r["index"] != i or not isinstance(r["included"], bool) or not isinstance(r["param"], str)
                        or isinstance(r["coordinate"], bool) or not isinstance(r["coordinate"], int)):
                    raise DataError(f"{path}: canary {i} is malformed (index, param, coordinate or included)")
            return GradientCanarySet(
                names=tuple(r["param"] for r in rows), indices=tuple(r["coordinate"] for r in rows),
                signs=tuple(int(r["sign"]) for r in rows), included=tuple(r["included"] for r in rows),
                clients=tuple(int(r["client"]) for r in rows), num_clients=int(d["num_clients"]), seed=int(d["seed"]))
        labels = None if d["task"] == "causal-lm" else tuple(int(r["label"]) for r in rows)
        for i, r in enumerate(rows):
            if r["index"] != i or not isinstance(r["included"], bool) or not isinstance(r["text"], str):
                raise DataError(f"{path}: canary {i} is malformed (index, text or included)")
        return CanarySet(
            texts=tuple(r["text"] for r in rows),
            labels=labels,
            included=tuple(r["included"] for r in rows),
            clients=tuple(int(r["client"]) for r in rows),
            num_clients=int(d["num_clients"]),
            label_names=tuple(str(x) for x in d["label_names"]),
            kind=str(d["kind"]),
            length=int(d["length"]),
            seed=int(d["seed"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: canary file is malformed ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------------------------
# Members and non-members for the real-record attacks
# --------------------------------------------------------------------------------------------


def choose_attack_records(
    splits: Splits,
    *,
    heldout: Records,
    n: int,
    seed: int,
    canaries: CanarySet | None = None,
) -> dict[str, Any]:
    """Pick ``n`` members uniformly from the client shards and ``n`` non-members from ``heldout``.

    ``heldout`` must be drawn from the same distribution as the training records and carved out
    before training (a random slice of the data that no client, test or public split holds);
    otherwise a distribution shift inflates the attacks' AUC. Canary texts (when ``canaries`` is
    given) are never members. Exact duplicates across the two pools are dropped from both (a text
    in a shard and in ``heldout`` is neither a clean member nor a clean non-member). If a pool is
    smaller than ``n``, both sides shrink to the same size (logged).

    Returns the JSON-ready dict that :func:`save_attack_records` writes.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"attack records n must be an integer >= 1, got {n!r}")
    instruct = isinstance(heldout, PromptResponseRecords)  # a record is its prompt and its response

    def keys(r: Records) -> list:
        return list(zip(r.texts, r.responses)) if instruct else list(r.texts)  # type: ignore[attr-defined]

    held_texts = set(keys(heldout))
    train_texts = {t for c in splits.clients for t in keys(c)}
    excluded = set(canaries.texts) if canaries is not None else set()
    member_pool = [(ci, j) for ci, c in enumerate(splits.clients) for j, t in enumerate(keys(c))
                   if t not in held_texts and t not in excluded]
    nonmember_pool = [j for j, t in enumerate(keys(heldout)) if t not in train_texts and t not in excluded]
    n_eff = min(int(n), len(member_pool), len(nonmember_pool))
    if n_eff < 1:
        raise DataError(f"attack records need members and non-members; got {len(member_pool)} member and "
                        f"{len(nonmember_pool)} non-member candidates")
    if n_eff < n:
        log.warning("attack records: %d requested, %d available on each side", n, n_eff)
    rng = np.random.default_rng(seed)
    mem_idx = np.sort(rng.choice(len(member_pool), size=n_eff, replace=False))
    non_idx = np.sort(rng.choice(len(nonmember_pool), size=n_eff, replace=False))
    members = []
    for k in mem_idx:
        ci, j = member_pool[int(k)]
        c = splits.clients[ci]
        members.append({"text": c.texts[j], "label": None if c.labels is None else int(c.labels[j]),
                        **({"response": c.responses[j]} if instruct else {}),  # type: ignore[attr-defined]
                        "client": ci, "index": j})
    non_members = []
    for k in non_idx:
        j = nonmember_pool[int(k)]
        non_members.append({"text": heldout.texts[j], "label": None if heldout.labels is None else int(heldout.labels[j]),
                            **({"response": heldout.responses[j]} if instruct else {}),  # type: ignore[attr-defined]
                            "index": j})
    return {
        "format": ATTACK_RECORDS_FORMAT,
        "note": "audit only: members are training records of the client shards, non-members a held-out pool "
                "drawn before training from the same data",
        "task": "instruct" if instruct else "causal-lm" if heldout.labels is None else "classification",
        "label_names": list(heldout.label_names),
        "seed": int(seed),
        "n_requested": int(n),
        "n": n_eff,
        "heldout_fingerprint": heldout.fingerprint(),
        "members": members,
        "non_members": non_members,
    }


def save_attack_records(path: str | os.PathLike[str], records: dict[str, Any]) -> None:
    """Write ``attack_records.json`` (mode 0600)."""
    _write_private_json(Path(path), records)


def load_attack_records(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate ``attack_records.json``."""
    path = Path(path)
    d = _read_json(path, "attack record file")
    if d.get("format") != ATTACK_RECORDS_FORMAT:
        raise DataError(f"{path}: format must be {ATTACK_RECORDS_FORMAT!r}, got {d.get('format')!r}")
    for side in ("members", "non_members"):
        rows = d.get(side)
        if not isinstance(rows, list) or not rows:
            raise DataError(f"{path}: {side} must be a non-empty list")
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                raise DataError(f"{path}: {side}[{i}] must be an object with a text")
            if d.get("task") == "classification" and not isinstance(r.get("label"), int):
                raise DataError(f"{path}: {side}[{i}] must have an integer label")
            if d.get("task") == "instruct" and not isinstance(r.get("response"), str):
                raise DataError(f"{path}: {side}[{i}] must have a response (task 'instruct')")
    if d.get("task") not in ATTACK_TASKS:
        raise DataError(f"{path}: task must be one of {list(ATTACK_TASKS)}, got {d.get('task')!r}")
    return d


def attack_records_as_records(d: dict[str, Any]) -> tuple[Records, Records]:
    """(members, non-members) of an attack-record dict as :class:`Records`."""
    names = tuple(d.get("label_names", ()))

    def side(rows: list[dict[str, Any]]) -> Records:
        if d["task"] == "instruct":  # the prompt and the response the loss is taken on
            return PromptResponseRecords(tuple(r["text"] for r in rows), None, (),
                                         responses=tuple(r["response"] for r in rows))
        labels = None if d["task"] == "causal-lm" else tuple(int(r["label"]) for r in rows)
        return Records(tuple(r["text"] for r in rows), labels, names)

    return side(d["members"]), side(d["non_members"])
