"""Canaries: seeded Bernoulli(1/2) inclusion, planting into client shards only, files, attack records."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from scipy import stats

from attacks.canaries import (
    CanarySet,
    attack_records_as_records,
    choose_attack_records,
    load_attack_records,
    load_canaries,
    make_canaries,
    plant,
    save_attack_records,
    save_canaries,
    vocabulary_words,
)
from dpfed.data import Records, Splits
from dpfed.errors import ConfigError, DataError

WORDS = tuple(f"w{i:03d}x" for i in range(500))
NAMES = ("neg", "pos")


def _splits(k: int = 3, n: int = 30, labels: bool = True) -> Splits:
    def recs(prefix: str, size: int) -> Records:
        texts = tuple(f"{prefix} record {i}" for i in range(size))
        return Records(texts, tuple(i % 2 for i in range(size)) if labels else None, NAMES if labels else ())

    return Splits(test=recs("test", 10), public=recs("public", 5), clients=tuple(recs(f"c{c}", n + c) for c in range(k)))


def test_same_seed_same_canaries_and_bits():
    a = make_canaries(m=300, label_names=NAMES, num_clients=3, seed=11, vocab_words=WORDS)
    b = make_canaries(m=300, label_names=NAMES, num_clients=3, seed=11, vocab_words=WORDS)
    c = make_canaries(m=300, label_names=NAMES, num_clients=3, seed=12, vocab_words=WORDS)
    assert a == b
    assert a.included != c.included and a.texts != c.texts


def test_inclusion_is_bernoulli_half_and_independent_of_content():
    c = make_canaries(m=4000, label_names=NAMES, num_clients=5, seed=3, vocab_words=WORDS)
    k = sum(c.included)
    assert stats.binomtest(k, 4000, 0.5).pvalue > 1e-3
    # the bits come from their own stream: other texts (length) leave them unchanged
    longer = make_canaries(m=4000, label_names=NAMES, num_clients=5, seed=3, vocab_words=WORDS, length=12)
    assert longer.included == c.included and longer.texts != c.texts
    # across seeds, the first bit is a fair coin
    firsts = [make_canaries(m=2, label_names=NAMES, num_clients=1, seed=s, vocab_words=WORDS).included[0] for s in range(400)]
    assert stats.binomtest(sum(firsts), 400, 0.5).pvalue > 1e-3


def test_labels_uniform_clients_round_robin_texts_distinct():
    c = make_canaries(m=1000, label_names=("a", "b", "c"), num_clients=4, seed=5, vocab_words=WORDS)
    counts = np.bincount(c.labels, minlength=3)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert c.clients == tuple(i % 4 for i in range(1000))  # fixed before the bits, for every canary
    assert len(set(c.texts)) == 1000 and all(len(t.split()) == 8 for t in c.texts)


def test_causal_lm_canaries_have_no_labels():
    c = make_canaries(m=10, label_names=None, num_clients=2, seed=0, vocab_words=WORDS, length=16)
    assert c.labels is None and c.task == "causal-lm" and len(c.texts[0].split()) == 16
    planted = plant(_splits(k=2, labels=False), c, seed=0)
    assert all(s.labels is None for s in planted.clients)


@pytest.mark.parametrize("kwargs, message", [
    ({"m": 1}, "m must be an integer >= 2"),
    ({"num_clients": 0}, "num_clients must be an integer >= 1"),
    ({"kind": "gradient"}, "kind must be one of"),
    ({"label_names": ("only",)}, "label_names must be empty"),
    ({"vocab_words": ("a",)}, "at least 2 distinct words"),
    ({"seed": -1}, "seed must be an integer >= 0"),
])
def test_make_canaries_rejects_bad_input(kwargs, message):
    args = dict(m=10, label_names=NAMES, num_clients=2, seed=0, vocab_words=WORDS) | kwargs
    with pytest.raises(ConfigError, match=message):
        make_canaries(**args)


def test_vocabulary_words_skip_special_tokens(tiny_bert_dir):
    from dpfed.data import load_tokenizer

    tok = load_tokenizer(tiny_bert_dir)
    words = vocabulary_words(tok)
    assert "good" in words and "movie" in words
    assert not any(w.startswith("[") for w in words)
    c = make_canaries(m=20, label_names=NAMES, num_clients=2, seed=0, tokenizer=tok)
    ids = tok(list(c.texts))["input_ids"]
    assert all(tok.unk_token_id not in seq for seq in ids)


def test_plant_puts_exactly_the_included_canaries_into_their_shards():
    splits = _splits()
    c = make_canaries(m=60, label_names=NAMES, num_clients=3, seed=1, vocab_words=WORDS)
    p = plant(splits, c, seed=2)
    assert p.test == splits.test and p.public == splits.public
    canary_text = set(c.texts)
    for ci, (old, new) in enumerate(zip(splits.clients, p.clients)):
        want = {c.texts[i] for i in range(c.m) if c.included[i] and c.clients[i] == ci}
        got = [t for t in new.texts if t in canary_text]
        assert set(got) == want and len(got) == len(want)
        assert len(new) == len(old) + len(want)
        # real records keep their order and labels; canaries keep theirs
        real = [(t, y) for t, y in zip(new.texts, new.labels) if t not in canary_text]
        assert real == list(zip(old.texts, old.labels))
        for t, y in zip(new.texts, new.labels):
            if t in canary_text:
                assert y == c.labels[c.texts.index(t)]
    assert not canary_text.intersection(p.test.texts) and not canary_text.intersection(p.public.texts)
    assert sum(len(s) for s in p.clients) - sum(len(s) for s in splits.clients) == sum(c.included)


def test_plant_rejects_mismatch_and_collisions():
    c = make_canaries(m=10, label_names=NAMES, num_clients=2, seed=0, vocab_words=WORDS)
    with pytest.raises(ConfigError, match="num_clients = 2"):
        plant(_splits(k=3), c, seed=0)
    with pytest.raises(ConfigError, match="task"):
        plant(_splits(k=2, labels=False), c, seed=0)
    s = _splits(k=2)
    clash = Splits(test=Records(s.test.texts + (c.texts[0],), s.test.labels + (0,), NAMES), public=s.public, clients=s.clients)
    with pytest.raises(DataError, match="test split"):
        plant(clash, c, seed=0)


def test_canaries_file_round_trip_is_private(tmp_path):
    c = make_canaries(m=25, label_names=NAMES, num_clients=3, seed=4, vocab_words=WORDS)
    path = tmp_path / "canaries.json"
    save_canaries(path, c)
    assert load_canaries(path) == c
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    d = json.loads(path.read_text())
    assert d["format"] == "dpfed-canaries/1" and d["m"] == 25 and len(d["canaries"]) == 25
    d["canaries"][3]["included"] = "yes"
    path.write_text(json.dumps(d))
    with pytest.raises(DataError, match="canary 3"):
        load_canaries(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_canaries(path)
    with pytest.raises(DataError, match="not found"):
        load_canaries(tmp_path / "missing.json")


def test_choose_attack_records_members_from_shards_non_members_from_heldout(tmp_path):
    splits = _splits(n=40)
    c = make_canaries(m=30, label_names=NAMES, num_clients=3, seed=1, vocab_words=WORDS)
    planted = plant(splits, c, seed=0)
    heldout = Records(tuple(f"held {i}" for i in range(25)) + (splits.clients[0].texts[0],),
                      tuple(i % 2 for i in range(26)), NAMES)
    d = choose_attack_records(planted, heldout=heldout, n=20, seed=3, canaries=c)
    assert d["n"] == 20 and len(d["members"]) == 20 and len(d["non_members"]) == 20
    train = {t for s in splits.clients for t in s.texts}
    for r in d["members"]:
        assert r["text"] in train and r["text"] not in c.texts
        assert planted.clients[r["client"]].texts[r["index"]] == r["text"]
    assert all(r["text"].startswith("held") for r in d["non_members"])  # the duplicate of a member is dropped
    # seeded
    assert choose_attack_records(planted, heldout=heldout, n=20, seed=3, canaries=c) == d
    # a pool smaller than n shrinks both sides alike
    small = choose_attack_records(planted, heldout=heldout, n=100, seed=3, canaries=c)
    assert small["n"] == 25 and len(small["members"]) == len(small["non_members"]) == 25
    path = tmp_path / "attack_records.json"
    save_attack_records(path, d)
    back = load_attack_records(path)
    mem, non = attack_records_as_records(back)
    assert len(mem) == len(non) == 20 and mem.labels is not None and mem.label_names == NAMES


def test_canary_set_validates():
    with pytest.raises(ConfigError, match="distinct"):
        CanarySet(texts=("a", "a"), labels=(0, 1), included=(True, False), clients=(0, 0), num_clients=1, label_names=NAMES)
    with pytest.raises(ConfigError, match="clients"):
        CanarySet(texts=("a", "b"), labels=(0, 1), included=(True, False), clients=(0, 2), num_clients=2, label_names=NAMES)
