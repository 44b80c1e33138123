"""Check a run directory's ledgers against everything else the run recorded about them.

A ledger verifies its own hash chain line by line, but that chain alone cannot see lines cut
off at the end, an emptied file, or a file rewritten with a recomputed chain. The run directory
holds independent records of the ledgers, written by the runner (and the Flower server):

* ``checkpoint.safetensors`` (its ``dpfed`` metadata) and its readable copy ``checkpoint.json``:
  the round and each ledger's head ``[seq, hash]`` at the end of that round;
* ``run.json``: the noise multipliers the run used (``noise_multiplier``, ``client_noise_multiplier``,
  ``init_info.dp_init_noise_multiplier``);
* ``summary.json``: epsilon per client, noise multiplier and sample rates, and the client-level
  account (``client_level``), all derived from the ledgers when the run finished.

:func:`verify_run_ledgers` opens the ledgers read-only (never creating one), verifies their chains
(and MACs, given the key), and checks that

* a ledger is there when the run directory shows it was written (``run.json`` or a checkpoint exists:
  the runner creates the ledgers before writing either) and the run claims its guarantee
  (``budget.json`` or ``summary.json``);
* every head a checkpoint records is on the chain (the line at its seq has its hash), and lines
  past the newest checkpoint's head belong to one round, the one in flight when the run stopped
  (written ahead of an update that may have left, before that round's checkpoint);
* every event's noise multiplier, and every training event's sample rate, is the one ``run.json``
  and ``summary.json`` record; a round-0 event is a DP initialisation that ``run.json`` records;
* each client's epsilon recomputed from its events (PRV upper bound, as the runner computes it) is
  at least the one ``summary.json`` reports, and a record-level run whose checkpoint or summary
  has rounds has events;
* the server ledger (client-level DP) holds an event per completed round and at least the
  client-level epsilon and rounds the summary reports.

Every failure raises one error with a one-line message naming the file, the check and the values.
What this proves, and what it cannot (someone who rewrites every file of the run directory
consistently), is in the README section "What the ledger chain proves".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accounting.events import Event, PoissonSkellamEvent
from accounting.ledger import GENESIS_HASH, Ledger
from accounting.prv import epsilon as prv_epsilon
from dpfed.errors import DataError, DpfedError
from dpfed.jsonio import read_json_object

LEDGER = "ledger.jsonl"
SERVER_LEDGER = "server_ledger.jsonl"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"
RUN_JSON = "run.json"
SUMMARY = "summary.json"
BUDGET = "budget.json"
CHECKPOINT_META_KEY = "dpfed"  # the safetensors metadata entry the runner writes
EPSILON_RTOL = 1e-3  # recomputed epsilon may fall short of the summary's by this fraction (numerics, versions)
PARAM_RTOL = 1e-9  # noise multipliers and sample rates round-trip through JSON exactly
MAX_HEADER_BYTES = 100_000_000


class LedgerCheckError(DpfedError):
    """A ledger disagrees with what the run directory recorded about it (checkpoint head, run.json, summary)."""


@dataclass(frozen=True)
class CheckpointHead:
    """What one checkpoint file records about the ledgers."""

    source: str  # file name
    round: int
    ledger_head: tuple[int, str] | None
    server_ledger_head: tuple[int, str] | None
    ledger_keyed: bool


@dataclass
class VerifiedLedgers:
    """The run directory's ledgers, opened read-only and checked; ``None`` where a ledger is absent and not required."""

    run_dir: Path
    ledger: Ledger | None
    server_ledger: Ledger | None
    checks: list[str] = field(default_factory=list)  # one line per check that passed, for reports
    _epsilon: dict[tuple[str, str, float], float] = field(default_factory=dict, init=False, repr=False)

    def epsilon(self, client: str, *, delta: float, server: bool = False) -> float:
        """PRV upper bound on ``client``'s epsilon at ``delta`` from its events (0 without events); cached."""
        ledger = self.server_ledger if server else self.ledger
        if ledger is None:
            raise LedgerCheckError(f"{self.run_dir / (SERVER_LEDGER if server else LEDGER)}: ledger not found")
        cache_key = (SERVER_LEDGER if server else LEDGER, client, float(delta))
        if cache_key not in self._epsilon:
            self._epsilon[cache_key] = prv_epsilon(ledger.events(client), delta=delta).upper
        return self._epsilon[cache_key]


