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
``expected_head`` to detect that. Nor can it see a rewrite: anyone who can write the file can
recompute every hash. A *keyed* ledger (``Ledger(path, key=...)``) adds to each line
``mac = HMAC-SHA256(key, prev + canonical(record without "hash" and "mac"))``, the same bytes
the hash covers (so the hashes, and the heads recorded elsewhere, are those of the plain
chain). Opening with the key verifies every MAC, so lines written or edited by anyone without
the key are detected; opening without it verifies the plain chain only and logs that the MACs
were not checked; opening a plain ledger with a key is refused. Keep the key on the site
(:func:`new_key_file`, :func:`load_key`).

Readers use :meth:`Ledger.open_existing`, which never creates a ledger.

:class:`MemoryLedger` keeps the same records and hash chain in memory, for library use (the
same appends at the same times give the same heads); it writes nothing, so it is not durable.

Epsilon is never stored: :func:`spent` derives it from the events.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accounting.errors import AccountingInputError, LedgerCorruptError, LedgerKeyError, LedgerMissingError
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
MAC_FIELD = "mac"
KEY_BYTES = 32  # what new_key_file writes and load_key reads
MIN_KEY_BYTES = 16
TORN_SUFFIX = ".torn"
REAPPEND_NOTE = "re-appended after a torn write (conservative: it may have been released)"


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _chain_bytes(prev: str, content: dict[str, Any]) -> bytes:
    """What a line's hash and MAC cover: the previous hash and the record without "hash" and "mac"."""
    return (prev + _canonical(content)).encode("ascii")


def _chain_hash(prev: str, content: dict[str, Any]) -> str:
    return hashlib.sha256(_chain_bytes(prev, content)).hexdigest()


def _chain_mac(key: bytes, prev: str, content: dict[str, Any]) -> str:
    return hmac.new(key, _chain_bytes(prev, content), hashlib.sha256).hexdigest()


def _check_key(key: object) -> bytes | None:
    if key is None:
        return None
    if not isinstance(key, bytes):
        raise LedgerKeyError(f"key must be bytes (see load_key), got {type(key).__name__}")
    if len(key) < MIN_KEY_BYTES:
        raise LedgerKeyError(f"key must be at least {MIN_KEY_BYTES} bytes long, got {len(key)} bytes")
    return key


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
    mac: str | None = None  # HMAC-SHA256 of a keyed ledger's line

    def to_dict(self) -> dict[str, Any]:
        out = {
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
        if self.mac is not None:
            out[MAC_FIELD] = self.mac
        return out


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


def _parse_record(line: bytes, *, expected_seq: int, prev: str, where: str, key: bytes | None = None) -> LedgerRecord:
    """Verify one complete line (and its MAC, if it has one and ``key`` is given); LedgerCorruptError otherwise."""
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
    if not isinstance(data, dict) or set(data) not in (_KEYS, _KEYS | {MAC_FIELD}):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise LedgerCorruptError(
            f"{where}: expected keys {sorted(_KEYS)} (and {MAC_FIELD!r} when keyed), found {found}"
        )
    if data["v"] != FORMAT_VERSION:
        raise LedgerCorruptError(f"{where}: unsupported format version {data['v']!r}")
    if data["seq"] != expected_seq or isinstance(data["seq"], bool):
        raise LedgerCorruptError(
            f"{where}: out of sequence: seq {data['seq']!r}, expected {expected_seq} (a line was deleted, "
            f"duplicated or reordered)"
        )
    if data["prev"] != prev:
        raise LedgerCorruptError(f"{where}: hash chain broken: prev does not match the previous line's hash")
    content = {name: value for name, value in data.items() if name not in ("hash", MAC_FIELD)}
    if data["hash"] != _chain_hash(prev, content):
        raise LedgerCorruptError(f"{where}: checksum mismatch: the line was edited")
    if _canonical(data) != text:
        raise LedgerCorruptError(f"{where}: not in canonical form: the line was edited")
    mac = data.get(MAC_FIELD)
    if mac is not None and not (isinstance(mac, str) and len(mac) == 64 and set(mac) <= set("0123456789abcdef")):
        raise LedgerCorruptError(f"{where}: invalid field: mac must be 64 hex digits, got {mac!r}")
    if key is not None and mac is not None and not hmac.compare_digest(mac, _chain_mac(key, prev, content)):
        raise LedgerCorruptError(
            f"{where}: MAC mismatch: the line was written or edited without the ledger key (or the key is not this "
            f"ledger's)"
        )
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
        note=data["note"], time=data["time"], prev=prev, hash=data["hash"], mac=mac,
    )


