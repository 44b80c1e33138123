"""`dpfed train` on a user's own file (issues 12 and 15): public data, labels, bad data, paths, --print-config.

Every run uses the tiny BERT fixture, one round and one local step.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from dpfed import config as cfgmod

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--rounds", "1", "--local-steps", "1", "--batch-size", "8", "--rank", "4", "--clients", "2",
        "--delta", "1e-4", "--seed", "0", "--format", "json"]


def _train(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--dataset", str(data), "--text-column", "sentence",
            "--label-column", "sentiment", *FAST, "--out", str(out), *extra]


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_user_dataset_gets_no_public_slice_and_the_head_source_is_printed(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(_train(tiny_bert_dir, tiny_csv, out))
    assert code == 0, err
    assert "no public data declared, so no public slice; init.head 'public' -> 'random'" in err
    assert "classification head: random (data-free)" in err
    assert "declared public" not in err.replace("declare public records", "")
    info = json.loads(stdout)["init_info"]
    assert info["public_records"] == 0 and info["head_source"] == "random (data-free)"
    assert not any("public_examples" in k for k in info)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["public_fraction"] == 0.0 and saved["init"]["head"] == "random"
    assert saved["data"]["source"] == str(Path(tiny_csv).resolve()) and saved["data"]["labels"] is None
    assert json.loads((out / "labels.json").read_text()) == {"0": "neg", "1": "pos"}
    peft = json.loads((out / "adapter" / "peft" / "adapter_config.json").read_text())
    assert peft["id2label"] == {"0": "neg", "1": "pos"} and peft["label2id"] == {"neg": 0, "pos": 1}
    native = json.loads((out / "adapter" / "lorasb_config.json").read_text())
    assert native["id2label"] == peft["id2label"]


def test_declared_public_file_is_counted_and_fits_the_head(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    rows = _rows(tiny_csv)
    pub = _write(tmp_path / "public.csv", [rows[0]] + [[f"{r[0]} public", r[1]] for r in rows[1:41]])
    out = tmp_path / "run"
    code, stdout, err = run_cli(_train(tiny_bert_dir, tiny_csv, out, "--public-data", str(pub)))
    assert code == 0, err
    assert f"public data: 40 records from {pub.resolve()} (declared public" in err
    assert f"classification head: public file: 40 records from {pub.resolve()}" in err
    info = json.loads(stdout)["init_info"]
    assert info["public_records"] == 40 and info["head_public_examples"] == 40.0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["public_source"] == str(pub.resolve())


def test_declared_public_fraction_prints_the_count(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    code, stdout, err = run_cli(_train(tiny_bert_dir, tiny_csv, tmp_path / "run", "--public-fraction", "0.1"))
    assert code == 0, err
    src = str(Path(tiny_csv).resolve())
    assert (f"40 records of {src} declared public by data.public_fraction: they fit the head/init without DP and "
            "are outside ε") in err
    assert json.loads(stdout)["init_info"]["head_source"] == f"public: 40 records (data.public_fraction of {src})"


def test_print_config_writes_the_resolved_yaml_and_nothing_else(tiny_csv, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["train", "--print-config"])
    assert code == 0, err
    assert cfgmod.from_dict(yaml.safe_load(stdout)) == cfgmod.load(ROOT / "configs" / "demo.yaml")
    code, stdout, _ = run_cli(["train", "--print-config", "--dataset", tiny_csv, "--epsilon", "1"])
    cfg = cfgmod.from_dict(yaml.safe_load(stdout))
    assert code == 0 and cfg.data.source == str(Path(tiny_csv).resolve()) and cfg.privacy.epsilon == 1.0
    assert cfg.data.public_fraction == 0.0 and cfg.data.labels is None and cfg.init.head == "random"
    assert list(tmp_path.iterdir()) == []


def test_private_label_outside_the_test_split_is_refused(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    from dpfed.data import load_records, split_and_partition
    from dpfed.runner import child_seed

    rows = _rows(tiny_csv)
    data = cfgmod.DataConfig(source=tiny_csv, text_column="sentence", label_column="sentiment", num_clients=2)
    splits = split_and_partition(load_records(data, task="classification"), data, seed=child_seed(0, 1))  # --seed 0
    k = splits.clients[0].rows[5]
    rows[k][1] = "secret"
    path = _write(tmp_path / "d.csv", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(_train(tiny_bert_dir, path, out))
    line = _one_line(err)
    assert code == 2 and not out.exists()
    assert line.startswith(f"error: {path} row {k}, column 'sentiment': label 'secret' is not among the labels of "
                           "the test split and the public data ['neg', 'pos']")
    assert "--labels" in line
    code, _, err = run_cli(_train(tiny_bert_dir, path, out, "--labels", "neg,pos,secret"))
    assert code == 0, err
    assert json.loads((out / "labels.json").read_text()) == {"0": "neg", "1": "pos", "2": "secret"}


def test_bad_values_are_refused_or_dropped_and_counted(tiny_bert_dir, tiny_csv, tmp_path, run_cli):
    rows = _rows(tiny_csv)
    rows[7][1] = ""
    rows[9][0] = ""
    path = _write(tmp_path / "d.csv", rows)
    code, _, err = run_cli(_train(tiny_bert_dir, path, tmp_path / "a"))
    assert code == 2
    assert _one_line(err).startswith(f"error: {path} row 7, column 'sentiment': empty label, got ''")
    code, _, err = run_cli(_train(tiny_bert_dir, path, tmp_path / "b", "--drop-invalid"))
    assert code == 0, err
    assert f"dropped 2 of 400 records of {path} (--drop-invalid): 1 empty label, 1 empty text" in err


@pytest.mark.parametrize("content,message", [(b"", "is empty (0 bytes)"),
                                             (b"sentence,sentiment\n\xff\xfe,pos\n", "must be UTF-8 text")])
def test_empty_and_non_utf8_files_exit_2_with_one_line(content, message, tiny_bert_dir, tmp_path, run_cli):
    path = tmp_path / "d.csv"
    path.write_bytes(content)
    code, _, err = run_cli(_train(tiny_bert_dir, path, tmp_path / "run"))
    assert code == 2 and str(path) in _one_line(err) and message in err


def test_missing_relative_path_is_an_error_not_a_hub_lookup(tiny_bert_dir, tmp_path, run_cli, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub must not be asked"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(_train(tiny_bert_dir, "data/tarin.csv", tmp_path / "run"))
    assert code == 2
    assert "data.source must be an existing file (a path is never looked up on the Hugging Face hub), got " \
           "'data/tarin.csv'" in _one_line(err)


def test_relative_path_is_stored_absolute(tiny_bert_dir, tiny_csv, tmp_path, run_cli, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    _write(here / "mine.csv", _rows(tiny_csv))
    monkeypatch.chdir(here)
    out = tmp_path / "run"
    code, _, err = run_cli(_train(tiny_bert_dir, "mine.csv", out))
    assert code == 0, err
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["source"] == str(here / "mine.csv")


class _Stop(Exception):
    pass


def test_resume_from_another_directory_finds_the_data(tiny_bert_dir, tiny_csv, tmp_path, run_cli, monkeypatch):
    from dpfed.runner import prepare, run

    here = tmp_path / "here"
    here.mkdir()
    _write(here / "mine.csv", _rows(tiny_csv))
    monkeypatch.chdir(here)
    cfg = cfgmod.resolve_data_paths(cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 4, "max_length": 32},
        "data": {"source": "mine.csv", "text_column": "sentence", "label_column": "sentiment", "num_clients": 2},
        "train": {"rounds": 2, "local_steps": 1, "batch_size": 8},
        "privacy": {"epsilon": 3.0, "delta": 1e-4, "noise_multiplier": 1.0}, "seed": 0, "device": "cpu"}))

    def stop_after_round_1(kind, info):
        if kind == "round" and info["round"] == 1:
            raise _Stop()

    out = tmp_path / "run"
    with pytest.raises(_Stop):
        run(prepare(cfg), out, progress=stop_after_round_1)
    monkeypatch.chdir(tmp_path)  # where 'mine.csv' does not exist
    code, stdout, err = run_cli(["train", "--resume", str(out), "--format", "json"])
    assert code == 0, err
    assert json.loads(stdout)["rounds_completed"] == 2


def _readme_example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Bring your own data"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_readme_example_runs_as_written(tiny_bert_dir, tmp_path, run_cli, monkeypatch):
    """The README's command verbatim, except: the tiny test model replaces the embedded one (--model), the run
    directory is a temporary folder (--out), and one round of one local step with JSON output (appended)."""
    argv = _readme_example()
    assert argv[0].endswith("dpfed") and argv[1] == "train" and "--dataset" in argv
    argv = argv[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "reviews")
    argv += ["--model", tiny_bert_dir, "--rounds", "1", "--local-steps", "1", "--format", "json"]
    monkeypatch.chdir(ROOT)  # the example's path is relative to the repository
    code, stdout, err = run_cli(argv)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["rounds_completed"] == 1 and 0 < s["epsilon_spent"] <= 3 and s["clients"] == 2
    assert s["init_info"]["head_source"] == "random (data-free)" and "classification head: random (data-free)" in err
    assert json.loads((tmp_path / "reviews" / "labels.json").read_text()) == {str(i): str(i + 1) for i in range(5)}
