"""The release rule on Flower: what a site's ClientApp sends for neighbouring datasets.

Same site seed, a fresh ledger each, and a data file that differs in one record (an outlier
with its label flipped): every reply field that is not declared noised or post-processing
must be byte-identical, and nothing undeclared or site-local may be in the reply.
"""

from __future__ import annotations

import csv
import json

import pytest

flwr = pytest.importorskip("flwr", reason="the flower extra is not installed (pip install '.[flower]')")

from flwr.app import Context, Message, RecordDict  # noqa: E402

from dpfed.flower import records as rec  # noqa: E402
from dpfed.release import Basis, declared  # noqa: E402


def _write(path, outlier: bool) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(15):  # 16 records with the last: q = b / n = 1, every record is in every step
            w.writerow(["good fun film" if i % 3 else "dull boring plot", "pos" if i % 3 else "neg"])
        w.writerow([" ".join(["superb"] * 5000), "neg"] if outlier else ["good great film", "pos"])


def _fields(reply: Message) -> dict:
    """Every field of a reply, under its release name (Flower's dashes → underscores)."""
    c = reply.content
    out = {"state": {k: c.array_records[rec.ARRAYS][k].numpy().tobytes() for k in c.array_records[rec.ARRAYS]}}
    for key, value in c.metric_records[rec.METRICS].items():
        out[key.replace("-", "_")] = value
    for key, value in c.config_records[rec.SITE].items():
        out[key.replace("-", "_")] = json.loads(value) if key == "events" else value
    extra = set(c) - {rec.ARRAYS, rec.METRICS, rec.SITE}
    assert not extra, f"reply carries undeclared records {sorted(extra)}"
    return out


def test_site_reply_releases_nothing_that_distinguishes_neighbours(job, as_serverapp, tmp_path):
    from dpfed import config as cfgmod
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.flower.client_app import app

    frozen = job.method.frozen_state()
    config = rec.run_record(server_round=1, cfg_yaml=cfgmod.to_yaml(job.cfg), split_seed=job.split_seed,
                            label_names=tuple(job.splits.test.label_names), noise_multiplier=job.noise_multiplier,
                            frozen_sha256=rec.digest(frozen))
    data = tmp_path / "mine.csv"
    replies = []
    for tag in ("base", "neighbour"):
        _write(data, outlier=tag == "neighbour")
        ctx = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                      node_config={"data-path": str(data), "site-id": "hospital-a", "seed": 5,
                                   "ledger": str(tmp_path / tag / "ledger.jsonl"), "epsilon": 50.0, "delta": 1e-3})
        app(Message(RecordDict({rec.CONFIG: config, rec.FROZEN: rec.to_record(frozen)}), dst_node_id=7,
                    message_type="query"), ctx)
        reply = app(Message(RecordDict({rec.CONFIG: config, rec.ARRAYS: rec.to_record(trainable_state(job.model))}),
                            dst_node_id=7, message_type="train"), ctx)
        assert rec.REFUSAL not in reply.content
        replies.append(_fields(reply))
    a, b = replies
    problems = []
    for name in sorted(set(a) | set(b)):
        try:
            f = declared("site_reply", name)
        except Exception as exc:
            problems.append(str(exc))
            continue
        if f.basis is Basis.SITE_LOCAL:
            problems.append(f"site-local field {name!r} in the reply")
        elif f.basis is Basis.PUBLIC and a.get(name) != b.get(name):
            problems.append(f"public field {name!r} differs: {a.get(name)!r} vs {b.get(name)!r}")
    assert a["state"] != b["state"]  # the noised update did see the outlier
    assert not problems, "\n".join(problems)
    for tag in ("base", "neighbour"):  # the site keeps its own diagnostics, mode 0600, beside its ledger
        local = tmp_path / tag / "ledger.site-local.jsonl"
        assert local.is_file() and (local.stat().st_mode & 0o077) == 0
        assert "mean_loss" in json.loads(local.read_text().splitlines()[-1])
