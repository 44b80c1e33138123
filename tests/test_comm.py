"""Tests for dpfed.comm and ``dpfed comm``: paper figures, hand formulas, shapes, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from dpfed import comm as C
from dpfed.errors import ConfigError

# A tiny Llama-style shape: h = 8, I = 12, 2 heads of 4, 1 KV head, 2 layers.
TINY = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
}
# (d_in, d_out) of q, k, v, o, gate, up, down, written out by hand.
TINY_DIMS = [(8, 8), (8, 4), (8, 4), (8, 8), (8, 12), (8, 12), (12, 8)]


# ----------------------------------------------------------------- paper figures


def test_paper_230x_on_gemma_2_9b():
    shape = C.model_shape("gemma-2-9b")
    fed_sb = C.paper_communication(shape, "fed-sb", rank=200, clients=25)
    flora = C.paper_communication(shape, "flora", rank=32, clients=25)
    fedex = C.paper_communication(shape, "fedex-lora", rank=32, clients=25)
    assert fed_sb == 200**2 * 7 * 42 == 11_760_000
    assert flora == fedex == 25 * 32 * (7680 + 5632 + 5632 + 7680 + 3 * 17920) * 42 == 2_700_902_400
    assert flora == pytest.approx(2.70e9, rel=0.005)
    assert flora / fed_sb == pytest.approx(230, rel=0.02)


def test_paper_fedit_on_mistral_7b():
    shape = C.model_shape("mistral-7b")
    fedit = C.paper_communication(shape, "fedit", rank=32, clients=25)
    fed_sb = C.paper_communication(shape, "fed-sb", rank=200, clients=25)
    assert fedit == 83_886_080 and fedit == pytest.approx(83.9e6, rel=0.001)
    assert fed_sb == 8_960_000
    # FedIT's count does not grow with the number of clients; FLoRA's does.
    assert C.paper_communication(shape, "fedit", rank=32, clients=3) == fedit
    assert C.paper_communication(shape, "flora", rank=32, clients=3) == 3 * fedit


# ----------------------------------------------------------------- hand formulas


def _hand(method: str, r: int, c: int) -> tuple[int, int]:
    """Per-client (up, down) over both layers, straight from REFERENCE.md's table."""
    up = down = 0
    for d_in, d_out in TINY_DIMS:
        if method == "fedit":
            up += r * (d_in + d_out)
            down += r * (d_in + d_out)
        elif method == "ffa-lora":
            up += r * d_out
            down += r * d_out
        elif method == "fedex-lora":
            up += r * (d_in + d_out)
            down += r * (d_in + d_out) + d_out * d_in
        elif method == "flora":
            up += r * (d_in + d_out)
            down += c * r * (d_in + d_out)
        elif method == "fed-sb":
            up += r * r
            down += r * r
    return 2 * up, 2 * down


@pytest.mark.parametrize("method", C.METHODS)
@pytest.mark.parametrize("dtype,nbytes", [("fp32", 4), ("bf16", 2), ("fp16", 2)])
def test_bytes_match_hand_formulas(method, dtype, nbytes):
    shape = C.model_shape(TINY)
    r, c = 3, 5
    row = C.method_comm(shape, method, rank=r, clients=c, dtype=dtype)
    up, down = _hand(method, r, c)
    assert (row.params_up, row.params_down) == (up, down)
    assert (row.bytes_up, row.bytes_down) == (nbytes * up, nbytes * down)
    assert row.total_params == c * (up + down)
    assert row.total_bytes == nbytes * c * (up + down)


def test_tiny_literal_numbers():
    shape = C.model_shape(TINY)
    # sum(d_in + d_out) over one layer = 116; r = 2, 2 layers.
    assert C.method_comm(shape, "fedit", rank=2, clients=4, dtype="fp16").bytes_up == 2 * 116 * 2 * 2
    assert C.method_comm(shape, "fed-sb", rank=2, clients=4).params_up == 2 * 2 * 7 * 2
    assert C.method_comm(shape, "fed-sb", rank=2, clients=4).setup_params_down == 2 * 116 * 2
    assert C.method_comm(shape, "ffa-lora", rank=2, clients=4).setup_params_down == 0


def test_target_modules_narrow_the_count():
    shape = C.model_shape(TINY, target_modules=["v_proj", "q_proj"])
    assert shape.module_names == ("q_proj", "v_proj")
    assert C.method_comm(shape, "fedit", rank=1, clients=1).params_up == 2 * (16 + 12)


# ----------------------------------------------------------------- shapes


def test_llama_3_2_1b_gqa_shapes():
    shape = C.model_shape("llama-3.2-1b")
    dims = {m.name: (m.d_in, m.d_out) for m in shape.modules}
    assert shape.num_layers == 16
    assert dims["q_proj"] == (2048, 2048)
    assert dims["k_proj"] == dims["v_proj"] == (2048, 512)
    assert dims["o_proj"] == (2048, 2048)
    assert dims["gate_proj"] == dims["up_proj"] == (2048, 8192)
    assert dims["down_proj"] == (8192, 2048)


def test_head_dim_defaults_and_gemma_explicit():
    no_head_dim = dict(TINY)
    assert C.model_shape(no_head_dim).modules[1].d_out == 4  # 1 KV head x (8 / 2)
    gemma = {m.name: (m.d_in, m.d_out) for m in C.model_shape("gemma-2-9b").modules}
    assert gemma["q_proj"] == (3584, 4096) and gemma["k_proj"] == (3584, 2048)
    assert gemma["o_proj"] == (4096, 3584)