def verify_run_ledgers(run_dir: str | Path, *, key: bytes | None = None) -> VerifiedLedgers:
    """Open ``run_dir``'s ledgers read-only and check them against its checkpoint, run.json and summary.json.

    ``key`` (see :func:`accounting.ledger.load_key`) must be the key of keyed ledgers; every line's
    MAC is then verified, and a plain ledger is refused. Raises :class:`LedgerCheckError`, or the
    ledger's own ``LedgerCorruptError``/``LedgerKeyError``, with a one-line message.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"RUN_DIR must be a run directory, got {str(run_dir)!r} (not a directory)")
    heads = _checkpoint_heads(run_dir)
    run_info = read_json_object(run_dir / RUN_JSON, required=False)
    summary = read_json_object(run_dir / SUMMARY, required=False)
    budget = read_json_object(run_dir / BUDGET, required=False)
    # the runner creates the ledgers before it writes run.json or a checkpoint; it claims a guarantee in
    # budget.json and summary.json (the noise-free twin of dpfed compare claims none and keeps no ledger)
    written = heads[0].source if heads else (RUN_JSON if run_info is not None else None)
    claims_record = (budget or {}).get("epsilon") is not None or bool(
        (summary or {}).get("epsilon_spent") is not None or (summary or {}).get("epsilon_per_client"))
    claims_client = bool((budget or {}).get("client_level") or (summary or {}).get("client_level"))
    client_level = claims_client or (run_info or {}).get("client_noise_multiplier") is not None
    newest = max(heads, key=lambda h: h.round) if heads else None
    out = VerifiedLedgers(run_dir, None, None)

    out.ledger = _open(run_dir / LEDGER, key=key, required_by=written if claims_record else None, out=out)
    if out.ledger is not None:
        _check_heads(out.ledger, [(h, h.ledger_head) for h in heads], out=out)
        _check_record_events(out.ledger, run_info=run_info, summary=summary, out=out)
        _check_record_progress(out, newest=newest, summary=summary, run_info=run_info, client_level=client_level)
        _check_record_epsilon(out, summary=summary)

    out.server_ledger = _open(run_dir / SERVER_LEDGER, key=key, required_by=written if claims_client else None, out=out)
    if out.server_ledger is not None:
        _check_heads(out.server_ledger, [(h, h.server_ledger_head) for h in heads if h.server_ledger_head is not None],
                     out=out)
        _check_server(out, run_info=run_info, summary=summary, newest=newest)
    return out


# -- reading the records of the ledgers ------------------------------------------------------


def _pair(value: Any, where: str) -> tuple[int, str] | None:
    if value is None:
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], int)
            and not isinstance(value[0], bool) and value[0] >= -1 and isinstance(value[1], str)):
        return int(value[0]), value[1]
    raise LedgerCheckError(f"{where} must be a [seq, hash] pair, got {value!r}")


def _safetensors_meta(path: Path) -> dict[str, Any]:
    """The runner's metadata in a safetensors file's header (8-byte little-endian length, then JSON)."""
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(size)
            header = json.loads(fh.read(size))
        meta = json.loads(header["__metadata__"][CHECKPOINT_META_KEY])
    except (OSError, ValueError, KeyError, TypeError):
        raise LedgerCheckError(f"{path}: no readable {CHECKPOINT_META_KEY!r} metadata (round, ledger heads) in "
                               f"the checkpoint") from None
    if not isinstance(meta, dict):
        raise LedgerCheckError(f"{path}: checkpoint metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _checkpoint_heads(run_dir: Path) -> list[CheckpointHead]:
    """The checkpoint files' records, newest file first; refuses a readable copy ahead of the checkpoint."""
    heads = []
    for name in (CHECKPOINT, CHECKPOINT_JSON):
        path = run_dir / name
        if not path.exists():
            continue
        meta = _safetensors_meta(path) if name == CHECKPOINT else read_json_object(path, what="checkpoint copy")
        round_ = meta.get("round")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
            raise LedgerCheckError(f"{path}: round must be an integer >= 0, got {round_!r}")
        heads.append(CheckpointHead(name, round_, _pair(meta.get("ledger_head"), f"{path}: ledger_head"),
                                    _pair(meta.get("server_ledger_head"), f"{path}: server_ledger_head"),
                                    meta.get("ledger_keyed") is True))
    if len(heads) == 2:
        main, copy = heads
        if copy.round > main.round:  # the copy is written after the checkpoint: it may lag one round, never lead
            raise LedgerCheckError(f"{run_dir / CHECKPOINT_JSON}: round {copy.round} is ahead of {CHECKPOINT}'s round "
                                   f"{main.round}: the checkpoint was replaced by an older one")
        if copy.round == main.round and (copy.ledger_head, copy.server_ledger_head) != (
                main.ledger_head, main.server_ledger_head):
            raise LedgerCheckError(f"{run_dir / CHECKPOINT_JSON}: ledger heads {copy.ledger_head}, "
                                   f"{copy.server_ledger_head} differ from {CHECKPOINT}'s {main.ledger_head}, "
                                   f"{main.server_ledger_head} for the same round {main.round}")
    return heads


