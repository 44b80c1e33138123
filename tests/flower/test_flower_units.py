"""The Flower app's pieces without a network: reply check, strategy, site build, settings, wiring, CLI input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr", reason="the flower extra is not installed (pip install '.[flower]')")

from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict  # noqa: E402

from accounting.events import PoissonGaussianEvent, event_to_dict  # noqa: E402
from dpfed.errors import ConfigError  # noqa: E402
from dpfed.flower import records as rec  # noqa: E402
from dpfed.payload import Manifest  # noqa: E402

REPO = __import__('pathlib').Path(__file__).resolve().parents[2]

EVENT = event_to_dict(PoissonGaussianEvent(noise_multiplier=1.0, sample_rate=0.1, count=2))


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"enc.R": torch.randn(4, 4, generator=g), "head.weight": torch.randn(2, 8, generator=g)}


def _reply(state=None, **kw) -> RecordDict:
    args = dict(state=state if state is not None else _state(), site_id="client-000", server_round=1,
                num_examples=10, events=[EVENT], steps=2, epsilon_spent=1.0)
    args.update(kw)
    return rec.reply_record(**args)


def _check(content, **kw):
    args = dict(manifest=Manifest.of(_state()), site_id="client-000", server_round=1, num_examples=10)
    args.update(kw)
    return rec.check_reply(content, **args)


def _with_array(name: str, array: Array) -> RecordDict:
    content = _reply()
    content.array_records[rec.ARRAYS][name] = array
    return content


# -- the reply check ------------------------------------------------------------------------
def test_good_reply_is_accepted_bit_exact():
    acc = _check(_reply())
    assert acc.site_id == "client-000" and acc.num_examples == 10 and len(acc.events) == 1
    assert all(torch.equal(acc.state[k], v) for k, v in _state().items())


@pytest.mark.parametrize("content, match", [
    (lambda: rec.reply_record(state={"enc.R": torch.zeros(4, 4)}, site_id="client-000", server_round=1, num_examples=10,
                              events=[EVENT], steps=1, epsilon_spent=None), "missing"),
    (lambda: _reply(state={**_state(), "extra": torch.zeros(1)}), "unexpected"),
    (lambda: _reply(state={**_state(), "enc.R": torch.zeros(3, 4)}), "shape"),
    (lambda: _with_array("enc.R", Array(np.zeros((4, 4), dtype=np.float64))), "float32"),
    (lambda: _reply(state={**_state(), "enc.R": torch.full((4, 4), float("nan"))}), "finite"),
    (lambda: _reply(state={**_state(), "head.weight": torch.full((2, 8), float("inf"))}), "finite"),
    (lambda: _with_array("enc.R", Array(dtype="float32", shape=(4, 4), stype="numpy.ndarray", data=b"not numpy")), "decode"),
    (lambda: _reply(num_examples=0), "num-examples"),
    (lambda: _reply(num_examples=11), "announced"),
    (lambda: _reply(site_id="client-001"), "must come from"),
    (lambda: _reply(server_round=2), "must come from"),
    (lambda: _reply(events=[]), "events"),
    (lambda: _reply(events=[{"type": "bogus"}]), "events"),
    (lambda: RecordDict({rec.ARRAYS: rec.to_record(_state())}), "must carry"),
])
def test_malformed_replies_are_rejected(content, match):
    with pytest.raises(rec.ReplyError, match=match):
        _check(content())


def test_declared_dtype_must_match_the_bytes():
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 4), dtype=np.float64), allow_pickle=False)
    lie = Array(dtype="float32", shape=(4, 4), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(rec.ReplyError, match="decode to float32"):
        _check(_with_array("enc.R", lie))


# -- the strategy ---------------------------------------------------------------------------
def _strategy(job, *, min_sites=1, fraction=1.0):
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.strategy import FedSBStrategy, SiteInfo

    st = FedSBStrategy(method=job.method, manifest=Manifest.of(trainable_state(job.model)), seed=job.seed,
                       client_fraction=fraction, min_sites=min_sites, dp=True)
    for i, shard in enumerate(job.shards):
        st.roster[100 + i] = SiteInfo(100 + i, f"client-{i:03d}", len(shard))
    return st


def _replies(st, rnd, contents):
    msgs = list(st.configure_train(rnd, ArrayRecord(), rec.run_record(
        server_round=rnd, cfg_yaml="", split_seed=0, label_names=(), noise_multiplier=1.0, frozen_sha256=""), None))
    return [c(m) for m, c in zip(msgs, contents)]


def test_strategy_drops_bad_replies_and_averages_the_rest_exactly(job, as_serverapp):
    from dpfed.adapters.lorasb import trainable_state

    st = _strategy(job)
    base = trainable_state(job.model)
    states = [{k: v + 0.01 * (i + 1) for k, v in base.items()} for i in range(3)]
    sizes = [len(s) for s in job.shards]

    def good(i):
        return lambda m: Message(_reply(states[i], site_id=f"client-{i:03d}", num_examples=sizes[i]), reply_to=m)

    nan = {k: v.clone() for k, v in states[1].items()}
    next(iter(nan.values()))[0] = float("nan")
    arrays, metrics = st.aggregate_train(1, _replies(st, 1, [
        good(0), lambda m: Message(_reply(nan, site_id="client-001", num_examples=sizes[1]), reply_to=m), good(2)]))
    out = st.last
    assert [a.site_id for a in out.accepted] == ["client-000", "client-002"]
    assert len(out.rejected) == 1 and out.rejected[0]["site"] == "client-001" and "finite" in out.rejected[0]["reason"]
    assert metrics["replies-rejected"] == 1 and st.totals["rejected"] == 1
    want = job.method.aggregate([states[0], states[2]], [sizes[0], sizes[2]], round=1).state
    got = rec.from_record(arrays)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_strategy_counts_errors_and_refusals_and_enforces_min_sites(job, as_serverapp):
    st = _strategy(job, min_sites=2)
    arrays, _ = st.aggregate_train(1, _replies(st, 1, [
        lambda m: Message(_reply(site_id="client-000", num_examples=len(job.shards[0])), reply_to=m),
        lambda m: Message(Error(code=0, reason="node unavailable"), reply_to=m),
        lambda m: Message(rec.refusal("budget exhausted", site_id="client-002", server_round=1), reply_to=m)]))
    assert arrays is None  # wrong payload keys for this model: rejected; 0 accepted < 2
    out = st.last
    assert len(out.failed) == 1 and len(out.refused) == 1 and "budget" in out.refused[0]["reason"]
    assert st.totals == {"rejected": 1, "refused": 1, "failed": 1}
    # a chosen site that never answers counts as failed
    st.aggregate_train(2, _replies(st, 2, [])[:0])
    assert {p["reason"] for p in st.last.failed} == {"no reply before the round timeout"}


def test_superlink_errors_are_attributed_to_the_site_they_answer_for(job, as_serverapp):
    """A dead node's error comes from the SuperLink's own id: the message it replies to names the site."""
    import time as _time

    from flwr.app import Metadata
    from flwr.app.message import make_message
    from flwr.common.constant import SUPERLINK_NODE_ID

    st = _strategy(job)
    sent = _replies(st, 1, [lambda m: m] * 3)
    for m in sent:  # what the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    unavailable = make_message(metadata=Metadata(
        run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=sent[2].metadata.message_id, group_id="1", created_at=_time.time(), ttl=60.0,
        message_type="train"), error=Error(code=0, reason="node unavailable"))
    st.aggregate_train(1, [unavailable])
    failed = {p["site"]: p["reason"] for p in st.last.failed}
    assert failed["client-002"] == "node unavailable" and st.last.rejected == []


def test_site_selection_is_the_in_process_draw(flower_cfg_path, tmp_path):
    """client_fraction < 1: the sites chosen each round are the clients dpfed train chooses."""
    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    cfg = cfgmod.override(cfgmod.load(flower_cfg_path), **{"train.client_fraction": 0.5, "train.local_steps": 1,
                                                            "privacy.noise_multiplier": 1.0})
    job = prepare(cfg)
    run(job, tmp_path / "r")
    chosen = [json.loads(x)["clients"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    st = _strategy(job, fraction=0.5)
    assert [[s.site_id for s in st.select(r)] for r in (1, 2)] == chosen


# -- the site ---------------------------------------------------------------------------------
def test_site_build_and_fit_equal_the_in_process_client(job, tmp_path):
    """The site rebuilds exactly the in-process client 1: same shard, same update, same event."""
    from accounting.ledger import Ledger
    from dpfed import config as cfgmod
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.settings import SiteSettings
    from dpfed.flower.site import build_site
    from dpfed.runner import make_clients

    settings = SiteSettings.from_node_config({"partition-id": 1, "num-partitions": 3, "seed": job.seed,
                                              "ledger": str(tmp_path / "site.jsonl")})
    site = build_site(job.cfg, settings, split_seed=job.split_seed, label_names=tuple(job.splits.test.label_names),
                      frozen=job.method.frozen_state(), noise_multiplier=job.noise_multiplier, round=1,
                      ledger=Ledger(settings.ledger))
    assert site.client.shard.ids == job.shards[1].ids and torch.equal(site.client.shard.labels, job.shards[1].labels)
    global_state = trainable_state(job.model)
    mine = site.client.fit(site.model, global_state, round=1)
    ref_ledger = Ledger(tmp_path / "ref.jsonl")
    from dpfed.runner import site_generators

    client = make_clients(job, ledger=ref_ledger, seed=job.seed)[1]
    client.sample_generator, client.noise_generator = site_generators(job.seed, 1, 1, history=0)
    ref = client.fit(job.model, global_state, round=1)
    assert all(torch.equal(mine.state[k], ref.state[k]) for k in ref.state)
    assert Ledger(settings.ledger).events("client-001") == ref_ledger.events("client-001")
    assert cfgmod.to_yaml(site.cfg) == cfgmod.to_yaml(job.cfg)


def test_site_refuses_frozen_factors_that_do_not_fit(job, tmp_path):
    from accounting.ledger import Ledger
    from dpfed.flower.settings import SiteSettings
    from dpfed.flower.site import build_site

    settings = SiteSettings.from_node_config({"partition-id": 0, "num-partitions": 3, "ledger": str(tmp_path / "l.jsonl")})
    frozen = dict(job.method.frozen_state())
    frozen.pop(next(iter(frozen)))
    with pytest.raises(ConfigError, match="frozen factors must match"):
        build_site(job.cfg, settings, split_seed=job.split_seed, label_names=tuple(job.splits.test.label_names),
                   frozen=frozen, noise_multiplier=1.0, round=1, ledger=Ledger(settings.ledger))


# -- settings ---------------------------------------------------------------------------------
@pytest.mark.parametrize("node, match", [
    ({}, "exactly one of partition-id"),
    ({"partition-id": 0, "num-partitions": 3, "data-path": "x.csv"}, "exactly one of partition-id"),
    ({"partition-id": 3, "num-partitions": 3}, "partition-id must be < num-partitions = 3, got 3"),
    ({"partition-id": -1, "num-partitions": 3}, "partition-id must be an integer >= 0, got -1"),
    ({"data-path": "x.csv"}, "site-id must be set with data-path"),
    ({"partition-id": 0, "num-partitions": 3, "epsilon": 0}, "epsilon must be a finite number > 0, got 0"),
    ({"partition-id": 0, "num-partitions": 3, "delta": 1.5}, r"delta must be in \(0, 1\), got 1.5"),
    ({"partition-id": 0, "num-partitions": 3, "colour": "red"}, "unknown key 'colour'"),
])
def test_node_config_errors_name_key_rule_and_value(node, match, tmp_path):
    from dpfed.flower.settings import SiteSettings

    with pytest.raises(ConfigError, match=match):
        SiteSettings.from_node_config(node, base_dir=tmp_path)


def test_site_epsilon_is_bounded_like_the_cli(tmp_path):
    from dpfed.flower.settings import SiteSettings

    with pytest.raises(ConfigError, match=r"epsilon must be <= 100 .*got 1000.0"):
        SiteSettings.from_node_config({"partition-id": 0, "num-partitions": 3, "epsilon": 1000.0}, base_dir=tmp_path)


def test_node_config_defaults(tmp_path):
    from dpfed.flower.settings import SiteSettings

    s = SiteSettings.from_node_config({"partition-id": 2, "num-partitions": 3}, base_dir=tmp_path)
    assert s.site_id == "client-002" and s.ledger == tmp_path / "dpfed-site" / "client-002" / "ledger.jsonl"
    own = SiteSettings.from_node_config({"data-path": "mine.csv", "site-id": "hospital-a", "epsilon": 2.0}, base_dir=tmp_path)
    assert own.data_path == str(tmp_path / "mine.csv") and own.epsilon == 2.0 and own.index == 0


@pytest.mark.parametrize("run, match", [
    ({"min-sites": 0}, "min-sites must be an integer >= 1, got 0"),
    ({"round-timeout": -1.0}, "round-timeout must be a finite number > 0, got -1.0"),
    ({"epsilon": -1.0}, "epsilon must be a finite number >= 0"),
    ({"rounds": 1.5}, "rounds must be an integer >= 0, got 1.5"),
    ({"speed": 1}, "unknown key 'speed'"),
    ({"epsilon": 500.0}, "epsilon must be <= 100"),
    ({"resume": 1}, "resume must be true or false, got 1"),
    ({"resume": True}, "out-dir must name the run directory to continue when resume is true"),
    ({"resume": True, "out-dir": "r", "config": "x.yaml"}, "config must be left unset when resume is true"),
    ({"resume": True, "out-dir": "r", "rounds": 4}, "rounds must be left unset when resume is true"),
    ({"stop-after": -1}, "stop-after must be an integer >= 0, got -1"),
])
def test_run_config_errors(run, match):
    from dpfed.flower.settings import ServerSettings

    with pytest.raises(ConfigError, match=match):
        ServerSettings.from_run_config(run)


def test_run_config_overrides(flower_cfg_path):
    from dpfed.flower.settings import ServerSettings

    cfg = ServerSettings.from_run_config({"config": str(flower_cfg_path), "rounds": 5, "epsilon": 2.0, "seed": 7}).run_config()
    assert (cfg.train.rounds, cfg.privacy.epsilon, cfg.seed) == (5, 2.0, 7)
    cfg = ServerSettings.from_run_config({"config": str(flower_cfg_path)}).run_config()
    assert (cfg.train.rounds, cfg.privacy.epsilon, cfg.seed) == (2, 3.0, 0)


@pytest.mark.parametrize("change, match", [
    ({"data.canaries": 4, "data.canary_kind": "random-words"}, "canary_kind must be 'gradient'"),
])
def test_unsupported_configs_are_refused(flower_cfg_path, change, match):
    from dpfed import config as cfgmod
    from dpfed.flower.settings import check_supported

    with pytest.raises(ConfigError, match=match):
        check_supported(cfgmod.override(cfgmod.load(flower_cfg_path), **change))


# -- wiring -----------------------------------------------------------------------------------
def test_repository_is_a_flower_app():
    """``flwr run .`` builds a valid FAB from the repository: components, config keys, the sources it needs."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    from dpfed.flower.settings import RUN_DEFAULTS

    config, warnings = load_and_validate(REPO / "pyproject.toml")
    app = config["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "dpfed.flower.server_app:app", "clientapp": "dpfed.flower.client_app:app"}
    assert app["config"] == RUN_DEFAULTS
    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist())
    assert {"dpfed/flower/server_app.py", "dpfed/flower/client_app.py", "dpfed/client.py", "accounting/ledger.py",
            "configs/demo.yaml"} <= names
    assert not any(n.startswith(("tests/", ".venv/")) for n in names)


