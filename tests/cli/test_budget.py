"""``dpfed budget RUN_DIR``: per-client spent and remaining epsilon from the ledger."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from accounting import prv, rdp
from accounting.events import GaussianEvent, PoissonGaussianEvent
from accounting.ledger import Ledger


@pytest.fixture
def cli(monkeypatch, capsys):
    for name in ("train", "comm"):
        if importlib.util.find_spec(f"dpfed.cli.{name}") is None:
            stub = types.ModuleType(f"dpfed.cli.{name}")
            setattr(stub, name, lambda: None)
            monkeypatch.setitem(sys.modules, f"dpfed.cli.{name}", stub)
    from dpfed.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def step(q):
    return PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=q, count=100)


@pytest.fixture
def run_dir(tmp_path):
    ledger = Ledger(tmp_path / "ledger.jsonl")
    init = GaussianEvent(noise_multiplier=10.0)
    for client, q in (("0", 0.01), ("1", 0.02)):
        ledger.append(client=client, round=0, event=init, note="dp init")
        for round_ in (1, 2, 3):
            ledger.append(client=client, round=round_, event=step(q))
    ledger.append(client="1", round=5, event=step(0.02))
    (tmp_path / "budget.json").write_text(json.dumps(
        {"epsilon": 2.0, "delta": 1e-5, "accountant": "prv", "privacy_unit": "record"}))
    return tmp_path


def test_json_report(cli, run_dir):
    before = (run_dir / "ledger.jsonl").read_bytes()
    code, out, err = cli("budget", str(run_dir), "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert (result["epsilon_budget"], result["delta"], result["accountant"]) == (2.0, 1e-5, "prv")
    rows = {row["client"]: row for row in result["clients"]}
    expected = {
        "0": [GaussianEvent(noise_multiplier=10.0)] + [step(0.01)] * 3,
        "1": [GaussianEvent(noise_multiplier=10.0)] + [step(0.02)] * 4,
    }
    for client, events in expected.items():
        bound = prv.epsilon(events, delta=1e-5)
        row = rows[client]
        assert (row["epsilon"], row["epsilon_lower"], row["epsilon_estimate"]) == (
            bound.upper, bound.lower, bound.estimate)
        assert row["remaining"] == pytest.approx(2.0 - bound.upper)
        assert row["exceeded"] is (bound.upper > 2.0)
    assert rows["0"]["rounds"] == [0, 1, 2, 3] and rows["1"]["rounds"] == [0, 1, 2, 3, 5]
    assert result["max_epsilon"] == max(r["epsilon"] for r in rows.values())
    assert (run_dir / "ledger.jsonl").read_bytes() == before  # read-only


def test_table_report(cli, run_dir):
    code, out, err = cli("budget", str(run_dir))
    assert code == 0, err
    assert "remaining" in out and "0-3, 5" in out


def test_rdp_budget(cli, run_dir):
    (run_dir / "budget.json").write_text(json.dumps({"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"}))
    code, out, _ = cli("budget", str(run_dir), "--format", "json")
    assert code == 0
    row = json.loads(out)["clients"][0]
    events = [GaussianEvent(noise_multiplier=10.0)] + [step(0.01)] * 3
    assert row["epsilon"] == pytest.approx(rdp.epsilon(events, delta=1e-5))


def test_empty_ledger(cli, tmp_path):
    Ledger(tmp_path / "ledger.jsonl")
    (tmp_path / "budget.json").write_text(json.dumps({"epsilon": 1.0, "delta": 1e-6}))
    code, out, _ = cli("budget", str(tmp_path), "--format", "json")
    assert code == 0 and json.loads(out)["clients"] == []


def corrupt_ledger(run_dir):
    path = run_dir / "ledger.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"noise_multiplier":1.0', b'"noise_multiplier":9.0', 1))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "budget.json").unlink(), "budget file not found"),
        (lambda d: (d / "ledger.jsonl").unlink(), "ledger not found"),
        (lambda d: (d / "budget.json").write_text("{oops"), "not valid JSON"),
        (lambda d: (d / "budget.json").write_text('{"epsilon": -1, "delta": 1e-5}'), "epsilon must be"),
        (lambda d: (d / "budget.json").write_text('{"epsilon": 1, "delta": 1}'), "delta must be"),
        (lambda d: (d / "budget.json").write_text('{"epsilon": 1, "delta": 1e-5, "privacy_unit": "client"}'),
         "privacy_unit"),
        (corrupt_ledger, "ledger.jsonl:2: checksum mismatch"),
        (lambda d: (d / "ledger.jsonl").write_bytes((d / "ledger.jsonl").read_bytes()[:-10]), "truncated last line"),
    ],
)
def test_missing_or_corrupt_files_exit_2(cli, run_dir, damage, message):
    damage(run_dir)
    code, out, err = cli("budget", str(run_dir))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err + out
    assert not (run_dir / "ledger.jsonl.torn").exists()


def test_not_a_directory(cli, tmp_path):
    code, _, err = cli("budget", str(tmp_path / "nope"))
    assert code == 2 and "RUN_DIR must be a directory" in err
    assert not (tmp_path / "nope").exists()


def _server_ledger(path, rounds):
    led = Ledger(path / "server_ledger.jsonl")
    ev = PoissonGaussianEvent(noise_multiplier=1.5, sample_rate=0.5, count=1, unit="client")
    for r in rounds:
        led.append(client="all-clients", round=r, event=ev)
    return [ev] * len(rounds)


def test_client_level_only_run(cli, tmp_path):
    events = _server_ledger(tmp_path, [1, 2, 3, 4])
    (tmp_path / "budget.json").write_text(json.dumps(
        {"accountant": "prv", "client_level": {"epsilon": 5.0, "delta": 1e-3}}))
    code, out, err = cli("budget", str(tmp_path), "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert "clients" not in result  # no record-level ledger in a client-level-only run
    level = result["client_level"]
    expected = prv.epsilon(events, delta=1e-3).upper
    assert level["epsilon"] == pytest.approx(expected) and 0 < expected < 5.0
    assert level["remaining"] == pytest.approx(5.0 - expected) and level["rounds"] == [1, 2, 3, 4]
    assert "trusted aggregator" in level["trust"]
    code, out, err = cli("budget", str(tmp_path))
    assert code == 0 and "client-level DP" in out and f"{expected:.4f}" in out


def test_both_levels_reported_separately(cli, run_dir):
    events = _server_ledger(run_dir, [1, 2])
    data = json.loads((run_dir / "budget.json").read_text())
    data["client_level"] = {"epsilon": None, "delta": 1e-3}
    (run_dir / "budget.json").write_text(json.dumps(data))
    code, out, err = cli("budget", str(run_dir), "--format", "json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["clients"]) == 2 and result["epsilon_budget"] == 2.0
    assert result["client_level"]["epsilon"] == pytest.approx(prv.epsilon(events, delta=1e-3).upper)
    assert result["client_level"]["remaining"] is None


def test_client_level_missing_server_ledger(cli, tmp_path):
    (tmp_path / "budget.json").write_text(json.dumps({"client_level": {"epsilon": 5.0, "delta": 1e-3}}))
    code, _, err = cli("budget", str(tmp_path))
    assert code == 2 and "server ledger not found" in err and len(err.strip().splitlines()) == 1
