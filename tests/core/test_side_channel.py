"""Differential side-channel test of the release boundary (dpfed.release).

Two neighbouring datasets differ in one training record (an extreme outlier: a very long text
with its label flipped). With the same user seed, sampling and noise draws coincide, so every
byte the server or an operator sees that is not declared noised, post-processing of noised
values, or timing must be identical between the two runs; nothing undeclared or site-local
may appear, and nothing withheld under the run's privacy unit.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from dpfed import config as cfgmod
from dpfed.release import Basis, declared

OUTLIER = " ".join(["superb"] * 5000)
SEED = 11


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _write(path: Path, rows: list[list[str]]) -> str:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return str(path)


def _cfg(model_dir: str, source: str, unit: str) -> cfgmod.RunConfig:
    privacy = {"epsilon": 3.0, "delta": 1e-4, "unit": unit}
    train = {"rounds": 2, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128, "lr": 0.5}
    if unit in ("client", "both"):
        privacy.update(client_epsilon=8.0, client_delta=1e-2, client_clip=0.5)
        train["client_fraction"] = 0.6  # Poisson sampling of sites
    return cfgmod.from_dict({
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": source, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                 "public_fraction": 0.0},
        "init": {"strategy": "random", "head": "random"},
        "train": train, "privacy": privacy, "seed": SEED, "device": "cpu",
    })


@pytest.fixture(scope="module")
def neighbours(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """(base csv, neighbour csv): one training record replaced by an outlier with the other label."""
    from dpfed.runner import prepare

    d = tmp_path_factory.mktemp("neighbours")
    rows = _rows(tiny_csv)
    job = prepare(_cfg(tiny_bert_dir, tiny_csv, "record"))
    held = set(job.splits.test.texts) | set(job.splits.public.texts)
    counts = {}
    for r in rows[1:]:
        counts[r[0]] = counts.get(r[0], 0) + 1
    k = next(i for i, r in enumerate(rows) if i > 0 and counts[r[0]] == 1 and r[0] not in held)
    other = rows[k][1] == "pos" and "neg" or "pos"
    changed = [list(r) for r in rows]
    changed[k] = [OUTLIER, other]
    return _write(d / "base.csv", rows), _write(d / "neighbour.csv", changed)


def _check_fields(channel: str, a: dict, b: dict, unit: str, where: str) -> list[str]:
    """Violations of the release rule between two neighbouring outputs of one channel."""
    problems = []
    for name in sorted(set(a) | set(b)):
        try:
            f = declared(channel, name)
        except Exception as exc:
            problems.append(f"{where}: {exc}")
            continue
        if f.basis is Basis.SITE_LOCAL:
            problems.append(f"{where}: site-local field {name!r} released")
        elif unit not in f.units:
            problems.append(f"{where}: field {name!r} released under unit {unit} ({f.why})")
        elif f.basis is Basis.PUBLIC and a.get(name) != b.get(name):
            problems.append(f"{where}: public field {name!r} differs between neighbours: {a.get(name)!r} vs {b.get(name)!r}")
    return problems


def _run(cfg, out: Path) -> Path:
    from dpfed.runner import prepare, run

    run(prepare(cfg), out)
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _swap(data: Path, source: str) -> str:
    """The same path for both runs (the config names it), holding one dataset or its neighbour."""
    data.write_bytes(Path(source).read_bytes())
    return str(data)


@pytest.mark.parametrize("unit", ["record", "client", "both"])
def test_in_process_run_releases_nothing_that_distinguishes_neighbours(unit, neighbours, tiny_bert_dir, tmp_path):
    base, changed = neighbours
    data = tmp_path / "data.csv"
    a = _run(_cfg(tiny_bert_dir, _swap(data, base), unit), tmp_path / "a")
    b = _run(_cfg(tiny_bert_dir, _swap(data, changed), unit), tmp_path / "b")
    problems = []
    ma, mb = _metrics(a), _metrics(b)
    assert len(ma) == len(mb) == 2
    for la, lb in zip(ma, mb):
        problems += _check_fields("metrics", la, lb, unit, f"metrics.jsonl round {la['round']}")
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    problems += _check_fields("summary", sa, sb, unit, "summary.json")
    ca, cb = (json.loads((d / "checkpoint.json").read_text()) for d in (a, b))
    problems += _check_fields("checkpoint", ca, cb, unit, "checkpoint.json")
    # the noised fields did see the outlier: the two runs are not trivially identical
    assert sa["accuracy"] != sb["accuracy"] or sa["eval_loss"] != sb["eval_loss"]
    assert not problems, "\n".join(problems)


def test_in_process_site_update_carries_only_declared_fields(neighbours, tiny_bert_dir, tmp_path):
    """What a site hands to the transport (``ClientResult``) has declared fields only, equal where public."""
    from accounting.ledger import Ledger
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.runner import make_clients, prepare

    out = {}
    for tag, source in zip("ab", neighbours):
        job = prepare(_cfg(tiny_bert_dir, _swap(tmp_path / "data.csv", source), "record"))
        clients = make_clients(job, ledger=Ledger(tmp_path / f"{tag}.jsonl"), seed=job.seed)
        results = [c.fit(job.model, trainable_state(job.model), round=1) for c in clients]
        out[tag] = [{f.name: getattr(r, f.name) for f in dataclasses.fields(r)} for r in results]
    problems = []
    for i, (ra, rb) in enumerate(zip(out["a"], out["b"])):
        problems += _check_fields("site_reply", ra, rb, "record", f"site {i}")
    assert not problems, "\n".join(problems)
