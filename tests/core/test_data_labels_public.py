"""The label set and the public data (issue 12, items 4 and 6).

The label set is declared or read from the test split and the public data, never from the
private records; nothing of a user's file is public unless declared; the demo keeps its split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dpfed import config as C
from dpfed.data import label_set, load_records, settle_labels, split_and_partition
from dpfed.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, rows: list[tuple[str, str]]) -> str:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return str(path)


def _splits(cfg: C.DataConfig, seed: int = 0):
    recs = load_records(cfg, task="classification")
    pub = load_records(cfg, task="classification", source=cfg.public_source) if cfg.public_source else None
    splits = split_and_partition(recs, cfg, seed=seed, public=pub)
    return settle_labels(splits, label_set(splits, cfg), cfg)


def test_label_set_comes_from_test_and_public_never_from_private(tmp_path):
    rows = [(f"text {i}", "pos" if i % 2 else "neg") for i in range(100)]
    path = _write(tmp_path / "d.csv", rows)
    cfg = C.DataConfig(source=path, num_clients=2)
    s = _splits(cfg)
    assert s.test.label_names == ("neg", "pos") and all(c.label_names == ("neg", "pos") for c in s.clients)
    # one private record with a label nobody declared and the test split does not hold
    probe = split_and_partition(load_records(cfg, task="classification"), cfg, seed=0)
    secret = probe.clients[1].texts[3]
    k = next(i for i, r in enumerate(rows) if r[0] == secret)
    rows[k] = (secret, "hiv-positive")
    _write(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as exc:
        _splits(cfg)
    msg = str(exc.value)
    assert msg.startswith(f"{path} row {k + 1}, column 'label': label 'hiv-positive' is not among the labels of the test "
                          "split and the public data ['neg', 'pos']")
    assert "--labels" in msg and "\n" not in msg
    # declared, the label set holds it; its index follows the declaration
    s = _splits(C.DataConfig(source=path, num_clients=2, labels=("neg", "pos", "hiv-positive")))
    assert s.clients[1].label_names == ("neg", "pos", "hiv-positive") and 2 in s.clients[1].labels


def test_numeric_label_set_from_the_test_split_is_sorted_numerically(tmp_path):
    path = _write(tmp_path / "d.csv", [(f"t {i}", str(i % 11)) for i in range(440)])
    s = _splits(C.DataConfig(source=path, num_clients=2))
    assert s.test.label_names == tuple(str(i) for i in range(11))


def test_public_file_is_public_never_private_and_leaves_the_split_alone(tmp_path):
    path = _write(tmp_path / "d.csv", [(f"private {i}", "ab"[i % 2]) for i in range(100)])
    pub = _write(tmp_path / "pub.csv", [(f"public {i}", "abc"[i % 3]) for i in range(12)])
    plain = _splits(C.DataConfig(source=path, num_clients=2))
    s = _splits(C.DataConfig(source=path, public_source=pub, num_clients=2))
    assert len(s.public) == 12 and set(s.public.texts) == {f"public {i}" for i in range(12)}
    assert all(not t.startswith("public") for c in s.clients for t in c.texts)
    assert [c.texts for c in s.clients] == [c.texts for c in plain.clients] and s.test.texts == plain.test.texts
    assert s.test.label_names == ("a", "b", "c")  # the public file's labels join the test split's
    assert s.public_origin() == f"public file: 12 records from {pub}"
    assert s.public_notes() == [f"public data: 12 records from {pub} (declared public by data.public_source: they fit "
                                "the head/init without DP and are outside ε)"]


def test_no_public_slice_by_default_and_a_declared_fraction_is_counted(tmp_path):
    path = _write(tmp_path / "d.csv", [(f"t {i}", "ab"[i % 2]) for i in range(100)])
    assert C.DataConfig().public_fraction == 0.0
    assert C.InitConfig().head == "random" and C.InitConfig().strategy == "random"
    s = _splits(C.DataConfig(source=path, num_clients=2))
    assert len(s.public) == 0 and s.public_origin() == "" and s.public_notes() == []
    s = _splits(C.DataConfig(source=path, num_clients=2, public_fraction=0.1))
    assert len(s.public) == 10
    assert s.public_notes() == [f"10 records of {path} declared public by data.public_fraction: they fit the head/init "
                                "without DP and are outside ε"]
    assert s.public_origin() == f"public: 10 records (data.public_fraction of {path})"


def test_demo_split_and_labels_are_unchanged():
    """The embedded demo: same labels, same split for a fixed seed (fingerprints of the code before this change)."""
    cfg = C.load(ROOT / "configs" / "demo.yaml").data
    assert cfg.labels == ("fresh", "rotten") and cfg.public_fraction == 0.08
    s = _splits(cfg, seed=12345)
    assert s.test.label_names == ("fresh", "rotten")
    assert (len(s.test), len(s.public), sum(len(c) for c in s.clients)) == (1921, 1025, 9862)
    assert s.test.fingerprint() == TEST_FP and s.public.fingerprint() == PUBLIC_FP
    assert s.clients[0].fingerprint() == CLIENT0_FP
    assert s.public_origin() == "public: 1025 records (data.public_fraction of embedded:rotten_tomatoes)"


# computed with the loader and split of commit f1d7326 (before this change), split seed 12345
TEST_FP, PUBLIC_FP, CLIENT0_FP = "457b56fe0992a956", "202b92764400f499", "2dc2bd7dfb44680d"
