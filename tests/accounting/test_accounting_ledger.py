"""Ledger: durable appends, verification of every line, explicit repair of a torn last line."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone

import pytest

from accounting import prv
from accounting.errors import AccountingInputError, LedgerCorruptError, LedgerKeyError, LedgerMissingError
from accounting.events import FixedSizeGaussianEvent, GaussianEvent, PoissonGaussianEvent
from accounting.ledger import (
    GENESIS_HASH,
    Ledger,
    MemoryLedger,
    _canonical,
    _chain_hash,
    load_key,
    new_key_file,
    parse_torn,
    reappend_torn,
    spent,
)


def pg(sigma=1.0, q=0.01, steps=10, unit="record"):
    return PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=q, count=steps, unit=unit)


@pytest.fixture
def ledger_path(tmp_path):
    return tmp_path / "run" / "ledger.jsonl"


@pytest.fixture
def filled(ledger_path):
    ledger = Ledger(ledger_path)
    ledger.append(client="a", round=0, event=GaussianEvent(noise_multiplier=8.0), note="dp init")
    ledger.append(client="a", round=1, event=pg())
    ledger.append(client="b", round=1, event=pg(q=0.02))
    return ledger_path


def lines(path):
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path, new_lines):
    path.write_bytes(b"".join(line + b"\n" for line in new_lines))


def test_create_append_reopen_round_trip(ledger_path):
    ledger = Ledger(ledger_path)
    assert ledger_path.exists() and ledger_path.read_bytes() == b""
    events = [GaussianEvent(noise_multiplier=8.0), pg(), FixedSizeGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=3)]
    for round_, event in enumerate(events):
        record = ledger.append(client="c0", round=round_, event=event, note=f"r{round_}")
        assert record.seq == round_ and record.event == event
    ledger.append(client="c1", round=2, event=pg(q=0.5))
    reopened = Ledger(ledger_path)
    assert reopened.records() == ledger.records()
    assert reopened.clients() == ["c0", "c1"]
    assert reopened.events("c0") == events
    assert reopened.rounds_completed("c0") == {0, 1, 2}
    assert reopened.head == ledger.head and len(reopened) == 4
    for line in lines(ledger_path):
        record = json.loads(line)
        assert {"seq", "client", "round", "unit", "event", "time", "prev", "hash"} <= set(record)
        assert record["time"].endswith("Z") and record["event"]["type"]


def test_append_fsyncs_the_line_before_returning(ledger_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            synced.append(("dir", None))
        else:
            assert info.st_ino == ledger_path.stat().st_ino  # it is the ledger file being synced
            synced.append(("file", ledger_path.read_bytes()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    ledger = Ledger(ledger_path)
    assert ("dir", None) in synced  # the new directory entry is made durable
    synced.clear()
    ledger.append(client="a", round=0, event=pg())
    assert synced and synced[-1][0] == "file"
    assert synced[-1][1] == ledger_path.read_bytes()  # fsync happened after the whole line was written
    synced.clear()
    ledger.append(client="a", round=1, event=pg())
    assert synced[-1] == ("file", ledger_path.read_bytes())


def test_spent_derives_epsilon_from_events(filled):
    ledger = Ledger(filled)
    assert spent(ledger, "a", delta=1e-5) == prv.epsilon(ledger.events("a"), delta=1e-5)
    assert spent(ledger, "nobody", delta=1e-5).upper == 0.0


def test_unparsable_line_is_reported_with_its_number(filled):
    content = lines(filled)
    content[1] = b'{"client": "a", "round": 1'
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:2: unparsable JSON"):
        Ledger(filled)


def test_edited_line_fails_its_checksum(filled):
    content = lines(filled)
    record = json.loads(content[1])
    record["event"]["noise_multiplier"] = 2.0  # someone makes a client look less spent
    content[1] = json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:2: checksum mismatch"):
        Ledger(filled)


def test_reformatted_line_is_detected(filled):
    content = lines(filled)
    content[0] = json.dumps(json.loads(content[0]), sort_keys=True).encode()  # spaces after separators
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=r":1: not in canonical form"):
        Ledger(filled)


def test_deleted_line_breaks_the_sequence(filled):
    content = lines(filled)
    del content[1]
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:2: out of sequence"):
        Ledger(filled)


def test_reordered_lines_are_detected(filled):
    content = lines(filled)
    content[1], content[2] = content[2], content[1]
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=r":2: out of sequence"):
        Ledger(filled)


@pytest.mark.parametrize("bad, message", [(b"", "empty line"), (b"\xff\xfe garbage", "not ASCII"),
                                          (b"[1, 2]", "expected keys")])
def test_garbage_lines(filled, bad, message):
    content = lines(filled)
    content.insert(1, bad)
    write_lines(filled, content)
    with pytest.raises(LedgerCorruptError, match=rf":2: {message}"):
        Ledger(filled)


def test_truncated_last_line_is_an_error_and_recovery_is_explicit(filled):
    raw = filled.read_bytes()
    torn = raw[: len(raw) - 40]  # a crash in the middle of writing line 3
    filled.write_bytes(torn)
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:3: truncated last line"):
        Ledger(filled)
    assert filled.read_bytes() == torn  # opening never repairs
    ledger, torn_text = Ledger.recover(filled)
    assert len(ledger) == 2 and ledger.clients() == ["a"]
    fragment = torn[len(b"".join(line + b"\n" for line in lines(filled))):]
    assert torn_text == fragment.decode()
    assert (filled.parent / "ledger.jsonl.torn").read_bytes() == fragment + b"\n"
    assert parse_torn(torn_text) is None  # incomplete: the caller re-appends its in-flight event
    Ledger(filled)  # now verifies
    assert Ledger.recover(filled)[1] is None  # nothing left to repair


def test_complete_line_without_newline_can_be_reappended(filled):
    raw = filled.read_bytes()
    filled.write_bytes(raw[:-1])  # the newline of line 3 never reached the disk
    with pytest.raises(LedgerCorruptError, match=r":3: truncated last line"):
        Ledger(filled)
    ledger, torn_text = Ledger.recover(filled)
    assert parse_torn(torn_text) == ("b", 1, pg(q=0.02))
    record = reappend_torn(ledger, torn_text)
    assert record is not None and record.seq == 2 and "torn" in record.note
    assert Ledger(filled).events("b") == [pg(q=0.02)]


def test_recover_refuses_other_corruption_and_changes_nothing(filled):
    content = lines(filled)
    content[0] = content[0].replace(b'"note":"dp init"', b'"note":"dp-init"')
    write_lines(filled, content)
    raw = filled.read_bytes() + b'{"partial'
    filled.write_bytes(raw)
    with pytest.raises(LedgerCorruptError, match=r":1: checksum mismatch"):
        Ledger.recover(filled)
    assert filled.read_bytes() == raw
    assert not (filled.parent / "ledger.jsonl.torn").exists()


def test_removed_trailing_lines_are_caught_with_an_expected_head(filled):
    head = Ledger(filled).head
    write_lines(filled, lines(filled)[:-1])
    Ledger(filled)  # the chain alone cannot see whole lines cut at the end
    with pytest.raises(LedgerCorruptError, match="lines at the end were removed"):
        Ledger(filled, expected_head=head)


def test_append_validates_before_writing(filled):
    ledger = Ledger(filled)
    before = filled.read_bytes()
    bad_calls = [
        ({"client": "", "round": 0, "event": pg()}, "client"),
        ({"client": "a", "round": -1, "event": pg()}, "round must be an integer >= 0, got -1"),
        ({"client": "a", "round": 0, "event": {"type": "gaussian"}}, "event must be"),
        ({"client": "a", "round": 0, "event": pg(unit="client")}, "event.unit"),
        ({"client": "a", "round": 0, "event": pg(), "note": "two\nlines"}, "note"),
    ]
    for kwargs, message in bad_calls:
        with pytest.raises(AccountingInputError, match=message):
            ledger.append(**kwargs)
    assert filled.read_bytes() == before


def test_a_second_writer_is_detected(filled):
    first, second = Ledger(filled), Ledger(filled)
    first.append(client="a", round=2, event=pg())
    with pytest.raises(LedgerCorruptError, match="changed on disk"):
        second.append(client="a", round=2, event=pg())
    assert len(Ledger(filled)) == 4


# -- readers never create; keyed ledgers -------------------------------------------------------

KEY = bytes(range(32))


def test_open_existing_never_creates(ledger_path):
    with pytest.raises(LedgerMissingError, match="no such ledger"):
        Ledger.open_existing(ledger_path)
    assert not ledger_path.exists() and not ledger_path.parent.exists()


def _keyed(ledger_path):
    ledger = Ledger(ledger_path, key=KEY)
    ledger.append(client="a", round=1, event=pg())
    ledger.append(client="b", round=1, event=pg(q=0.02))
    return ledger


def test_keyed_ledger_round_trip_keeps_the_plain_chain(ledger_path):
    ledger = _keyed(ledger_path)
    reopened = Ledger.open_existing(ledger_path, key=KEY)
    assert reopened.records() == ledger.records() and reopened.keyed and reopened.mac_verified
    for line in lines(ledger_path):
        record = json.loads(line)
        content = {k: v for k, v in record.items() if k not in ("hash", "mac")}
        assert record["hash"] == _chain_hash(record["prev"], content)  # the head a checkpoint records is unchanged
        assert len(record["mac"]) == 64


def test_keyed_ledger_edited_without_the_key_is_detected(ledger_path):
    _keyed(ledger_path)
    content = [json.loads(line) for line in lines(ledger_path)]
    content[1]["event"]["noise_multiplier"] = 50.0  # an attacker recomputes the hash chain, not the MACs
    prev = GENESIS_HASH
    for record in content:
        record["prev"] = prev
        record["hash"] = prev = _chain_hash(prev, {k: v for k, v in record.items() if k not in ("hash", "mac")})
    write_lines(ledger_path, [_canonical(record).encode() for record in content])
    Ledger(ledger_path)  # without the key only the plain chain is checked
    with pytest.raises(LedgerCorruptError, match=r"ledger.jsonl:2: MAC mismatch"):
        Ledger(ledger_path, key=KEY)
    for record in content:
        del record["mac"]
    write_lines(ledger_path, [_canonical(record).encode() for record in content])
    with pytest.raises(LedgerKeyError, match="a key was given but the ledger is not keyed"):
        Ledger(ledger_path, key=KEY)


def test_keyed_ledger_without_its_key_is_read_but_not_appended(ledger_path, caplog):
    _keyed(ledger_path)
    with caplog.at_level("WARNING", logger="accounting.ledger"):
        ledger = Ledger(ledger_path)
    assert ledger.keyed and not ledger.mac_verified and len(ledger) == 2
    assert "the MACs were not" in caplog.text
    before = ledger_path.read_bytes()
    with pytest.raises(LedgerKeyError, match="the ledger is keyed; appending needs its key"):
        ledger.append(client="a", round=2, event=pg())
    assert ledger_path.read_bytes() == before


def test_wrong_key_and_mixed_lines(tmp_path):
    keyed_path, plain_path = tmp_path / "keyed.jsonl", tmp_path / "plain.jsonl"
    _keyed(keyed_path)
    with pytest.raises(LedgerCorruptError, match=":1: MAC mismatch"):
        Ledger(keyed_path, key=bytes(32))
    Ledger(plain_path).append(client="a", round=1, event=pg())
    with pytest.raises(LedgerKeyError, match="not keyed"):
        Ledger(plain_path, key=KEY)
    # a keyed line spliced after a plain one, chain recomputed: keyed and plain lines never mix
    record = json.loads(lines(keyed_path)[1])
    content = {k: v for k, v in record.items() if k not in ("hash", "mac")}
    content["prev"] = json.loads(lines(plain_path)[0])["hash"]
    spliced = {**content, "hash": _chain_hash(content["prev"], content), "mac": record["mac"]}
    write_lines(plain_path, [lines(plain_path)[0], _canonical(spliced).encode()])
    with pytest.raises(LedgerCorruptError, match=r"plain.jsonl:2: a MAC on this line but none on line 1"):
        Ledger(plain_path)


def test_key_must_be_bytes_of_16_or_more(ledger_path):
    for key, message in ((KEY.hex(), "key must be bytes"), (b"short", "at least 16 bytes long, got 5")):
        with pytest.raises(LedgerKeyError, match=message):
            Ledger(ledger_path, key=key)
    assert not ledger_path.exists()


def test_key_files(tmp_path):
    path = tmp_path / "site.key"
    key = new_key_file(path)
    assert len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path) == key
    with pytest.raises(LedgerKeyError, match="key file must not exist yet"):
        new_key_file(path)
    assert load_key(path) == key
    path.chmod(0o644)
    with pytest.raises(LedgerKeyError, match=r"owner only \(chmod 600\), got mode 0644"):
        load_key(path)
    bad = tmp_path / "bad.key"
    for text, message in (("zz", "as hex digits"), ("ab" * 8, "must be 32 bytes")):
        bad.write_text(text)
        bad.chmod(0o600)
        with pytest.raises(LedgerKeyError, match=message):
            load_key(bad)
    with pytest.raises(LedgerKeyError, match="key file not readable"):
        load_key(tmp_path / "missing.key")


def test_recover_with_a_key(ledger_path):
    _keyed(ledger_path)
    raw = ledger_path.read_bytes()
    ledger_path.write_bytes(raw[:-1])
    ledger, torn = Ledger.recover(ledger_path, key=KEY)
    assert ledger.mac_verified and reappend_torn(ledger, torn) is not None
    assert len(Ledger(ledger_path, key=KEY)) == 2


# -- the in-memory ledger ---------------------------------------------------------------------

APPENDS = [
    {"client": "a", "round": 0, "event": GaussianEvent(noise_multiplier=8.0), "note": "dp init"},
    {"client": "a", "round": 1, "event": pg()},
    {"client": "b", "round": 1, "event": pg(q=0.02)},
    {"client": "c", "round": 1, "event": FixedSizeGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=3)},
    {"client": "all-clients", "round": 1, "event": GaussianEvent(noise_multiplier=2.0, unit="client")},
    {"client": "b", "round": 2, "event": pg(q=0.02), "note": "r2"},
]


def _clock_of(records):
    """A clock that returns the times the file ledger stamped, in order."""
    times = iter([datetime.fromisoformat(record.time) for record in records])
    return lambda: next(times)


def test_memory_ledger_equals_a_file_ledger_fed_the_same_appends(ledger_path):
    on_disk = Ledger(ledger_path)
    for kwargs in APPENDS:
        on_disk.append(**kwargs)
    memory = MemoryLedger(clock=_clock_of(on_disk.records()))
    assert memory.head == (-1, GENESIS_HASH) and len(memory) == 0 and memory.clients() == []
    for kwargs in APPENDS:
        memory.append(**kwargs)
    assert memory.head == on_disk.head == Ledger(ledger_path).head
    assert [r.to_dict() for r in memory.records()] == [r.to_dict() for r in on_disk.records()]
    assert len(memory) == len(on_disk) == len(APPENDS)
    assert memory.clients() == on_disk.clients() == ["a", "all-clients", "b", "c"]
    for client in on_disk.clients():
        assert memory.events(client) == on_disk.events(client)
        assert memory.rounds_completed(client) == on_disk.rounds_completed(client)
    assert not memory.keyed and not memory.mac_verified and memory.path is None
    assert spent(memory, "b", delta=1e-5) == spent(on_disk, "b", delta=1e-5)


def test_memory_ledger_lines_verify_as_a_file_ledger(ledger_path):
    memory = MemoryLedger()  # the default clock: real UTC times
    for kwargs in APPENDS:
        memory.append(**kwargs)
    ledger_path.parent.mkdir()
    write_lines(ledger_path, [_canonical(r.to_dict()).encode("ascii") for r in memory.records()])
    assert Ledger(ledger_path, expected_head=memory.head).head == memory.head
    assert all(r.time.endswith("Z") for r in memory.records())


def test_memory_ledger_refuses_what_a_file_ledger_refuses(ledger_path):
    on_disk, memory = Ledger(ledger_path), MemoryLedger()
    for ledger in (on_disk, memory):
        ledger.append(client="a", round=0, event=pg())
    head = memory.head
    bad_calls = [
        {"client": "", "round": 0, "event": pg()},
        {"client": " a", "round": 0, "event": pg()},
        {"client": "a", "round": -1, "event": pg()},
        {"client": "a", "round": True, "event": pg()},
        {"client": "a", "round": 0, "event": {"type": "gaussian"}},
        {"client": "a", "round": 0, "event": pg(unit="client")},
        {"client": "a", "round": 0, "event": pg(), "note": "two\nlines"},
    ]
    for kwargs in bad_calls:
        with pytest.raises(AccountingInputError) as on_disk_error:
            on_disk.append(**kwargs)
        with pytest.raises(AccountingInputError) as memory_error:
            memory.append(**kwargs)
        assert str(memory_error.value) == str(on_disk_error.value)
    assert memory.head == head and len(memory) == 1


def test_memory_ledger_clock_must_be_timezone_aware():
    memory = MemoryLedger(clock=lambda: datetime(2025, 1, 1))
    with pytest.raises(AccountingInputError, match="clock must return a timezone-aware datetime"):
        memory.append(client="a", round=0, event=pg())
    assert len(memory) == 0
    plus_two = timezone(timedelta(hours=2))
    memory = MemoryLedger(clock=lambda: datetime(2025, 1, 1, 2, 0, 0, 5, tzinfo=plus_two))
    assert memory.append(client="a", round=0, event=pg()).time == "2025-01-01T00:00:00.000005Z"
