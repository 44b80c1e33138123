"""Real Flower deployments on loopback: a SuperLink and SuperNodes as processes (no Ray, no simulation).

Equivalence with ``dpfed train`` (same global R after each round, same ledgers), a site killed
during a round, TLS with SuperNode authentication, and the ``dpfed flower-local`` command with
Ctrl-C. Every test checks that no process it started is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed (pip install '.[flower]')")
pytestmark = pytest.mark.flower

from accounting.ledger import Ledger  # noqa: E402
from attacks.plan import audit_plan  # noqa: E402
from dpfed.flower.local import LocalDeployment, shim_app, write_toml  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1"}


def _alive(pids) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _nodes(out: Path, sites: int, **extra) -> list[dict]:
    return [{"partition-id": i, "num-partitions": sites, "ledger": str(out / "sites" / f"client-{i:03d}" / "ledger.jsonl"),
             "epsilon": 3.0, "delta": 1e-4, "seed": 0, **extra} for i in range(sites)]


def _deploy(out: Path, cfg_path: Path | None, *, sites: int = 3, app_dir: Path | None = None,
            round_timeout: float = 300.0, during=None, timeout: float = 600.0, server: dict | None = None,
            work_name: str = "flower") -> str:
    """Run the app on a fresh loopback deployment; return the final status; assert nothing is left running.

    ``server``: more run-config keys (``stop-after``, ``resume``); ``cfg_path`` None with ``resume``."""
    work = out / work_name
    work.mkdir(parents=True)
    run_config = write_toml(work / "run-config.toml", {**({"config": str(cfg_path)} if cfg_path else {}),
                                                       "out-dir": str(out), "sites": sites, "min-sites": 1,
                                                       "round-timeout": round_timeout, **(server or {})})
    seen: set[int] = set()
    with LocalDeployment(work, node_configs=_nodes(out, sites), env=ENV) as dep:
        run_id = dep.submit(app_dir or shim_app(work / "app"), run_config)

        def poll():
            seen.update(dep.pids())
            if during is not None:
                during(dep, out)

        status = dep.wait(run_id, timeout=timeout, on_poll=poll,
                          done=lambda: (out / "summary.json").is_file() or (out / "error.txt").is_file())
        seen.update(dep.pids())
        if status != "finished:completed":  # the ServerApp's output, for the failure message
            print(dep.save_run_log(run_id, work / "run.log").read_text(errors="replace")[-6000:])
    assert len(seen) >= 1 + 2 * sites  # SuperLink, its SuperExec, SuperNodes and theirs
    assert _alive(seen) == [], "processes left behind"
    return status


def _records(ledger: Ledger, client: str) -> list[tuple[int, object]]:
    return [(r.round, r.event) for r in ledger.records() if r.client == client]


FEATURES = {  # one equivalence deployment per feature
    "record": {},
    "both": {"privacy.unit": "both", "privacy.client_epsilon": 8.0, "privacy.client_delta": 1e-2,
             "privacy.client_clip": 0.5, "train.client_fraction": 0.67},
    "flora": {"train.method": "flora"},
    "dp-init": {"init.strategy": "dp", "init.dp_batch_size": 32},
    # distributed DP: one FedSGD step per round, the sites' integer messages summed by Flower's SecAgg+
    "secure": {"privacy.aggregation": "secure", "train.local_steps": 1},
    # an audited run: gradient canaries on the sites, canary clients on the server, held-out non-members
    "canaries": {"data.canaries": 20, "data.canary_clients": 6, "privacy.unit": "both", "privacy.client_epsilon": 8.0,
                 "privacy.client_delta": 1e-2, "privacy.client_clip": 0.5, "train.client_fraction": 0.67},
}


# `both` (record-level DP-SGD on the sites, DP-FedAvg on the server) runs in `make test`; the other four
# deployments (about 1.5 min each) run in `make test-slow`, which CI runs after it
@pytest.mark.parametrize("feature", [f if f == "both" else pytest.param(f, marks=pytest.mark.slow) for f in sorted(FEATURES)])
def test_flower_run_equals_in_process_run(flower_cfg_path, tmp_path, feature):
    """Same seed, partition and config: the same global R after each round and the same ledgers.

    ``both`` adds client-level DP-FedAvg: the Flower server clips, adds the noise and keeps the
    server ledger exactly as the in-process server does (one round loop, ``dpfed.session``).
    ``dp-init`` runs the accounted DP initialisation on the sites (a ``query.dp_init`` message).
    ``flora`` is the hardest LoRA baseline: it folds into W0 and redraws A every round, so the
    server sends its frozen tensors with every round.
    The app is submitted from the repository itself (``flwr run .``: the FAB carries dpfed).
    """
    from safetensors.torch import load_file

    from dpfed import config as cfgmod
    from dpfed.runner import load_checkpoint, prepare, run

    if FEATURES[feature]:
        cfg = cfgmod.override(cfgmod.load(flower_cfg_path), **FEATURES[feature])
        flower_cfg_path = tmp_path / f"{feature}.yaml"
        flower_cfg_path.write_text(cfgmod.to_yaml(cfg))
    out = tmp_path / "flower-run"
    assert _deploy(out, flower_cfg_path, app_dir=REPO) == "finished:completed"
    ref = tmp_path / "in-process"
    after_round = {}

    def progress(kind, info):
        if kind == "round":
            after_round[info["round"]] = load_checkpoint(ref)[1]

    loaded = cfgmod.load(flower_cfg_path)
    expected = run(prepare(loaded, audit=audit_plan(loaded)), ref, progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    assert summary["flower"]["replies_rejected"] == summary["flower"]["sites_failed"] == 0
    for rnd in (1, 2):
        got = load_file(str(out / "rounds" / f"round-{rnd:03d}.safetensors"))
        want = after_round[rnd]
        assert set(got) == set(want) and any(k.endswith(".R") or "lora_" in k for k in got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    in_process, reported = Ledger(ref / "ledger.jsonl"), Ledger(out / "ledger.jsonl")
    for i in range(3):
        cid = f"client-{i:03d}"
        site = Ledger(out / "sites" / cid / "ledger.jsonl")
        assert site.clients() == [cid]
        assert _records(site, cid) == _records(in_process, cid) == _records(reported, cid)
        if feature not in ("both", "canaries"):  # (with client-level Poisson sampling a site may sit a round out)
            assert [r for r, _ in _records(site, cid)] == ([0, 1, 2] if feature == "dp-init" else [1, 2])
    assert summary["epsilon_per_client"] == pytest.approx(expected["epsilon_per_client"], rel=1e-12)
    assert summary["noise_multiplier"] == expected["noise_multiplier"]
    for a, b in zip(*(([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]) for d in (ref, out))):
        assert (a["round"], a.get("clients"), a.get("bytes_up")) == (b["round"], b.get("clients"), b.get("bytes_up"))
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-6)
    for f in ("config.yaml", "budget.json", "run.json", "initial_state.safetensors", "checkpoint.safetensors",
              "checkpoint.json"):
        assert (out / f).is_file(), f
    if feature == "canaries":  # the same secret canaries, and dpfed audit reads the Flower run
        assert (out / "canaries.json").read_text() == (ref / "canaries.json").read_text()
        assert (out / "canary_clients.json").read_text() == (ref / "canary_clients.json").read_text()
        from attacks.audit import audit_run

        assert audit_run(out)["verdict"] in ("consistent", "no-claim")
    if feature in ("both", "canaries"):  # the server ledger and the client-level guarantee, as in process
        assert _records(Ledger(out / "server_ledger.jsonl"), "all-clients") == _records(
            Ledger(ref / "server_ledger.jsonl"), "all-clients")
        assert summary["client_level"]["epsilon"] == pytest.approx(expected["client_level"]["epsilon"], rel=1e-12)


@pytest.mark.slow  # CI runs it (make test-slow)
def test_flower_instruct_run_equals_in_process_run(tiny_instruct_config, tmp_path):
    """Instruction tuning on Flower (issue 14): prompt/response records, response-only loss, the frozen-prefix
    cache on the sites; the same global R after each round, ledgers and ε as ``dpfed train`` in process."""
    from dpfed import config as cfgmod

    cfg = cfgmod.from_dict(tiny_instruct_config(init={"strategy": "random", "head": "random"}, seed=0, device="cpu"))
    path = tmp_path / "instruct.yaml"
    path.write_text(cfgmod.to_yaml(cfg))
    test_flower_run_equals_in_process_run(path, tmp_path, "record")


@pytest.mark.slow  # two deployments; CI runs it (make test-slow)
@pytest.mark.parametrize("feature", ["record", "secure"])
def test_flower_resume_equals_an_uninterrupted_in_process_run(flower_cfg_path, tmp_path, feature):
    """A server session ends after round 1 (``stop-after``); a new deployment (new SuperLink and SuperNodes,
    the sites' ledgers kept) resumes from the server's checkpoint: round 2's global R, the ledgers and ε equal
    those of ``dpfed train`` run straight through with the same seed. ``secure``: the rounds go through SecAgg+
    and the resumed server rebuilds the recorded secure encoding."""
    from safetensors.torch import load_file

    from dpfed import config as cfgmod
    from dpfed.runner import load_checkpoint, prepare, run

    if FEATURES.get(feature):
        cfg = cfgmod.override(cfgmod.load(flower_cfg_path), **FEATURES[feature])
        flower_cfg_path = tmp_path / f"{feature}.yaml"
        flower_cfg_path.write_text(cfgmod.to_yaml(cfg))
    out = tmp_path / "flower-run"
    assert _deploy(out, flower_cfg_path, app_dir=REPO, server={"stop-after": 1}) == "finished:completed"
    assert not (out / "summary.json").exists() and json.loads((out / "checkpoint.json").read_text())["round"] == 1
    assert _deploy(out, None, app_dir=REPO, server={"resume": True}, work_name="flower-resume") == "finished:completed"
    ref = tmp_path / "in-process"
    after_round = {}

    def progress(kind, info):
        if kind == "round":
            after_round[info["round"]] = load_checkpoint(ref)[1]

    expected = run(prepare(cfgmod.load(flower_cfg_path)), ref, progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["resumed"]["from_round"] == 1
    for rnd in (1, 2):
        got = load_file(str(out / "rounds" / f"round-{rnd:03d}.safetensors"))
        for k, want in after_round[rnd].items():
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    in_process, reported = Ledger(ref / "ledger.jsonl"), Ledger(out / "ledger.jsonl")
    for i in range(3):
        cid = f"client-{i:03d}"
        site = Ledger(out / "sites" / cid / "ledger.jsonl")
        assert _records(site, cid) == _records(in_process, cid) == _records(reported, cid)
        assert [r for r, _ in _records(site, cid)] == [1, 2]
    assert summary["epsilon_per_client"] == pytest.approx(expected["epsilon_per_client"], rel=1e-12)
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow  # fault tolerance and the CLI around a deployment: CI runs them (make test-slow)
def test_site_killed_during_a_round(flower_cfg_path, tmp_path):
    """SuperNode 2 dies while it works on round 2: the round completes with the other two sites,
    and the dead site's ledger still shows what it spent (round 1, and round 2 if it got that far)."""
    state = {"killed_at": None}

    def kill_in_round_two(dep, out):
        if state["killed_at"] is not None or not (out / "metrics.jsonl").is_file():
            return
        import psutil

        def is_clientapp(p):
            try:
                return "flwr-clientapp" in " ".join(p.cmdline())
            except psutil.Error:  # exited (or a zombie) meanwhile
                return False

        node = dep.supernodes[2]
        kids = [p for p in psutil.Process(node.popen.pid).children(recursive=True) if is_clientapp(p)]
        state.setdefault("waited", time.monotonic())
        if kids or time.monotonic() - state["waited"] > 20:  # mid-round if its ClientApp runs, else between rounds
            dep.kill_site(2)
            state["killed_at"] = "round 2 (ClientApp running)" if kids else "before its round-2 ClientApp started"

    out = tmp_path / "run"
    assert _deploy(out, flower_cfg_path, round_timeout=150.0, during=kill_in_round_two) == "finished:completed"
    assert state["killed_at"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["stop_reason"] == "completed"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["clients"] == ["client-000", "client-001", "client-002"]
    assert lines[1]["clients"] == ["client-000", "client-001"]
    assert [f["site"] for f in lines[1]["sites_failed"]] == ["client-002"]
    assert summary["flower"]["sites_failed"] == 1 and summary["flower"]["replies_rejected"] == 0
    dead = Ledger(out / "sites" / "client-002" / "ledger.jsonl")
    reported = Ledger(out / "ledger.jsonl")
    assert 1 in dead.rounds_completed("client-002")
    assert reported.rounds_completed("client-002") == {1}
    # whatever the server counted, the site recorded first (write-ahead)
    assert all(rec in _records(dead, "client-002") for rec in _records(reported, "client-002"))


def _interruptible() -> None:
    # A test runner started in the background by a non-interactive shell inherits SIGINT = ignored,
    # and Python then installs no KeyboardInterrupt handler; a user's terminal delivers Ctrl-C to a
    # process whose SIGINT is at its default, which is what the CLI under test must handle.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    return subprocess.Popen([sys.executable, "-m", "dpfed.cli", "flower-local", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO), start_new_session=True,
                            preexec_fn=_interruptible, **kw)


def _strays(out: Path) -> list[int]:
    """Processes of a deployment under ``out``: by command line or by their FLWR_HOME."""
    import psutil

    home = str(out / "flower" / "flwr-home")
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE or p.pid == os.getpid():
                continue
            if str(out) in " ".join(p.info["cmdline"] or []) or p.environ().get("FLWR_HOME") == home:
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow  # fault tolerance and the CLI around a deployment: CI runs them (make test-slow)
def test_cli_with_tls_and_supernode_auth(flower_cfg_path, tmp_path):
    """``dpfed flower-local --tls``: the SuperLink serves TLS and admits only registered SuperNode keys."""
    out = tmp_path / "tls-run"
    proc = _cli(["--config", str(flower_cfg_path), "--sites", "2", "--rounds", "1", "--tls", "--out", str(out),
                 "--format", "json"])
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-2000:]
    summary = json.loads(stdout)
    assert summary["rounds_completed"] == 1 and summary["clients"] == 2 and summary["epsilon_spent"] <= 3.0
    logs = out / "flower" / "logs"
    assert "https://127.0.0.1" in (logs / "superlink.log").read_text()
    assert (logs / "serverapp.log").stat().st_size > 0  # the ServerApp's output, as `flwr log` returns it
    for i in range(2):
        assert Ledger(out / "sites" / f"client-{i:03d}" / "ledger.jsonl").rounds_completed(f"client-{i:03d}") == {1}
    assert _strays(out) == []


