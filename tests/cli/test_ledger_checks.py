"""`dpfed budget` and `dpfed audit` check the ledgers against the run directory before using them.

One tiny run (record-level and client-level DP, gradient canaries) is trained once; each test copies
it and tampers with the copy the way the issue describes: a deleted last line, an emptied or
missing ledger, a ledger rewritten with σ 50 and a recomputed hash chain (alone, and with the
checkpoint heads, the summary's epsilon rewritten to match), and a keyed ledger edited without the
key. A ledger ahead of the checkpoint by the lines of the round in flight is accepted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from attacks.plan import audit_plan

from accounting import ledger as ledger_mod
from accounting.events import PoissonGaussianEvent
from accounting.ledger import Ledger, new_key_file
from accounting.prv import epsilon
from dpfed.rundir_check import LedgerCheckError, verify_run_ledgers

ROUNDS = 2
SIGMA = 1.2
DELTA = 1e-4
LOCAL_STEPS = 2


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """A finished run directory with ledger.jsonl, server_ledger.jsonl, checkpoint, run.json and summary.json."""
    import torch

    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 4, "max_length": 32},
        "data": {"source": tiny_csv, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                 "canaries": 20},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": 16, "eval_batch_size": 128,
                  "client_fraction": 1.0},
        "privacy": {"epsilon": 3.0, "delta": DELTA, "noise_multiplier": SIGMA, "unit": "both",
                    "client_noise_multiplier": 1.0, "client_delta": 1e-3},
        "seed": 0, "device": "cpu",
    })
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine
    try:
        out = tmp_path_factory.mktemp("ledger-checks") / "run"
        run(prepare(cfg, audit=audit_plan(cfg)), out)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def run_dir(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _one_line_exit_2(run_cli, argv, message):
    code, out, err = run_cli(argv)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in out + err
    assert message in err, err
    return err


# -- how an attacker (or an accident) changes the files --------------------------------------


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_chain(path: Path, records: list[dict], *, mac: str = "drop", key: bytes | None = None) -> tuple[int, str]:
    """Write ``records`` with a recomputed hash chain (the ledger module's own hashing); return the head.

    mac: "drop" removes MACs, "keep" leaves the old (now stale) ones, "sign" recomputes them with ``key``.
    """
    prev = ledger_mod.GENESIS_HASH
    lines = []
    for record in records:
        content = {k: v for k, v in record.items() if k not in ("hash", "mac")}
        content["prev"] = prev
        out = {**content, "hash": ledger_mod._chain_hash(prev, content)}
        if mac == "keep" and "mac" in record:
            out["mac"] = record["mac"]
        elif mac == "sign":
            out["mac"] = ledger_mod._chain_mac(key, prev, content)
        lines.append(ledger_mod._canonical(out))
        prev = out["hash"]
    path.write_text("".join(line + "\n" for line in lines))
    return len(records) - 1, prev


def _sigma_50(path: Path, *, mac: str = "drop") -> tuple[int, str]:
    records = _records(path)
    for record in records:
        record["event"]["noise_multiplier"] = 50.0
    return _write_chain(path, records, mac=mac)


def _set_heads(run_dir: Path, **heads: list) -> None:
    """Rewrite the ledger heads in checkpoint.safetensors (metadata) and checkpoint.json."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = run_dir / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads(fh.metadata()["dpfed"])
    meta.update(heads)
    save_file(load_file(str(path)), str(path), metadata={"dpfed": json.dumps(meta)})
    (run_dir / "checkpoint.json").write_text(json.dumps(meta))


def _set_summary_epsilon(run_dir: Path) -> None:
    """Make summary.json's epsilon agree with the (rewritten) ledger, as the runner would have written it."""
    summary = json.loads((run_dir / "summary.json").read_text())
    led = Ledger(run_dir / "ledger.jsonl")
    per = {c: epsilon(led.events(c), delta=summary["delta"]).upper for c in led.clients()}
    summary["epsilon_per_client"], summary["epsilon_spent"] = per, max(per.values())
    (run_dir / "summary.json").write_text(json.dumps(summary))


def _in_flight(run_dir: Path, round_: int) -> None:
    """Append the events of one more round, as a crash after the write-ahead append leaves them."""
    summary = json.loads((run_dir / "summary.json").read_text())
    led = Ledger(run_dir / "ledger.jsonl")
    for client, q in summary["sample_rates"].items():
        led.append(client=client, round=round_,
                   event=PoissonGaussianEvent(noise_multiplier=SIGMA, sample_rate=q, count=LOCAL_STEPS))


def _budget(run_dir: Path) -> list[str]:
    return ["budget", str(run_dir), "--format", "json"]


def _audit(run_dir: Path) -> list[str]:
    return ["audit", str(run_dir), "--out", str(run_dir / "report"), "--format", "json"]


COMMANDS = {"budget": _budget, "audit": _audit}


# -- the untouched run and the in-flight round are accepted -----------------------------------


def test_untouched_run_passes_every_check(run_dir, run_cli):
    verified = verify_run_ledgers(run_dir)
    assert len(verified.ledger) == 3 * ROUNDS and len(verified.server_ledger) == ROUNDS
    assert any("heads recorded by checkpoint.safetensors, checkpoint.json are on the chain" in c
               for c in verified.checks)
    assert any("noise multipliers and sample rates of 6 events match run.json, summary.json" in c
               for c in verified.checks)
    code, out, err = run_cli(_budget(run_dir))
    assert code == 0, err
    assert json.loads(out)["ledger_checks"] == verified.checks


@pytest.mark.parametrize("command", COMMANDS)
def test_ledger_ahead_by_the_round_in_flight_is_accepted(run_dir, run_cli, command):
    _in_flight(run_dir, ROUNDS + 1)
    before = (run_dir / "ledger.jsonl").read_bytes()
    code, out, err = run_cli(COMMANDS[command](run_dir))
    assert code in (0, 3) and "Traceback" not in err, err  # 3 would be the audit's verdict, not a refusal
    result = json.loads(out)
    if command == "budget":  # the in-flight round counts: over-count, never under-count
        assert all(row["num_rounds"] == ROUNDS + 1 for row in result["clients"])
    else:
        assert result["verdict"] == "consistent" and result["claim"]["epsilon_source"].startswith("ledger.jsonl")
    assert (run_dir / "ledger.jsonl").read_bytes() == before  # read-only


def test_lines_beyond_the_in_flight_round_are_refused(run_dir):
    _in_flight(run_dir, ROUNDS + 2)
    with pytest.raises(LedgerCheckError, match=r"a line of round 4 follows the head .* round 2; only lines of the "
                                                r"round in flight \(3\)"):
        verify_run_ledgers(run_dir)


# -- tampering: exit 2, one line ----------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_deleted_last_line(run_dir, run_cli, command):
    path = run_dir / "ledger.jsonl"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()[:-1]))
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "holds 5 lines but checkpoint.safetensors (round 2) "
                                                          "records its head at seq 5: lines at the end were removed")


