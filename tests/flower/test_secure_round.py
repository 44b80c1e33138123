"""A secure round through Flower's real SecAgg+ (workflow and ``secaggplus_mod``) and dpfed's real ClientApp.

The grid here is a loop in this process: each message the workflow sends is handed to the
ClientApp with that site's context, as a SuperLink and SuperNode would. This checks, fast, what
the loopback deployment (``test_flower_deployment.py``, ``secure``) checks slowly, plus what a
deployment cannot show: every reply the server receives, and a site that drops out mid-protocol.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed (pip install '.[flower]')")
pytestmark = pytest.mark.flower

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

from accounting.ledger import Ledger  # noqa: E402
from dpfed import config as cfgmod  # noqa: E402
from dpfed.flower import records as rec  # noqa: E402
from dpfed.flower import secure_round as sr  # noqa: E402

SITES = 3


class LoopGrid:
    """The workflow's grid: every message goes to the ClientApp at once; ``drop(node, stage)`` fails a node."""

    def __init__(self, app, contexts: dict[int, Context], drop=None) -> None:
        self.app, self.contexts, self.drop = app, contexts, drop or (lambda node, stage: False)
        self.run = SimpleNamespace(run_id=1)
        self.replies: list[Message] = []  # everything the server received

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records["secaggplus_configs"]["stage"]
            if self.drop(node, stage):
                reply = Message(Error(code=0, reason=f"node {node} dropped out"), reply_to=msg)
            else:  # a copy, as the wire gives each node its own (the workflow shares one content between nodes)
                reply = self.app(copy.deepcopy(msg), self.contexts[node])
            self.replies.append(reply)
            out.append(reply)
        return out


@pytest.fixture(scope="module")
def secure_cfg(flower_cfg_path):
    return cfgmod.override(cfgmod.load(flower_cfg_path), **{"privacy.aggregation": "secure", "train.local_steps": 1})


def _contexts(job, tmp_path, tag: str) -> dict[int, Context]:
    """Each site's Flower context after the handshake (node ids 101..), partitioned as the in-process run."""
    frozen = rec.to_record(job.method.frozen_state())
    out = {}
    for i in range(SITES):
        state = RecordDict({rec.STATE_KEY: frozen})
        out[101 + i] = Context(run_id=1, node_id=101 + i, state=state, run_config={}, node_config={
            "partition-id": i, "num-partitions": SITES, "seed": job.seed, "epsilon": 3.0, "delta": 1e-4,
            "ledger": str(tmp_path / tag / f"client-{i:03d}" / "ledger.jsonl")})
    return out


def _flower_round(job, grid, rnd: int = 1) -> sr.SecAggRound:
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.secure_codec import secaggplus_params

    state = trainable_state(job.model)
    names = sorted(state)
    frozen = job.method.frozen_state()
    config = {**rec.run_record(server_round=rnd, cfg_yaml=cfgmod.to_yaml(job.cfg), split_seed=job.split_seed,
                               label_names=tuple(job.splits.test.label_names), noise_multiplier=job.noise_multiplier,
                               frozen_sha256=rec.digest(frozen)),
              sr.SECURE_ENCODING: json.dumps(job.secure.to_public()), sr.STATE_NAMES: json.dumps(names)}
    return sr.run_secaggplus(grid, nodes=sorted(grid.contexts), arrays=[state[n].numpy() for n in names],
                             config=config, params=secaggplus_params(bits=job.secure.bits, max_sites=job.secure.max_sites),
                             threshold=max(2, job.secure.min_sites), server_round=rnd, timeout=None)


def _in_process(job, tmp_path, dropout=None):
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.session import InProcessSites

    sites = InProcessSites(job, ledger=Ledger(tmp_path / "in-process.jsonl"), seed=job.seed, diagnostics_dir=None,
                           dropout=dropout)
    return sites.secure_round(1, list(range(SITES)), trainable_state(job.model), lambda *a: None)


def test_the_sum_is_the_in_process_sum_and_the_server_receives_no_sites_message(secure_cfg, as_serverapp, tmp_path,
                                                                                  monkeypatch):
    from dpfed.flower.client_app import app
    from dpfed.runner import prepare

    job = prepare(secure_cfg)
    payloads = []  # each site's un-masked SecAgg+ input, caught on the site before secaggplus_mod masks it
    real = sr.secure_reply
    monkeypatch.setattr(sr, "secure_reply", lambda payload, **kw: payloads.append(payload[0].copy()) or real(payload, **kw))
    grid = LoopGrid(app, _contexts(job, tmp_path, "flower"))
    got = _flower_round(job, grid)
    want = _in_process(job, tmp_path)
    assert got.reason is None and sorted(got.summed) == sorted(grid.contexts) == sorted(got.sent)
    np.testing.assert_array_equal(got.total, want.total.numpy())  # exact: integers through SecAgg+
    assert len(payloads) == SITES and not any(np.array_equal(payloads[0], p) for p in payloads[1:])
    # every reply the server received: no array records with values, and no vector equal to a site's payload
    masked = 0
    for reply in grid.replies:
        assert not reply.has_error()
        assert all(len(a) == 0 for a in reply.content.array_records.values())
        cfg = reply.content.config_records["secaggplus_configs"]
        if "masked_params" in cfg:
            from flwr.common import bytes_to_ndarray

            vec = bytes_to_ndarray(cfg["masked_params"][1])  # [0] is SecAgg+'s weight factor
            assert vec.shape == payloads[0].shape
            assert not any(np.array_equal(vec, p + 2 ** (job.secure.bits - 1)) for p in payloads)
            masked += 1
            report = reply.content.config_records["fitres.metrics"]
            assert set(report) == {"site-id", "round", "events", "epsilon-spent"}
    assert masked == SITES
    for i in range(SITES):  # the sites' ledgers hold the round, as the in-process ledger does
        site = Ledger(tmp_path / "flower" / f"client-{i:03d}" / "ledger.jsonl")
        ref = Ledger(tmp_path / "in-process.jsonl")
        cid = f"client-{i:03d}"
        assert [r.event for r in site.records()] == [r.event for r in ref.records() if r.client == cid]


def test_a_site_that_drops_out_mid_protocol(secure_cfg, as_serverapp, tmp_path):
    """min_sites 2: the survivors' sum is released (SecAgg+ removes the dropped site's masks) and equals the
    in-process sum of the same two messages; min_sites 3: the protocol halts, no sum, the senders still spent."""
    from dpfed.flower.client_app import app
    from dpfed.runner import prepare

    dropped = 102  # client-001 fails when asked for its masked vector: it computes and spends nothing
    for min_sites in (2, 3):
        job = prepare(cfgmod.override(secure_cfg, **{"privacy.min_sites": min_sites}))
        tag = f"min{min_sites}"
        grid = LoopGrid(app, _contexts(job, tmp_path, tag),
                        drop=lambda node, stage: node == dropped and stage == "collect_masked_vectors")
        got = _flower_round(job, grid)
        assert sorted(got.sent) == [101, 103]
        ledgers = [Ledger(tmp_path / tag / f"client-{i:03d}" / "ledger.jsonl") for i in range(SITES)]
        assert [len(lg.records()) for lg in ledgers] == [1, 0, 1]
        if min_sites == 2:
            want = _in_process(job, tmp_path / tag, dropout=lambda rnd, cid: cid == "client-001")
            assert got.reason is None and sorted(got.summed) == [101, 103]
            np.testing.assert_array_equal(got.total, want.total.numpy())
        else:
            assert got.total is None and "SecAgg+ halted: fewer than 3 of the 3 sites" in got.reason