def test_tls_superlink_refuses_unregistered_and_insecure_supernodes(tmp_path):
    from dpfed.flower.certs import make_node_key

    with LocalDeployment(tmp_path / "w", node_configs=[{"partition-id": 0, "num-partitions": 1}], tls=True, env=ENV) as dep:
        key, _ = make_node_key(tmp_path, "stranger")
        env = {**os.environ, "FLWR_HOME": str(dep.home), "PATH": f"{dep.bin}{os.pathsep}{os.environ['PATH']}"}
        base = [str(dep.bin / "flower-supernode"), "--superlink", f"127.0.0.1:{dep.port}", "--max-retries", "1",
                "--node-config", "partition-id=0 num-partitions=1"]
        from dpfed.flower.local import free_port

        for n, extra in enumerate((["--root-certificates", str(dep.tls_files.ca_cert), "--auth-supernode-private-key",
                                    str(key)], ["--insecure"])):
            log = tmp_path / f"stranger-{n}.log"
            with open(log, "wb") as fh:  # a file, not a pipe: the SuperNode's helper would hold a pipe open
                node = subprocess.Popen([*base, "--port", str(free_port()), *extra], env=env, stdout=fh,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = node.wait(timeout=120)
            finally:
                try:
                    os.killpg(node.pid, signal.SIGKILL)  # its helper processes, if any
                except ProcessLookupError:
                    pass
                node.wait()
            assert code != 0
            assert "could not establish a connection" in log.read_text().lower()
        seen = dep.pids()
    assert _alive(seen) == []


@pytest.mark.slow  # fault tolerance and the CLI around a deployment: CI runs them (make test-slow)
def test_cli_ctrl_c_shuts_everything_down(flower_cfg_path, tmp_path):
    out = tmp_path / "interrupted"
    # many rounds: the run must still be going when SIGINT arrives (two tiny rounds can finish first)
    proc = _cli(["--config", str(flower_cfg_path), "--sites", "2", "--rounds", "200", "--out", str(out)])
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (out / "config.yaml").is_file():  # the server is up and ran prepare
            time.sleep(0.5)
        assert (out / "config.yaml").is_file(), "the run did not start"
        running = _strays(out)
        assert running
        os.kill(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            for pid in _strays(out):  # the deployment runs in its own sessions: never leave it behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert proc.returncode == 130 and "Traceback" not in stderr and "interrupted: the SuperLink" in stderr
    time.sleep(1)
    assert _alive(running) == [] and _strays(out) == []