@pytest.mark.parametrize("command", COMMANDS)
def test_emptied_ledger(run_dir, run_cli, command):
    (run_dir / "ledger.jsonl").write_bytes(b"")
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "holds 0 lines but checkpoint.safetensors")


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_ledger_is_refused_and_not_created(run_dir, run_cli, command):
    (run_dir / "ledger.jsonl").unlink()
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "ledger.jsonl: ledger not found, but "
                                                          "checkpoint.safetensors shows the run wrote it")
    assert not (run_dir / "ledger.jsonl").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_deleted_last_line_of_the_server_ledger(run_dir, run_cli, command):
    path = run_dir / "server_ledger.jsonl"
    path.write_text(path.read_text().splitlines()[0] + "\n")
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "server_ledger.jsonl: holds 1 lines but")


@pytest.mark.parametrize("command", COMMANDS)
def test_sigma_50_with_a_recomputed_chain(run_dir, run_cli, command):
    _sigma_50(run_dir / "ledger.jsonl")
    assert len(Ledger(run_dir / "ledger.jsonl")) == 3 * ROUNDS  # the chain alone verifies
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "differs from the head")


@pytest.mark.parametrize("command", COMMANDS)
def test_sigma_50_with_the_checkpoint_heads_rewritten_too(run_dir, run_cli, command):
    head = _sigma_50(run_dir / "ledger.jsonl")
    _set_heads(run_dir, ledger_head=list(head))
    _one_line_exit_2(run_cli, COMMANDS[command](run_dir), "noise_multiplier 50.0 differs from run.json "
                                                          "noise_multiplier = 1.2")