def _split_lines(raw: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (without newline) and the trailing fragment after the last newline."""
    *lines, tail = raw.split(b"\n")
    return lines, tail


class _RecordsView:
    """The reading side shared by :class:`Ledger` and :class:`MemoryLedger` (over ``self._records``)."""

    _records: list[LedgerRecord]

    def records(self) -> tuple[LedgerRecord, ...]:
        """Every record, in order."""
        return tuple(self._records)

    def __len__(self) -> int:
        """Number of records (lines of a file ledger)."""
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


class Ledger(_RecordsView):
    """An append-only JSON-lines privacy ledger holding the events of many clients.

    ``Ledger(path)`` creates the parent directory and an empty file if absent, or reads
    and verifies every line of an existing file; :meth:`open_existing` never creates one.
    ``expected_head=(seq, hash)`` (a previous :attr:`head`) additionally checks that no line
    up to ``seq`` went missing. ``key`` (bytes, see :func:`load_key`) makes the ledger keyed:
    every line it appends carries an HMAC, and every line it reads must carry a valid one.
    """

    def __init__(self, path: str | os.PathLike[str], *, expected_head: tuple[int, str] | None = None,
                 key: bytes | None = None) -> None:
        self.path = Path(path)
        self._key = _check_key(key)
        self._records: list[LedgerRecord] = []
        self._units: dict[str, str] = {}
        self._size = 0
        self._keyed = self._key is not None
        if self.path.exists():
            self._load()
        else:
            self._create()
        if expected_head is not None:
            self._check_head(expected_head)

    @classmethod
    def open_existing(cls, path: str | os.PathLike[str], *, expected_head: tuple[int, str] | None = None,
                      key: bytes | None = None) -> Ledger:
        """Open and verify an existing ledger; LedgerMissingError if there is none (never creates one)."""
        path = Path(path)
        if not path.exists():
            raise LedgerMissingError(f"{path}: no such ledger (a reader never creates one)")
        return cls(path, expected_head=expected_head, key=key)

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
            where = f"{self.path}:{index + 1}"
            record = _parse_record(line, expected_seq=index, prev=prev, where=where, key=self._key)
            keyed = record.mac is not None
            if index == 0 and self._key is not None and not keyed:
                raise LedgerKeyError(
                    f"{self.path}: a key was given but the ledger is not keyed (line 1 carries no MAC)"
                )
            if index > 0 and keyed != (records[0].mac is not None):
                this, first = ("a MAC", "none") if keyed else ("no MAC", "one")
                raise LedgerCorruptError(
                    f"{where}: {this} on this line but {first} on line 1: lines were added or rewritten without "
                    f"the ledger key"
                )
            records.append(record)
            prev = record.hash
        if tail:
            raise LedgerCorruptError(
                f"{self.path}:{len(lines) + 1}: truncated last line ({len(tail)} bytes without a newline; "
                f"a write was interrupted). Its event may or may not have been released: for a run directory's "
                f"ledger, `dpfed train --resume RUN_DIR` repairs it (the torn text goes to ledger.jsonl.torn and its "
                f"event is re-appended, so it stays counted) and continues the run"
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
        if records:
            self._keyed = records[0].mac is not None
        if self._keyed and self._key is None:
            log.warning("%s: keyed ledger opened without its key: the hash chain was verified, the MACs were not",
                        self.path)

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

    @property
    def keyed(self) -> bool:
        """Whether the lines carry an HMAC (for an empty ledger: whether it was opened with a key)."""
        return self._keyed

    @property
    def mac_verified(self) -> bool:
        """Whether every line's HMAC was checked against a key (False when opened without one)."""
        return self._key is not None


    # -- writing -----------------------------------------------------------------
    def append(self, *, client: str, round: int, event: Event, note: str = "") -> LedgerRecord:  # noqa: A002
        """Durably append one event; returns after write + flush + fsync (write-ahead)."""
        if self._keyed and self._key is None:
            raise LedgerKeyError(f"{self.path}: the ledger is keyed; appending needs its key, got none")
        time = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
        record = _new_record(self.head, self._units, client=client, round=round, event=event, note=note, time=time,
                             key=self._key)
        line = (_canonical(record.to_dict()) + "\n").encode("ascii")
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
        self._units.setdefault(record.client, event.unit)
        self._size += len(line)
        return record

    # -- repair ------------------------------------------------------------------
    @classmethod
    def recover(cls, path: str | os.PathLike[str], *, key: bytes | None = None) -> tuple[Ledger, str | None]:
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
        key = _check_key(key)
        if not path.exists():
            raise LedgerCorruptError(f"{path}: no such ledger to recover")
        raw = path.read_bytes()
        lines, tail = _split_lines(raw)
        prev = GENESIS_HASH
        for index, line in enumerate(lines):
            prev = _parse_record(line, expected_seq=index, prev=prev, where=f"{path}:{index + 1}", key=key).hash
        if not tail:
            return cls(path, key=key), None
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
        return cls(path, key=key), torn_text


def utc_now() -> datetime:
    """The current time in UTC (the default clock of :class:`MemoryLedger`)."""
    return datetime.now(timezone.utc)


def _timestamp(when: datetime) -> str:
    """A record's ``time`` field: UTC, microseconds, ``Z`` (as :meth:`Ledger.append` writes it)."""
    if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise AccountingInputError(f"clock must return a timezone-aware datetime, got {when!r}")
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _new_record(head: tuple[int, str], units: dict[str, str], *, client: str, round: int,  # noqa: A002
                event: Event, note: str, time: str, key: bytes | None = None) -> LedgerRecord:
    """Validate one append against the chain's ``head`` and the clients' ``units``; the chained record.

    The same checks and messages as :meth:`Ledger.append`; changes nothing.
    """
    client = _check_client(client)
    round_ = _check_round(round)
    check_event(event)
    if not isinstance(note, str) or not note.isprintable():
        raise AccountingInputError(f"note must be a printable string, got {note!r}")
    if units.get(client, event.unit) != event.unit:
        raise AccountingInputError(
            f"event.unit must match client {client!r}'s privacy unit {units[client]!r}, got {event.unit!r}"
        )
    prev_seq, prev = head
    content = {
        "v": FORMAT_VERSION, "seq": prev_seq + 1, "client": client, "round": round_, "unit": event.unit,
        "event": event_to_dict(event), "note": note, "time": time, "prev": prev,
    }
    return LedgerRecord(
        seq=prev_seq + 1, client=client, round=round_, unit=event.unit, event=event,
        note=note, time=time, prev=prev, hash=_chain_hash(prev, content),
        mac=_chain_mac(key, prev, content) if key is not None else None,
    )


class MemoryLedger(_RecordsView):
    """An in-memory privacy ledger for library use: :class:`Ledger`'s reading and appending interface, no file.

    ``append(client=..., round=..., event=..., note=...)``, :meth:`events`, :meth:`clients`,
    :meth:`rounds_completed`, :meth:`records`, :attr:`head` and ``len()`` behave as
    :class:`Ledger`'s, with the same validation and the same hash chain: a ``MemoryLedger`` and a
    ``Ledger`` given the same appends at the same times have the same records and heads, and
    :func:`spent` works on either. It is never keyed and has no :attr:`path` (None).

    What it does not give: durability. Nothing survives the process, so it cannot back the
    write-ahead contract (a payload released after an ``append`` that no crash can undo); a
    deployment that releases updates keeps a :class:`Ledger` on disk. ``clock`` returns the
    timezone-aware time stamped on each record (default :func:`utc_now`); inject one to replay or
    compare ledgers, since the time is part of each hash.
    """

    path = None

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = utc_now if clock is None else clock
        self._records: list[LedgerRecord] = []
        self._units: dict[str, str] = {}

    @property
    def head(self) -> tuple[int, str]:
        """``(seq, hash)`` of the last record; ``(-1, GENESIS_HASH)`` when empty."""
        if not self._records:
            return -1, GENESIS_HASH
        return self._records[-1].seq, self._records[-1].hash

    @property
    def keyed(self) -> bool:
        """Always False: an in-memory ledger carries no HMAC."""
        return False

    @property
    def mac_verified(self) -> bool:
        """Always False: there is no MAC to verify."""
        return False


    def append(self, *, client: str, round: int, event: Event, note: str = "") -> LedgerRecord:  # noqa: A002
        """Validate and append one event in memory; returns the chained record (nothing is written)."""
        record = _new_record(self.head, self._units, client=client, round=round, event=event, note=note,
                             time=_timestamp(self._clock()))
        self._records.append(record)
        self._units.setdefault(record.client, record.unit)
        return record


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


def new_key_file(path: str | os.PathLike[str]) -> bytes:
    """Create ``path`` holding a fresh random ledger key (32 bytes as hex, mode 0600); return the key.

    Keep the file on the site only: whoever can read it can write lines that verify. An existing
    file is never overwritten (a lost key makes a keyed ledger unverifiable, not invalid).
    """
    path = Path(path)
    key = secrets.token_bytes(KEY_BYTES)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LedgerKeyError(f"key file must not exist yet (a key is never overwritten), got existing {path}") from None
    except OSError as exc:
        raise LedgerKeyError(f"{path}: cannot create the key file ({exc.strerror})") from None
    try:
        os.write(fd, (key.hex() + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return key


def load_key(path: str | os.PathLike[str]) -> bytes:
    """The ledger key in ``path`` (hex); LedgerKeyError if missing, malformed or readable by group or others."""
    path = Path(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise LedgerKeyError(f"{path}: key file not readable ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise LedgerKeyError(f"{path}: key file must be a regular file")
    if os.name == "posix" and info.st_mode & 0o077:
        raise LedgerKeyError(f"{path}: key file must be accessible by its owner only (chmod 600), "
                             f"got mode {stat.S_IMODE(info.st_mode):04o}")
    try:
        key = bytes.fromhex(path.read_bytes().decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise LedgerKeyError(f"{path}: key file must hold the key as hex digits, got something else") from None
    if len(key) != KEY_BYTES:
        raise LedgerKeyError(
            f"{path}: key must be {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits), got {len(key)} bytes"
        )
    return key


def spent(ledger: Ledger, client: str, *, delta: float, eps_error: float | None = None) -> EpsilonBound:
    """PRV bracket (:class:`accounting.prv.EpsilonBound`) on ``client``'s epsilon at ``delta``."""
    from accounting import prv

    return prv.epsilon(ledger.events(client), delta=delta, eps_error=eps_error)
