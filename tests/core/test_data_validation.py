"""Loading user data (issue 15): bad values, numeric labels, file problems and local paths.

Each test here failed before the fix: empty and NaN labels became classes '' and 'nan', a null
JSON text was trained on as 'None', labels 0..10 were ordered '0', '1', '10', '2', ..., an empty
or non-UTF-8 file gave a bare DatasetGenerationError, and a missing relative path went to the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpfed import config as C
from dpfed.data import load_records, sort_labels
from dpfed.errors import ConfigError, DataError


def _csv(tmp_path: Path, text: str, name: str = "d.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _load(source: str, **data):
    return load_records(C.DataConfig(source=source, **data), task="classification")


@pytest.mark.parametrize("body,row,column,problem", [
    ("text,label\ngood film,pos\nbad film,\nok film,neg\n", 2, "label", "empty label"),
    ("text,label\ngood film,pos\nbad film,nan\n", 2, "label", "NaN label"),
    ("text,label\ngood film,pos\n,neg\n", 2, "text", "empty text"),
    ("text,label\ngood film,pos\nbad film\n", 2, "label", "null or missing label"),
])
def test_bad_csv_values_are_refused_with_file_row_column_value(tmp_path, body, row, column, problem):
    path = _csv(tmp_path, body)
    with pytest.raises(DataError) as exc:
        _load(path)
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path} row {row}, column '{column}': {problem}, got ")
    assert "--drop-invalid" in msg


def test_null_json_text_and_nan_label_are_refused_never_trained_as_strings(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "good", "label": 1}\n{"text": null, "label": 0}\n{"text": "bad", "label": NaN}\n')
    with pytest.raises(DataError, match=r"d.jsonl row 2, column 'text': null or missing text, got None"):
        _load(str(p))
    p.write_text('{"text": "good", "label": 1}\n{"text": "bad", "label": NaN}\n')
    with pytest.raises(DataError, match=r"d.jsonl row 2, column 'label': NaN label, got nan"):
        _load(str(p))


def test_drop_invalid_drops_and_counts(tmp_path):
    path = _csv(tmp_path, "text,label\ngood film,pos\nbad film,\n,neg\nok film,neg\nfine film,NaN\n")
    notes: list[str] = []
    recs = load_records(C.DataConfig(source=path, drop_invalid=True), task="classification", notes=notes)
    assert recs.texts == ("good film", "ok film") and recs.rows == (1, 4)
    assert recs.label_names == ("neg", "pos") and "" not in recs.label_names and "nan" not in recs.label_names
    assert notes == [f"dropped 3 of 5 records of {path} (--drop-invalid): 1 empty label, 1 empty text, 1 NaN label"]


def test_numeric_labels_sort_numerically(tmp_path):
    rows = "".join(f"text {i},{i % 11}\n" for i in range(44))
    recs = _load(_csv(tmp_path, "text,label\n" + rows))
    assert recs.label_names == tuple(str(i) for i in range(11))
    assert recs.label_names[2] == "2" and recs.label_names[10] == "10"
    assert recs.labels[:11] == tuple(range(11))
    # integers in JSON and integral floats name the same classes as the CSV digits
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a", "label": 10}, {"text": "b", "label": 2.0}, {"text": "c", "label": 1}]))
    assert _load(str(p)).label_names == ("1", "2", "10")
    assert sort_labels(["b", "a", "10"]) == ("10", "a", "b")  # not all numbers: string order


def test_declared_labels_give_the_index_order_and_refuse_other_labels(tmp_path):
    path = _csv(tmp_path, "text,label\na,pos\nb,neg\nc,pos\n")
    recs = _load(path, labels=("pos", "neg"))
    assert recs.label_names == ("pos", "neg") and recs.labels == (0, 1, 0)
    with pytest.raises(DataError, match=r"row 2, column 'label': label not among data.labels \['pos', 'maybe'\], got 'neg'"):
        _load(path, labels=("pos", "maybe"))


@pytest.mark.parametrize("content,message", [
    (b"", "is empty (0 bytes)"),
    (b"\n\n", "is empty (2 bytes)"),
    (b"text,label\ncaf\xe9 film,pos\n", "must be UTF-8 text, got byte 0xe9 on line 2"),
    (b"text,label\n", "must contain records, got 0"),
])
def test_empty_and_non_utf8_files_name_the_file_and_the_problem(tmp_path, content, message):
    p = tmp_path / "d.csv"
    p.write_bytes(content)
    with pytest.raises(DataError) as exc:
        _load(str(p))
    assert str(p) in str(exc.value) and message in str(exc.value) and "\n" not in str(exc.value)


def test_csv_row_with_extra_fields_is_named(tmp_path):
    path = _csv(tmp_path, "text,label\ngood film,pos\ngood, but long,neg\n")
    with pytest.raises(DataError, match=r"row 2 \(line 3\): 3 fields where the header has 2"):
        _load(path)


def test_utf8_bom_and_tsv_are_read(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_bytes("\ufefftext\tlabel\nhello, world\tpos\nbye\tneg\n".encode())
    recs = _load(str(p))
    assert recs.texts == ("hello, world", "bye") and recs.label_names == ("neg", "pos")


@pytest.mark.parametrize("source,local", [
    ("my.csv", True), ("data/train.jsonl", True), ("./data", True), ("~/x", True), ("/abs/file", True),
    ("a/b/c", True), ("reviews.parquet", True), ("notes.txt", True),
    ("imdb", False), ("stanfordnlp/imdb", False),
])
def test_local_looking_paths(source, local):
    assert C.is_local_path(source) is local


def test_missing_local_path_is_an_error_never_a_hub_lookup(tmp_path, monkeypatch):
    import datasets

    def no_hub(*a, **k):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    for typo in ("tarin.csv", "data/train.jsonl", "./train"):
        with pytest.raises(DataError, match="must be an existing file|must end in"):
            _load(typo)
        with pytest.raises(ConfigError, match=r"data.source must be an existing file .*never looked up on the Hugging Face hub"):
            C.resolve_data_paths(C.RunConfig(data=C.DataConfig(source=typo)))


def test_paths_are_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.csv").write_text("text,label\na,x\n")
    (tmp_path / "pub.csv").write_text("text,label\nb,y\n")
    monkeypatch.chdir(tmp_path / "sub")
    cfg = C.resolve_data_paths(C.RunConfig(data=C.DataConfig(source="d.csv", public_source="../pub.csv")))
    assert cfg.data.source == str(tmp_path / "sub" / "d.csv")
    assert cfg.data.public_source == str(tmp_path / "pub.csv")
    assert "source: " + str(tmp_path / "sub" / "d.csv") in C.to_yaml(cfg)
    same = C.RunConfig(data=C.DataConfig(source="embedded:rotten_tomatoes"))
    assert C.resolve_data_paths(same) is same


def test_config_labels_round_trip_and_are_dropped_with_a_new_source(tmp_path):
    cfg = C.override(C.RunConfig(), **{"data.labels": (0, 1, 10)})
    assert cfg.data.labels == ("0", "1", "10")
    p = tmp_path / "c.yaml"
    p.write_text(C.to_yaml(cfg))
    assert C.load(p) == cfg
    # labels describe a source: replacing the source without new labels drops them
    assert C.override(cfg, **{"data.source": "other.csv"}).data.labels is None
    assert C.override(cfg, **{"data.source": "other.csv", "data.labels": ("a", "b")}).data.labels == ("a", "b")
    with pytest.raises(ConfigError, match="data.labels must be distinct"):
        C.DataConfig(labels=("a", "a"))


def test_resolving_paths_keeps_the_declared_labels(tmp_path, monkeypatch):
    (tmp_path / "d.csv").write_text("text,label\na,x\n")
    monkeypatch.chdir(tmp_path)
    cfg = C.resolve_data_paths(C.RunConfig(data=C.DataConfig(source="d.csv", labels=("x", "y"))))
    assert cfg.data.labels == ("x", "y") and cfg.data.source == str(tmp_path / "d.csv")