def test_sigma_50_is_caught_by_the_summary_alone(run_dir):
    """Without run.json, the summary's σ and its epsilon each catch the rewrite."""
    head = _sigma_50(run_dir / "ledger.jsonl")
    _set_heads(run_dir, ledger_head=list(head))
    (run_dir / "run.json").unlink()
    with pytest.raises(LedgerCheckError, match="noise_multiplier 50.0 differs from summary.json noise_multiplier"):
        verify_run_ledgers(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["noise_multiplier"] = 50.0
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(LedgerCheckError, match=r"epsilon 0\.0\d+ recomputed from its 2 events .* is below the "
                                               r"\d\.\d{4} that summary.json reports"):
        verify_run_ledgers(run_dir)


def test_a_run_that_claims_nothing_needs_no_ledger(run_dir):
    """Like the noise-free twin of dpfed compare: no budget.json, no epsilon in the summary, no ledger kept."""
    for name in ("ledger.jsonl", "server_ledger.jsonl", "budget.json"):
        (run_dir / name).unlink()
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(epsilon_spent=None, epsilon_per_client={}, client_level=None)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    verified = verify_run_ledgers(run_dir)
    assert verified.ledger is None and verified.server_ledger is None and verified.checks == []


def test_checkpoint_copy_ahead_of_the_checkpoint_is_refused(run_dir):
    meta = json.loads((run_dir / "checkpoint.json").read_text())
    (run_dir / "checkpoint.json").write_text(json.dumps({**meta, "round": meta["round"] + 1}))
    with pytest.raises(LedgerCheckError, match="round 3 is ahead of checkpoint.safetensors's round 2"):
        verify_run_ledgers(run_dir)


# -- keyed ledgers --------------------------------------------------------------------------------


@pytest.fixture
def keyed(run_dir, tmp_path):
    """The run's ledgers signed with a site key (the hashes, and so the checkpoint heads, stay the same)."""
    key_file = tmp_path / "site.key"
    key = new_key_file(key_file)
    for name in ("ledger.jsonl", "server_ledger.jsonl"):
        _write_chain(run_dir / name, _records(run_dir / name), mac="sign", key=key)
    return run_dir, key_file


def _full_rewrite(run_dir: Path, *, mac: str) -> None:
    """σ 50 everywhere, by someone who can write every file of the run directory but has no key."""
    head = _sigma_50(run_dir / "ledger.jsonl", mac=mac)
    _set_heads(run_dir, ledger_head=list(head))
    _set_summary_epsilon(run_dir)
    for name in ("summary.json", "run.json"):
        data = json.loads((run_dir / name).read_text())
        data["noise_multiplier"] = 50.0
        (run_dir / name).write_text(json.dumps(data))


def test_keyed_run_passes_with_its_key(keyed, run_cli):
    run_dir, key_file = keyed
    code, out, err = run_cli([*_budget(run_dir), "--ledger-key", str(key_file)])
    assert code == 0, err
    assert "ledger.jsonl: hash chain of 6 lines verified; MACs verified" in json.loads(out)["ledger_checks"]


def test_keyed_run_without_the_key_says_the_macs_were_not_checked(keyed, run_cli):
    run_dir, _ = keyed
    code, out, err = run_cli(_budget(run_dir))
    assert code == 0, err
    assert "ledger.jsonl: hash chain of 6 lines verified; keyed, MACs NOT checked (no key given)" in json.loads(
        out)["ledger_checks"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("mac, message", [("keep", "ledger.jsonl:1: MAC mismatch"),
                                          ("drop", "a key was given but the ledger is not keyed")])
def test_keyed_ledger_rewritten_without_the_key(keyed, run_cli, command, mac, message):
    run_dir, key_file = keyed
    _full_rewrite(run_dir, mac=mac)
    _one_line_exit_2(run_cli, [*COMMANDS[command](run_dir), "--ledger-key", str(key_file)], message)


def test_full_rewrite_of_a_plain_run_is_not_detectable(run_dir):
    """The limit the README states: whoever rewrites every file consistently is not caught without a key."""
    _full_rewrite(run_dir, mac="drop")
    verify_run_ledgers(run_dir)


def test_group_readable_key_file_is_refused(keyed, run_cli):
    run_dir, key_file = keyed
    key_file.chmod(0o640)
    _one_line_exit_2(run_cli, [*_budget(run_dir), "--ledger-key", str(key_file)],
                     "key file must be accessible by its owner only (chmod 600), got mode 0640")