def test_bert_family_shapes_and_bundled_files():
    bert = C.model_shape("bert-base")
    assert bert.module_names == C.BERT_MODULES
    assert {(m.d_in, m.d_out) for m in bert.modules} == {(768, 768), (768, 3072), (3072, 768)}
    mini = C.model_shape("all-minilm-l6-v2")
    assert mini.num_layers == 6 and mini.modules[0].d_in == 384
    for name in C.bundled_models():
        assert C.model_shape(name).source  # every bundled file names its source model


def test_config_path_and_source_id(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    assert C.model_shape(tmp_path).num_layers == 2
    assert C.model_shape(tmp_path / "config.json").num_layers == 2
    assert C.model_shape("google/gemma-2-9b").name == "gemma-2-9b"


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call,needle",
    [
        (lambda s: C.method_comm(s, "fedit", rank=0, clients=1), "rank must be an integer >= 1"),
        (lambda s: C.method_comm(s, "fedit", rank=5, clients=1), "rank must be <= min(d_in, d_out) = 4 for module 'k_proj'"),
        (lambda s: C.method_comm(s, "fedit", rank=1, clients=0), "clients must be an integer >= 1, got 0"),
        (lambda s: C.method_comm(s, "fedit", rank=1, clients=1, dtype="int8"), "dtype must be one of"),
        (lambda s: C.method_comm(s, "lora", rank=1, clients=1), "method must be one of"),
        (lambda s: s.select(["q_proj", "query"]), "got 'query'"),
    ],
)
def test_bad_input_raises_config_error(call, needle):
    with pytest.raises(ConfigError) as err:
        call(C.model_shape(TINY))
    assert needle in str(err.value)


def test_unknown_model_and_model_type():
    with pytest.raises(ConfigError, match="model must be a bundled name"):
        C.model_shape("no-such-model")
    with pytest.raises(ConfigError, match="model_type must be one of"):
        C.model_shape({**TINY, "model_type": "phi3"})


def test_rank_spec_forms():
    assert C.resolve_ranks("32") == {m: (32,) for m in C.METHODS}
    assert C.resolve_ranks("16,32", ["fedit"]) == {"fedit": (16, 32)}
    assert C.resolve_ranks("fed-sb=200,flora=32") == {"fed-sb": (200,), "flora": (32,)}
    mixed = C.resolve_ranks("fed-sb=200,32")
    assert mixed["fed-sb"] == (200,) and mixed["fedit"] == (32,)
    for bad in ("", "x", "fed-sb=", "lora=3", "32,32", "fedit=1,,2"):
        with pytest.raises(ConfigError):
            C.resolve_ranks(bad)
    with pytest.raises(ConfigError, match="rank must be given for method fedit"):
        C.resolve_ranks("fed-sb=200", ["fed-sb", "fedit"])


# ----------------------------------------------------------------- CLI


@pytest.fixture
def cli_main(monkeypatch):
    """``dpfed.cli.main``; stubs out ``dpfed.cli.train`` if that command is not written yet."""
    if importlib.util.find_spec("dpfed.cli.train") is None:
        stub = types.ModuleType("dpfed.cli.train")
        stub.train = lambda: None
        monkeypatch.setitem(sys.modules, "dpfed.cli.train", stub)
    from dpfed.cli import main

    return main


def _run(main, argv):
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def test_cli_json(cli_main, capsys):
    code = _run(cli_main, ["comm", "--model", "gemma-2-9b", "--rank", "fed-sb=200,32",
                           "--clients", "25", "--dtype", "bf16", "--format", "json"])
    assert code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["bytes_per_param"] == 2 and report["num_layers"] == 42
    rows = {m["method"]: m for m in report["methods"]}
    assert list(rows) == list(C.METHODS)
    assert rows["fed-sb"]["per_client_per_round"]["params_up"] == 11_760_000
    assert rows["fed-sb"]["per_client_per_round"]["bytes_up"] == 23_520_000
    assert rows["flora"]["per_client_per_round"]["params_down"] == 2_700_902_400
    assert rows["flora"]["all_clients_per_round"]["params_total"] == 25 * (108_036_096 + 2_700_902_400)
    (vs,) = rows["flora"]["vs_fed_sb"]
    assert vs["fed_sb_rank"] == 200 and vs["paper_params_ratio"] == pytest.approx(229.67, abs=0.01)


def test_cli_table(cli_main, capsys):
    code = _run(cli_main, ["comm", "--model", "bert-base", "--rank", "32",
                           "--target-modules", "query,value", "--clients", "3"])
    assert code in (0, None)
    out = capsys.readouterr().out
    assert "fed-sb" in out and "flora" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--model", "all-minilm-l6-v2", "--rank", "512"],
         "rank must be <= min(d_in, d_out) = 384 for module 'query'"),
        (["--model", "llama-3.2-1b", "--target-modules", "q_proj,query"], "target_modules must be among"),
        (["--model", "llama-3.2-1b", "--clients", "0"], "clients must be an integer >= 1"),
        (["--model", "llama-3.2-1b", "--dtype", "fp8"], "dtype must be one of"),
        (["--model", "nope"], "model must be a bundled name"),
        (["--model", "llama-3.2-1b", "--methods", "fedit,lora"], "method must be one of"),
        (["--model", "llama-3.2-1b", "--format", "yaml"], "format must be one of"),
    ],
)
def test_cli_bad_input_exits_2(cli_main, capsys, argv, needle):
    assert _run(cli_main, ["comm", *argv, "--format", "json"] if "--format" not in argv else ["comm", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