def test_core_never_imports_flwr():
    code = ("import sys; import dpfed.cli, dpfed.runner, dpfed.client, dpfed.methods, accounting.ledger, attacks.audit; "
            "from dpfed.cli import _register; _register(); "
            "import dpfed.flower.settings, dpfed.flower.site, dpfed.flower.local, dpfed.cli.flower_local; "
            "print('flwr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("argv, match", [
    (["--sites", "0"], "error: sites must be an integer >= 1, got 0"),
    (["--sites", "3", "--min-sites", "4"], r"error: min-sites must be in \[1, sites = 3\], got 4"),
    (["--init", "dpp"], "error: init must be one of"),
    (["--epsilon", "-1"], "error: epsilon must be a finite number > 0, got -1"),
    (["--round-timeout", "0"], "error: round-timeout must be a number of seconds > 0, got 0"),
    (["--format", "xml"], "error: format must be 'table' or 'json'"),
])
def test_cli_bad_input_is_one_line_exit_2(argv, match, run_cli, tmp_path):
    import re

    code, out, err = run_cli(["flower-local", "--out", str(tmp_path / "o"), *argv])
    assert code == 2
    assert re.search(match, err) and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cli_resume_errors_are_one_line_exit_2(run_cli, tmp_path):
    (tmp_path / "half").mkdir()
    cases = [
        (["--resume", str(tmp_path / "half"), "--epsilon", "2"], "error: --resume continues the run with its own "
                                                                   "config.yaml: --epsilon must not be given with it"),
        (["--resume", str(tmp_path / "half")], "error: --resume must name a flower-local run directory with "
                                               "config.yaml and run.json"),
    ]
    for argv, message in cases:
        code, _, err = run_cli(["flower-local", *argv])
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_cli_refuses_a_non_empty_out(run_cli, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    code, _, err = run_cli(["flower-local", "--out", str(tmp_path / "o")])
    assert code == 2 and err.startswith("error: out must be a new or empty directory")


def test_metric_record_keys_are_numbers():
    content = _reply()
    assert isinstance(content.metric_records[rec.METRICS], MetricRecord)
    assert json.loads(content.config_records[rec.SITE]["events"]) == [EVENT]


# -- the ClientApp, called in process ---------------------------------------------------------
def _server_messages(job, rnd):
    from dpfed import config as cfgmod
    from dpfed.adapters.lorasb import trainable_state

    frozen = job.method.frozen_state()
    config = rec.run_record(server_round=rnd, cfg_yaml=cfgmod.to_yaml(job.cfg), split_seed=job.split_seed,
                            label_names=tuple(job.splits.test.label_names), noise_multiplier=job.noise_multiplier,
                            frozen_sha256=rec.digest(frozen))
    query = Message(RecordDict({rec.CONFIG: config, rec.FROZEN: rec.to_record(frozen)}), dst_node_id=7,
                    message_type="query")
    train = Message(RecordDict({rec.CONFIG: config, rec.ARRAYS: rec.to_record(trainable_state(job.model))}),
                    dst_node_id=7, message_type="train")
    return query, train


def _context(node_config):
    from flwr.app import Context

    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_client_app_handshake_then_train_replies_a_valid_payload(job, as_serverapp, tmp_path):
    from accounting.ledger import Ledger
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.client_app import app

    ctx = _context({"partition-id": 0, "num-partitions": 3, "ledger": str(tmp_path / "l.jsonl"), "epsilon": 3.0,
                    "delta": 1e-4})
    query, train = _server_messages(job, 1)
    hello = app(query, ctx)
    site = hello.content.config_records[rec.SITE]
    assert site["site-id"] == "client-000" and site["num-examples"] == len(job.shards[0])
    assert hello.content.metric_records[rec.METRICS]["epsilon-spent"] == 0.0
    reply = app(train, ctx)
    acc = rec.check_reply(reply.content, manifest=Manifest.of(trainable_state(job.model)), site_id="client-000",
                          server_round=1, num_examples=len(job.shards[0]))
    assert Ledger(tmp_path / "l.jsonl").events("client-000") == list(acc.events)


def test_client_app_refuses_past_its_own_budget_whatever_the_server_asks(job, as_serverapp, tmp_path):
    from accounting.ledger import Ledger
    from dpfed.flower.client_app import app

    # the server plans epsilon 3; this site allows itself 0.5
    ctx = _context({"partition-id": 1, "num-partitions": 3, "ledger": str(tmp_path / "l.jsonl"), "epsilon": 0.5,
                    "delta": 1e-4})
    query, train = _server_messages(job, 1)
    app(query, ctx)
    reply = app(train, ctx)
    assert rec.REFUSAL in reply.content
    assert "would reach epsilon" in reply.content.config_records[rec.REFUSAL]["reason"]
    assert len(Ledger(tmp_path / "l.jsonl")) == 0  # nothing trained, nothing spent, nothing sent


def test_client_app_without_handshake_refuses(job, as_serverapp, tmp_path):
    from dpfed.flower.client_app import app

    ctx = _context({"partition-id": 0, "num-partitions": 3, "ledger": str(tmp_path / "l.jsonl")})
    reply = app(_server_messages(job, 1)[1], ctx)
    assert "no handshake" in reply.content.config_records[rec.REFUSAL]["reason"]


def test_client_app_with_its_own_data_file(job, as_serverapp, tmp_path):
    """A site with its own file (data-path): labels indexed like the server's, all its records train."""
    import csv

    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.client_app import app

    own = tmp_path / "mine.csv"
    with own.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(60):
            w.writerow(["good fun film" if i % 3 else "dull boring plot", "pos" if i % 3 else "neg"])
    ctx = _context({"data-path": str(own), "site-id": "hospital-a", "ledger": str(tmp_path / "l.jsonl"),
                    "epsilon": 3.0, "delta": 1e-3})
    query, train = _server_messages(job, 1)
    assert app(query, ctx).content.config_records[rec.SITE]["num-examples"] == 60
    reply = app(train, ctx)
    acc = rec.check_reply(reply.content, manifest=Manifest.of(trainable_state(job.model)), site_id="hospital-a",
                          server_round=1, num_examples=60)
    assert acc.events[0].sample_rate == pytest.approx(16 / 60)
    with own.open("a") as fh:
        fh.write("meh,unknown-label\n")
    assert "label_column values must be among" in app(train, ctx).content.config_records[rec.REFUSAL]["reason"]
