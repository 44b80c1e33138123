"""Shared fixtures: tiny models built from configs (no hub), a tiny tokenizer, small local data."""

from __future__ import annotations

import csv
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DPFED_CACHE", "off")  # tests never fill ~/.cache/dpfed; the cache's own tests name a folder
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # for this process and the processes it starts

    import torch

    torch.set_num_threads(1)

WORDS = ("good great fine bad awful poor movie film plot actor story boring fun dull superb "
         "weak strong the a is was and but not very").split()


def _tokenizer(tmp):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]")
    fast.save_pretrained(tmp)
    return fast


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer(d)
    torch.manual_seed(0)  # test-only: fixes the random weights of the tiny model
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = _tokenizer(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    """400 labelled sentences: label 1 when positive words dominate."""
    rng = random.Random(0)
    pos, neg = ["good", "great", "fun", "superb", "strong"], ["bad", "awful", "boring", "dull", "weak"]
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sentence", "sentiment"])
        for i in range(400):
            lab = i % 2
            words = [rng.choice(pos if lab else neg) for _ in range(3)] + [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
            rng.shuffle(words)
            w.writerow([" ".join(words), "pos" if lab else "neg"])
    return str(path)


@pytest.fixture(scope="session")
def tiny_instruct_config(tiny_llama_dir, tiny_csv):
    """A 3-site instruct run on the tiny Llama ("{sentence}" → good/bad), as a dict; ``train=``/top-level overrides."""
    def build(*, train: dict | None = None, **top) -> dict:
        return {
            "model": {"name": tiny_llama_dir, "task": "instruct", "rank": 4, "adapt_layers": [-1], "max_length": 32,
                      "max_new_tokens": 2},
            "data": {"source": tiny_csv, "template": "{sentence}", "response_column": "sentiment",
                     "response_map": {"pos": "good", "neg": "bad"}, "num_clients": 3},
            "train": {"rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 0.5, "eval_examples": 20, **(train or {})},
            "privacy": {"epsilon": 3.0, "delta": 1e-4},
            **top,
        }

    return build


@pytest.fixture
def run_cli(capsys):
    """Run ``dpfed`` in process: returns (exit code, stdout, stderr)."""
    from dpfed.cli import main

    def run(argv):
        with pytest.raises(SystemExit) as exc:
            main(argv)
            raise SystemExit(0)
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    return run