def _open(path: Path, *, key: bytes | None, required_by: str | None, out: VerifiedLedgers) -> Ledger | None:
    if not path.exists():
        if required_by is not None:
            raise LedgerCheckError(f"{path}: ledger not found, but {required_by} shows the run wrote it; refusing "
                                   f"(a reader never creates a ledger)")
        return None
    ledger = Ledger.open_existing(path, key=key)  # verifies every line's hash (and MAC, with the key)
    mac = ("MACs verified" if ledger.mac_verified and ledger.keyed else
           "keyed, MACs NOT checked (no key given)" if ledger.keyed else "not keyed")
    out.checks.append(f"{path.name}: hash chain of {len(ledger)} lines verified; {mac}")
    return ledger


def _check_heads(ledger: Ledger, heads: list[tuple[CheckpointHead, tuple[int, str] | None]],
                 out: VerifiedLedgers) -> None:
    """Each recorded head is on the chain; past the newest, only lines of the round in flight."""
    records = ledger.records()
    for ckpt, head in heads:
        if head is None:
            raise LedgerCheckError(f"{out.run_dir / ckpt.source}: records no head for {ledger.path.name}, which exists")
        seq, digest = head
        where = f"{ckpt.source} (round {ckpt.round})"
        if seq >= len(records):
            raise LedgerCheckError(f"{ledger.path}: holds {len(records)} lines but {where} records its head at seq "
                                   f"{seq}: lines at the end were removed or the file was emptied")
        on_chain = GENESIS_HASH if seq == -1 else records[seq].hash
        if on_chain != digest:
            raise LedgerCheckError(f"{ledger.path}:{seq + 1}: hash {on_chain[:12]}… differs from the head "
                                   f"{digest[:12]}… that {where} records: the ledger was rewritten")
        if ckpt.ledger_keyed and records and not ledger.keyed:
            raise LedgerCheckError(f"{ledger.path}: {where} records a keyed ledger but its lines carry no MAC: "
                                   f"the ledger was rewritten without the key")
    if heads:
        newest, (seq, _) = max(heads, key=lambda item: item[0].round)
        beyond = records[seq + 1:]
        stray = next((r for r in beyond if r.round != newest.round + 1), None)
        if stray is not None:
            raise LedgerCheckError(f"{ledger.path}:{stray.seq + 1}: a line of round {stray.round} follows the head "
                                   f"{newest.source} records for round {newest.round}; only lines of the round in "
                                   f"flight ({newest.round + 1}) may follow it")
        after = f"{len(beyond)} line(s) of round {newest.round + 1} (in flight) after them" if beyond else "none after"
        out.checks.append(f"{ledger.path.name}: heads recorded by {', '.join(h.source for h, _ in heads)} are on the "
                          f"chain; {after}")


# -- the events against run.json and summary.json --------------------------------------------


