"""Append-only, crash-safe privacy ledger: one JSON-lines file for many clients.

Each line is the canonical JSON (sorted keys, no spaces, ASCII) of one record::

    {"client": ..., "event": {...}, "hash": ..., "note": ..., "prev": ..., "round": ...,
     "seq": ..., "time": "2025-01-01T00:00:00.000000Z", "unit": ..., "v": 1}

``hash = sha256(prev + canonical(record without "hash"))`` and ``prev`` is the previous
line's hash (64 zeros for the first line), so editing, deleting, reordering or
truncating a line breaks the chain at a line we can name. Opening a ledger verifies
every line and raises :class:`LedgerCorruptError` (file, line number, what is wrong);
nothing is ever dropped silently.

Write-ahead contract: :meth:`Ledger.append` returns only after the line is written,
flushed and ``os.fsync``-ed (and, when it created the file, after the directory entry
is fsync-ed too). Callers release a noised payload only after ``append`` returns.

What the chain cannot see by itself: removal of whole lines at the end of the file. Keep
:attr:`Ledger.head` somewhere else (e.g. in a run checkpoint) and pass it back as
``expected_head`` to detect that.

Epsilon is never stored: :func:`spent` derives it from the events.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accounting.errors import AccountingInputError, LedgerCorruptError
from accounting.events import Event, check_event, event_from_dict, event_to_dict

if TYPE_CHECKING:
    from accounting.prv import EpsilonBound

try:  # POSIX advisory lock against a second writer; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
GENESIS_HASH = "0" * 64
_KEYS = frozenset({"v", "seq", "client", "round", "unit", "event", "note", "time", "prev", "hash"})
TORN_SUFFIX = ".torn"
REAPPEND_NOTE = "re-appended after a torn write (conservative: it may have been released)"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _chain_hash(prev: str, content: dict[str, Any]) -> str:
    return hashlib.sha256((prev + _canonical(content)).encode("ascii")).hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a created or renamed entry survives a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class LedgerRecord:
    """One verified ledger line."""

    seq: int
    client: str
    round: int
    unit: str
    event: Event
    note: str
    time: str
    prev: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "seq": self.seq,
            "client": self.client,
            "round": self.round,
            "unit": self.unit,
            "event": event_to_dict(self.event),
            "note": self.note,
            "time": self.time,
            "prev": self.prev,
            "hash": self.hash,
        }


def _check_client(client: object) -> str:
    if not isinstance(client, str) or not client or client != client.strip() or not client.isprintable():
        raise AccountingInputError(
            f"client must be a non-empty printable string without surrounding spaces, got {client!r}"
        )
    return client


def _check_round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AccountingInputError(f"round must be an integer >= 0, got {value!r}")
    return value


def _parse_record(line: bytes, *, expected_seq: int, prev: str, where: str) -> LedgerRecord:
    """Verify one complete line; raise LedgerCorruptError naming ``where`` otherwise."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise LedgerCorruptError(f"{where}: not ASCII text (binary garbage or an edit)") from None
    if not text.strip():
        raise LedgerCorruptError(f"{where}: empty line")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LedgerCorruptError(f"{where}: unparsable JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict) or set(data) != _KEYS:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise LedgerCorruptError(f"{where}: expected keys {sorted(_KEYS)}, found {found}")
    if data["v"] != FORMAT_VERSION:
        raise LedgerCorruptError(f"{where}: unsupported format version {data['v']!r}")
    if data["seq"] != expected_seq or isinstance(data["seq"], bool):
        raise LedgerCorruptError(
            f"{where}: out of sequence: seq {data['seq']!r}, expected {expected_seq} (a line was deleted, "
            f"duplicated or reordered)"
        )
    if data["prev"] != prev:
        raise LedgerCorruptError(f"{where}: hash chain broken: prev does not match the previous line's hash")
    content = {key: value for key, value in data.items() if key != "hash"}
    if data["hash"] != _chain_hash(prev, content):
        raise LedgerCorruptError(f"{where}: checksum mismatch: the line was edited")
    if _canonical(data) != text:
        raise LedgerCorruptError(f"{where}: not in canonical form: the line was edited")
    try:
        client = _check_client(data["client"])
        round_ = _check_round(data["round"])
        event = event_from_dict(data["event"])
        if not isinstance(data["note"], str) or not isinstance(data["time"], str):
            raise AccountingInputError("note and time must be strings")
        datetime.fromisoformat(data["time"])
    except (AccountingInputError, ValueError) as exc:
        raise LedgerCorruptError(f"{where}: invalid field: {exc}") from None
    if data["unit"] != event.unit:
        raise LedgerCorruptError(f"{where}: unit {data['unit']!r} differs from the event's unit {event.unit!r}")
    return LedgerRecord(
        seq=expected_seq, client=client, round=round_, unit=event.unit, event=event,
        note=data["note"], time=data["time"], prev=prev, hash=data["hash"],
    )


def _split_lines(raw: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the trailing fragment after the last newline."""
    *lines, tail = raw.split(b"\n")
    return lines, tail


class Ledger:
    """An append-only JSON-lines privacy ledger holding the events of many clients.

    ``Ledger(path)`` creates the parent directory and an empty file if absent, or reads
    and verifies every line of an existing file. ``expected_head=(seq, hash)`` (a
    previous :attr:`head`) additionally checks that no line up to ``seq`` went missing.
    """

    def __init__(self, path: str | os.PathLike[str], *, expected_head: tuple[int, str] | None = None) -> None:
        self.path = Path(path)
        self._records: list[LedgerRecord] = []
        self._units: dict[str, str] = {}
        self._size = 0
        if self.path.exists():
            self._load()
        else:
            self._create()
        if expected_head is not None:
            self._check_head(expected_head)

    # -- reading -----------------------------------------------------------------
    def _create(self) -> None:
        new_dirs = [d for d in reversed(self.path.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for directory in new_dirs:  # make each new directory entry durable too
            fsync_dir(directory.parent)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.path.parent)
        log.info("created ledger %s", self.path)

    def _load(self) -> None:
        if not self.path.is_file():
            raise LedgerCorruptError(f"{self.path}: not a regular file")
        raw = self.path.read_bytes()
        lines, tail = _split_lines(raw)
        records: list[LedgerRecord] = []
        prev = GENESIS_HASH
        for index, line in enumerate(lines):
            record = _parse_record(line, expected_seq=index, prev=prev, where=f"{self.path}:{index + 1}")
            records.append(record)
            prev = record.hash
        if tail:
            raise LedgerCorruptError(
                f"{self.path}:{len(lines) + 1}: truncated last line ({len(tail)} bytes without a newline; "
                f"a write was interrupted). Its event may or may not have been released: repair explicitly "
                f"with Ledger.recover(path) and re-append the in-flight event"
            )
        units: dict[str, str] = {}
        for record in records:
            if units.setdefault(record.client, record.unit) != record.unit:
                raise LedgerCorruptError(
                    f"{self.path}:{record.seq + 1}: client {record.client!r} mixes privacy units "
                    f"{units[record.client]!r} and {record.unit!r}"
                )
        self._records = records
        self._units = units
        self._size = len(raw)

    def _check_head(self, expected_head: tuple[int, str]) -> None:
        try:
            seq, digest = expected_head
        except (TypeError, ValueError):
            raise AccountingInputError(f"expected_head must be a (seq, hash) pair, got {expected_head!r}") from None
        if isinstance(seq, bool) or not isinstance(seq, int) or not isinstance(digest, str):
            raise AccountingInputError(f"expected_head must be a (seq, hash) pair, got {expected_head!r}")
        if seq < 0:
            return
        if seq >= len(self._records):
            raise LedgerCorruptError(
                f"{self.path}: has {len(self._records)} lines but the expected head is seq {seq}: "
                f"lines at the end were removed"
            )
        if self._records[seq].hash != digest:
            raise LedgerCorruptError(f"{self.path}:{seq + 1}: hash differs from the expected head")

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last line; ``(-1, GENESIS_HASH)`` when empty."""
        if not self._records:
            return -1, GENESIS_HASH
        return self._records[-1].seq, self._records[-1].hash

    def records(self) -> tuple[LedgerRecord, ...]:
        return tuple(self._records)

    def __len__(self) -> int:
        """Number of records (lines)."""
        return len(self._records)

    def clients(self) -> list[str]:
        """Clients with at least one record, sorted."""
        return sorted({record.client for record in self._records})

    def events(self, client: str) -> list[Event]:
        """The events recorded for ``client``, in ledger order."""
        return [record.event for record in self._records if record.client == client]

    def rounds_completed(self, client: str) -> set[int]:
        """Rounds for which ``client`` has at least one record."""
        return {record.round for record in self._records if record.client == client}

    # -- writing -----------------------------------------------------------------
    def append(self, *, client: str, round: int, event: Event, note: str = "") -> LedgerRecord:  # noqa: A002
        """Durably append one event; returns after write + flush + fsync (write-ahead)."""
        client = _check_client(client)
        round_ = _check_round(round)
        check_event(event)
        if not isinstance(note, str) or not note.isprintable():
            raise AccountingInputError(f"note must be a printable string, got {note!r}")
        if self._units.get(client, event.unit) != event.unit:
            raise AccountingInputError(
                f"event.unit must match client {client!r}'s privacy unit {self._units[client]!r}, "
                f"got {event.unit!r}"
            )
        prev_seq, prev = self.head
        time = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        content = {
            "v": FORMAT_VERSION, "seq": prev_seq + 1, "client": client, "round": round_, "unit": event.unit,
            "event": event_to_dict(event), "note": note, "time": time, "prev": prev,
        }
        digest = _chain_hash(prev, content)
        line = (_canonical({**content, "hash": digest}) + "\n").encode("ascii")
        record = LedgerRecord(
            seq=prev_seq + 1, client=client, round=round_, unit=event.unit, event=event,
            note=note, time=time, prev=prev, hash=digest,
        )
        if not self.path.exists():
            if self._records:
                raise LedgerCorruptError(f"{self.path}: the ledger file was removed after it was read")
            self._create()
        with open(self.path, "ab") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            size = os.fstat(handle.fileno()).st_size
            if size != self._size:
                raise LedgerCorruptError(
                    f"{self.path}: changed on disk since it was read ({size} bytes, expected {self._size}); "
                    f"another writer? Reopen the ledger"
                )
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._records.append(record)
        self._units.setdefault(client, event.unit)
        self._size += len(line)
        return record

    # -- repair ------------------------------------------------------------------
    @classmethod
    def recover(cls, path: str | os.PathLike[str]) -> tuple[Ledger, str | None]:
        """Explicitly repair a torn final line; return the ledger and the torn text (None if none).

        Only a final fragment without a newline is repaired: it is appended to
        ``<path>.torn`` (fsync-ed) and cut off the ledger; every other line must verify,
        otherwise LedgerCorruptError is raised and nothing is changed.

        A torn final line means an ``append`` did not return. Under the write-ahead
        contract its payload was not released, but the ledger alone cannot prove that
        (a caller that released early, storage that reorders writes). Be conservative:
        re-append the in-flight event before continuing, with :func:`reappend_torn` when
        the fragment is complete (see :func:`parse_torn`), otherwise with the event the
        caller was recording when it crashed.
        """
        path = Path(path)
        if not path.exists():
            raise LedgerCorruptError(f"{path}: no such ledger to recover")
        raw = path.read_bytes()
        lines, tail = _split_lines(raw)
        prev = GENESIS_HASH
        for index, line in enumerate(lines):
            prev = _parse_record(line, expected_seq=index, prev=prev, where=f"{path}:{index + 1}").hash
        if not tail:
            return cls(path), None
        torn_path = path.with_name(path.name + TORN_SUFFIX)
        with open(torn_path, "ab") as handle:
            handle.write(tail + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        with open(path, "r+b") as handle:
            handle.truncate(len(raw) - len(tail))
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(path.parent)
        torn_text = tail.decode("ascii", errors="replace")
        log.warning("%s: cut a torn final line of %d bytes (kept in %s)", path, len(tail), torn_path)
        return cls(path), torn_text


def parse_torn(torn_text: str) -> tuple[str, int, Event] | None:
    """``(client, round, event)`` if the torn fragment is a complete record body, else None."""
    try:
        data = json.loads(torn_text)
        return _check_client(data["client"]), _check_round(data["round"]), event_from_dict(data["event"])
    except (json.JSONDecodeError, TypeError, KeyError, AccountingInputError):
        return None


def reappend_torn(ledger: Ledger, torn_text: str) -> LedgerRecord | None:
    """Conservatively re-append the event of a complete torn fragment; None if it cannot be parsed."""
    parsed = parse_torn(torn_text)
    if parsed is None:
        return None
    client, round_, event = parsed
    return ledger.append(client=client, round=round_, event=event, note=REAPPEND_NOTE)


def spent(ledger: Ledger, client: str, *, delta: float, eps_error: float | None = None) -> EpsilonBound:
    """PRV bracket (:class:`accounting.prv.EpsilonBound`) on ``client``'s epsilon at ``delta``."""
    from accounting import prv

    return prv.epsilon(ledger.events(client), delta=delta, eps_error=eps_error)
