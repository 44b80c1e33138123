"""Fixtures for the Flower tests: a tiny run config (the tiny BERT and CSV of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_config(model_dir: str, data: str, **train) -> dict:
    return {
        "model": {"name": model_dir, "rank": 4, "max_length": 32},
        "data": {"source": data, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 2, "local_steps": 2, "batch_size": 16, "eval_batch_size": 128, **train},
        "privacy": {"epsilon": 3.0, "delta": 1e-4},
        "seed": 0, "device": "cpu",
    }


@pytest.fixture(scope="session")
def flower_cfg_path(tiny_bert_dir, tiny_csv, tmp_path_factory) -> Path:
    """The tiny 3-site, 2-round DP run as a YAML file (what the server reads)."""
    from dpfed import config as cfgmod

    path = tmp_path_factory.mktemp("flower-cfg") / "tiny.yaml"
    path.write_text(cfgmod.to_yaml(cfgmod.from_dict(tiny_config(tiny_bert_dir, tiny_csv))))
    return path


@pytest.fixture
def as_serverapp():
    """Messages need the identity a ServerApp process gets from Flower at start (set through its setters)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


@pytest.fixture(scope="module")
def job(flower_cfg_path):
    """The tiny run prepared in process (the server's side of the Flower tests)."""
    from dpfed import config as cfgmod
    from dpfed.runner import prepare

    return prepare(cfgmod.load(flower_cfg_path))