def _expected(sources: list[tuple[str, dict[str, Any] | None, str]]) -> tuple[bool, float | None, str]:
    """``(known, value, where)`` of a noise multiplier recorded in one or more files, which must agree."""
    found = [(f"{file} {key}", d[key]) for file, d, key in sources if d is not None and key in d]
    if not found:
        return False, None, ""
    found = [(where, None if value is None else _positive(value, where)) for where, value in found]
    (where, value), *others = found
    for other_where, other in others:
        if (value is None) != (other is None) or (value is not None and not _close(value, other)):
            raise LedgerCheckError(f"{other_where} = {other!r} differs from {where} = {value!r}")
    return True, value, where


def _record_sigma(run_info: dict[str, Any] | None, summary: dict[str, Any] | None) -> tuple[bool, float | None, str]:
    return _expected([(RUN_JSON, run_info, "noise_multiplier"), (SUMMARY, summary, "noise_multiplier")])


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LedgerCheckError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=PARAM_RTOL)


def _sigma(event: Event) -> float:
    return float(event.noise_multiplier)


def _secure_params(run_info: dict[str, Any] | None, summary: dict[str, Any] | None) -> dict[str, float] | None:
    """μ_total and the sensitivities of secure aggregation as run.json and summary.json record them (must agree)."""
    found = [(file, _object(d.get("secure_aggregation"), f"{file} secure_aggregation"))
             for file, d in ((RUN_JSON, run_info), (SUMMARY, summary)) if d is not None and d.get("secure_aggregation")]
    if not found:
        return None
    keys = ("mu_total", "l2_sensitivity", "l1_sensitivity")
    (file, first), *others = found
    params = {k: _positive(first.get(k), f"{file} secure_aggregation.{k}") for k in keys}
    for other_file, other in others:
        for k in keys:
            value = _positive(other.get(k), f"{other_file} secure_aggregation.{k}")
            if not _close(value, params[k]):
                raise LedgerCheckError(f"{other_file} secure_aggregation.{k} = {value!r} differs from {file}'s "
                                       f"{params[k]!r}")
    return params


def _check_skellam(event: PoissonSkellamEvent, at: str, secure: dict[str, float] | None) -> None:
    """A Skellam event's μ and sensitivities are the ones the run recorded (secure aggregation)."""
    if secure is None:
        raise LedgerCheckError(f"{at}: a Skellam (secure aggregation) event, but neither {RUN_JSON} nor {SUMMARY} "
                               "records secure_aggregation")
    for k in ("mu", "l2_sensitivity", "l1_sensitivity"):
        want = secure["mu_total" if k == "mu" else k]
        if not _close(getattr(event, k), want):
            raise LedgerCheckError(f"{at}: {k} {getattr(event, k)!r} differs from secure_aggregation."
                                   f"{'mu_total' if k == 'mu' else k} = {want!r}")


def _check_record_events(ledger: Ledger, *, run_info: dict[str, Any] | None, summary: dict[str, Any] | None,
                         out: VerifiedLedgers) -> None:
    known, sigma, where = _record_sigma(run_info, summary)
    init_info = _object((run_info or {}).get("init_info"), f"{RUN_JSON} init_info")
    init_sigma, init_batch = init_info.get("dp_init_noise_multiplier"), init_info.get("dp_init_batch_size")
    if init_sigma is not None:
        init_sigma = _positive(init_sigma, f"{RUN_JSON} init_info.dp_init_noise_multiplier")
    if init_batch is not None:
        init_batch = _positive(init_batch, f"{RUN_JSON} init_info.dp_init_batch_size")
    rates = {c: _positive(q, f"{SUMMARY} sample_rates[{c!r}]")
             for c, q in _object((summary or {}).get("sample_rates"), f"{SUMMARY} sample_rates").items()}
    sizes = {c: _positive(n, f"{SUMMARY} client_sizes[{c!r}]")
             for c, n in _object((summary or {}).get("client_sizes"), f"{SUMMARY} client_sizes").items()}
    checked = skellam = 0
    secure = _secure_params(run_info, summary)
    for record in ledger.records():
        at = f"{ledger.path}:{record.seq + 1}"
        event = record.event
        if isinstance(event, PoissonSkellamEvent):  # secure aggregation: μ in place of σ
            _check_skellam(event, at, secure)
            skellam += 1
            if record.client in rates and not _close(event.sample_rate, rates[record.client]):
                raise LedgerCheckError(f"{at}: sample_rate {event.sample_rate!r} differs from {SUMMARY} "
                                       f"sample_rates[{record.client!r}] = {rates[record.client]!r}")
            checked += 1
            continue
        if record.round == 0:
            if run_info is None:
                continue
            if init_sigma is None:
                raise LedgerCheckError(f"{at}: a round-0 (DP initialisation) event, but {RUN_JSON} records no DP "
                                       f"initialisation (init_info.dp_init_noise_multiplier)")
            if not _close(_sigma(event), init_sigma):
                raise LedgerCheckError(f"{at}: noise_multiplier {_sigma(event)!r} differs from {RUN_JSON} "
                                       f"init_info.dp_init_noise_multiplier = {init_sigma!r}")
            if init_batch is not None and record.client in sizes and hasattr(event, "sample_rate"):
                q = min(1.0, init_batch / sizes[record.client])
                if not _close(event.sample_rate, q):
                    raise LedgerCheckError(f"{at}: sample_rate {event.sample_rate!r} differs from the DP "
                                           f"initialisation's b0 / n = {q!r} ({RUN_JSON}, {SUMMARY} client_sizes)")
            checked += 1
            continue
        if not known:
            continue
        if sigma is None:
            raise LedgerCheckError(f"{at}: a record-level event, but {where} is null (no record-level DP in this run)")
        if not _close(_sigma(event), sigma):
            raise LedgerCheckError(f"{at}: noise_multiplier {_sigma(event)!r} differs from {where} = {sigma!r}")
        if record.client in rates and hasattr(event, "sample_rate") and not _close(event.sample_rate,
                                                                                    rates[record.client]):
            raise LedgerCheckError(f"{at}: sample_rate {event.sample_rate!r} differs from {SUMMARY} "
                                   f"sample_rates[{record.client!r}] = {rates[record.client]!r}")
        checked += 1
    if checked:
        out.checks.append(f"{ledger.path.name}: noise multipliers{' (Skellam: μ and sensitivities)' if skellam else ''} "
                          f"and sample rates of {checked} events match "
                          f"{', '.join(f for f, d in ((RUN_JSON, run_info), (SUMMARY, summary)) if d is not None)}")


def _check_record_progress(out: VerifiedLedgers, *, newest: CheckpointHead | None, summary: dict[str, Any] | None,
                           run_info: dict[str, Any] | None, client_level: bool) -> None:
    """A record-level-only run with completed rounds has training events (an emptied ledger does not)."""
    ledger = out.ledger
    _, sigma, _ = _record_sigma(run_info, summary)
    if sigma is None or client_level:  # with client-level sampling a round may train no client at all
        return
    rounds = [(newest.source, newest.round)] if newest is not None else []
    if summary is not None and isinstance(summary.get("rounds_completed"), int):
        rounds.append((SUMMARY, summary["rounds_completed"]))
    done = next(((source, r) for source, r in rounds if r >= 1), None)
    if done is not None and not any(record.round >= 1 for record in ledger.records()):
        raise LedgerCheckError(f"{ledger.path}: holds no training event, but {done[0]} records {done[1]} completed "
                               f"round(s) of a record-level DP run: the ledger was emptied or rewritten")


def _object(value: Any, where: str) -> dict[str, Any]:
    """``value`` as a JSON object ({} for null or absent)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LedgerCheckError(f"{where} must be an object, got {type(value).__name__}")
    return value


def _tolerance(value: float) -> float:
    return EPSILON_RTOL * max(1.0, abs(value))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LedgerCheckError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _check_record_epsilon(out: VerifiedLedgers, *, summary: dict[str, Any] | None) -> None:
    """Each client's epsilon recomputed from the ledger is at least what summary.json reports."""
    if summary is None:
        return
    per_client = summary.get("epsilon_per_client") or {}
    spent = summary.get("epsilon_spent")
    if not per_client and spent is None:
        return
    if not isinstance(per_client, dict):
        raise LedgerCheckError(f"{out.run_dir / SUMMARY}: epsilon_per_client must be an object, got {per_client!r}")
    delta = summary.get("delta")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise LedgerCheckError(f"{out.run_dir / SUMMARY}: delta must be in (0, 1) when epsilon is reported, "
                               f"got {delta!r}")
    ledger = out.ledger
    for client, reported in sorted(per_client.items()):
        reported = _number(reported, f"{out.run_dir / SUMMARY}: epsilon_per_client[{client!r}]")
        got = out.epsilon(client, delta=delta)
        if got < reported - _tolerance(reported):
            raise LedgerCheckError(
                f"{ledger.path}: client {client!r} epsilon {got:.4f} recomputed from its {len(ledger.events(client))} "
                f"events (PRV upper bound, delta {delta:g}) is below the {reported:.4f} that {SUMMARY} reports: "
                f"the ledger was rewritten or lines were removed")
    if spent is not None:
        spent = _number(spent, f"{out.run_dir / SUMMARY}: epsilon_spent")
        got = max((out.epsilon(c, delta=delta) for c in ledger.clients()), default=0.0)
        if got < spent - _tolerance(spent):
            raise LedgerCheckError(f"{ledger.path}: largest epsilon recomputed from the events {got:.4f} is below "
                                   f"{SUMMARY} epsilon_spent {spent:.4f}: the ledger was rewritten or lines were "
                                   f"removed")
    out.checks.append(f"{ledger.path.name}: epsilon recomputed from the events >= {SUMMARY}'s for "
                      f"{len(per_client)} client(s)")


def _check_server(out: VerifiedLedgers, *, run_info: dict[str, Any] | None, summary: dict[str, Any] | None,
                  newest: CheckpointHead | None) -> None:
    """The server ledger (client-level DP) against run.json, summary.json client_level and the checkpoint round."""
    ledger = out.server_ledger
    level = (summary or {}).get("client_level")
    level = level if isinstance(level, dict) else None
    known, sigma, where = _expected([(RUN_JSON, run_info, "client_noise_multiplier"),
                                     (f"{SUMMARY} client_level", level, "noise_multiplier")])
    records = ledger.records()
    if known:
        for record in records:
            at = f"{ledger.path}:{record.seq + 1}"
            if sigma is None:
                raise LedgerCheckError(f"{at}: a client-level event, but {where} is null (no client-level DP)")
            if not _close(_sigma(record.event), sigma):
                raise LedgerCheckError(f"{at}: noise_multiplier {_sigma(record.event)!r} differs from {where} = "
                                       f"{sigma!r}")
    if newest is not None and newest.server_ledger_head is not None:
        released = sum(1 for r in records if 1 <= r.round <= newest.round)
        if released < newest.round:
            raise LedgerCheckError(f"{ledger.path}: {released} events for rounds 1-{newest.round}, but "
                                   f"{newest.source} is at round {newest.round} (one event per released round)")
    if level is not None:
        rounds = level.get("rounds_released")
        if isinstance(rounds, int) and len(records) < rounds:
            raise LedgerCheckError(f"{ledger.path}: {len(records)} events, but {SUMMARY} client_level.rounds_released "
                                   f"is {rounds}: lines were removed")
        if level.get("epsilon") is not None:
            delta = level.get("delta")
            if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
                raise LedgerCheckError(f"{out.run_dir / SUMMARY}: client_level.delta must be in (0, 1), got {delta!r}")
            reported = _number(level["epsilon"], f"{out.run_dir / SUMMARY}: client_level.epsilon")
            accounts = ledger.clients()
            got = max((out.epsilon(a, delta=delta, server=True) for a in accounts), default=0.0)
            if got < reported - _tolerance(reported):
                raise LedgerCheckError(f"{ledger.path}: client-level epsilon {got:.4f} recomputed from {len(records)} "
                                       f"events is below the {reported:.4f} that {SUMMARY} client_level reports: the "
                                       f"ledger was rewritten or lines were removed")
    sources = ", ".join(f for f, d in ((RUN_JSON, run_info), (SUMMARY, level)) if d is not None) or "no record"
    out.checks.append(f"{ledger.path.name}: {len(records)} client-level events match {sources}")
