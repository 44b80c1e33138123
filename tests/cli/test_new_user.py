"""What a new user hits (issue 15): every bad input gives one line and exit code 2, and the rest of the
first-run experience (quiet output, one suggestion, the tokenisation and frozen-prefix cache, a loadable
PEFT export and the README's examples, the audit's and `dpfed comm`'s wording).

Runs use the tiny test models (tests/conftest.py), one or two rounds of one local step.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--rounds", "1", "--local-steps", "1", "--batch-size", "8", "--rank", "4", "--clients", "2",
        "--delta", "1e-4", "--seed", "0", "--init", "random"]


def _train(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--dataset", str(data), "--text-column", "sentence",
            "--label-column", "sentiment", *FAST, "--out", str(out), *extra]


def _one_line(code, err) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


# -- runs the cases need ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """A finished one-round tiny run without canaries (made with the CLI)."""
    from dpfed.cli import main

    out = tmp_path_factory.mktemp("finished") / "run"
    try:
        main(_train(tiny_bert_dir, tiny_csv, out, "--format", "json"))
    except SystemExit as exc:
        assert exc.code in (0, None)
    assert (out / "summary.json").is_file()
    return out


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def torn_run(tiny_bert_dir, tiny_csv, tmp_path_factory):
    """A run stopped after round 1 of 2 whose ledger ends in a torn line (a crash during round 2's append)."""
    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 4, "max_length": 32},
        "data": {"source": tiny_csv, "text_column": "sentence", "label_column": "sentiment", "num_clients": 2},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 2, "local_steps": 1, "batch_size": 8},
        "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 0, "device": "cpu"})

    def stop_after_round_1(kind, info):
        if kind == "round" and info["round"] == 1:
            raise _Stop()

    out = tmp_path_factory.mktemp("torn") / "run"
    with pytest.raises(_Stop):
        run(prepare(cfg), out, progress=stop_after_round_1)
    with (out / "ledger.jsonl").open("ab") as fh:
        fh.write(b'{"client":"client-000","event":{"count":1,"noise_mul')  # no newline: the write was cut
    return out


# -- acceptance: every bad input of the issue, one line, exit 2 ----------------------------------------------------

def _cases(tmp_path: Path, finished: Path, torn: Path) -> dict[str, list[str]]:
    existing_file = tmp_path / "report.txt"
    existing_file.write_text("not a folder\n")
    config = tmp_path / "huge.yaml"
    config.write_text(yaml.safe_dump({"privacy": {"epsilon": 1e9}}))
    return {
        "audit --out an existing file": ["audit", str(finished), "--out", str(existing_file)],
        "audit --out under a file": ["audit", str(finished), "--out", str(existing_file / "sub")],
        "audit a run without canaries": ["audit", str(finished)],
        "train --epsilon 1e9": ["train", "--epsilon", "1e9", "--out", str(tmp_path / "e")],
        "train --epsilon 101": ["train", "--epsilon", "101", "--out", str(tmp_path / "e")],
        "train --client-epsilon 1e9": ["train", "--privacy-unit", "client", "--client-epsilon", "1e9",
                                       "--out", str(tmp_path / "e")],
        "config privacy.epsilon 1e9": ["train", "--config", str(config), "--out", str(tmp_path / "e")],
        "plan --epsilon 1e9": ["plan", "--epsilon", "1e9", "--delta", "1e-5", "--sample-rate", "0.01",
                               "--steps", "100"],
        "a misspelt command": ["trian"],
        "budget of a torn ledger": ["budget", str(torn)],
    }


CASE_NAMES = ["audit --out an existing file", "audit --out under a file", "audit a run without canaries",
              "train --epsilon 1e9", "train --epsilon 101", "train --client-epsilon 1e9", "config privacy.epsilon 1e9",
              "plan --epsilon 1e9", "a misspelt command", "budget of a torn ledger"]
EXPECTED = {
    "audit --out an existing file": "--out must be a directory",
    "audit --out under a file": "which is a file",
    "audit a run without canaries": "trained without --canaries",
    "train --epsilon 1e9": "epsilon must be <= 100",
    "train --epsilon 101": "epsilon must be <= 100",
    "train --client-epsilon 1e9": "client_epsilon must be <= 100",
    "config privacy.epsilon 1e9": "epsilon must be <= 100",
    "plan --epsilon 1e9": "--epsilon must be <= 100",
    "a misspelt command": "No such command 'trian'. Did you mean 'train'?",
    "budget of a torn ledger": "dpfed train --resume RUN_DIR",
}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_every_bad_input_is_one_line_and_exit_2(case, tmp_path, finished_run, torn_run, run_cli):
    argv = _cases(tmp_path, finished_run, torn_run)[case]
    code, _, err = run_cli(argv)
    line = _one_line(code, err)
    assert EXPECTED[case] in line
    assert not (tmp_path / "e").exists()  # a refused run writes nothing


def test_bad_inputs_in_a_real_process_print_no_traceback(tmp_path, finished_run, torn_run):
    """The console script itself (stderr as the user sees it), for the cases whose fix is in the CLI's top level."""
    cases = _cases(tmp_path, finished_run, torn_run)
    for case in ("audit --out an existing file", "a misspelt command", "plan --epsilon 1e9", "train --epsilon 1e9"):
        proc = subprocess.run([sys.executable, "-m", "dpfed.cli", *cases[case]], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
        assert EXPECTED[case] in _one_line(proc.returncode, proc.stderr), case


def test_did_you_mean_once(run_cli):
    code, _, err = run_cli(["trian"])
    assert err.count("Did you mean") == 1, err


def test_torn_ledger_message_names_a_command_that_repairs_it(torn_run, tmp_path, run_cli):
    run = tmp_path / "run"
    shutil.copytree(torn_run, run)
    line = _one_line(*run_cli(["budget", str(run)])[::2])
    assert "Ledger.recover" not in line  # a Python API is not an answer for a command-line user
    code, stdout, err = run_cli(["train", "--resume", str(run), "--format", "json"])
    assert code == 0, err
    assert (run / "ledger.jsonl.torn").is_file()  # the torn text is kept, and what may have left is counted:
    notes = [json.loads(line).get("note", "") for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert sum("torn write" in n for n in notes) == 2  # an unreadable fragment: one round for every client
    # ... which here leaves no room for round 2 (a crash costs budget, never hides any)
    summary = json.loads(stdout)
    assert summary["rounds_completed"] == 2 or "client-000" in str(summary["stop_reason"])
    code, _, err = run_cli(["budget", str(run), "--format", "json"])
    assert code == 0, err


# -- ε range and the accountant label ----------------------------------------------------------------------------------

def test_epsilon_bound_in_config_and_planning():
    from accounting import planning
    from accounting.errors import AccountingInputError
    from dpfed.config import PrivacyConfig
    from dpfed.errors import ConfigError

    assert planning.MAX_EPSILON == 100
    PrivacyConfig(epsilon=100.0)
    PrivacyConfig(unit="client", client_epsilon=100.0)
    with pytest.raises(ConfigError, match=r"epsilon must be <= 100 .*got 100\.5"):
        PrivacyConfig(epsilon=100.5)
    with pytest.raises(ConfigError, match=r"client_epsilon must be <= 100"):
        PrivacyConfig(unit="client", client_epsilon=1e9)
    PrivacyConfig(enabled=False, epsilon=1e9)  # --no-dp claims nothing: its epsilon is not read
    with pytest.raises(AccountingInputError, match=r"target_epsilon must be <= 100"):
        planning.calibrate_noise(target_epsilon=1e9, delta=1e-5, workloads=[(0.01, 100)])


def test_plan_labels_an_rdp_fallback_as_rdp(run_cli, monkeypatch):
    """When prv-accountant cannot compose the events, the number shown is RDP's, and the label says so."""
    from accounting import prv

    def refuse(*args, **kwargs):
        raise RuntimeError("Discrete mean differs from continuous mean significantly.")

    monkeypatch.setattr(prv, "_compose", refuse)
    args = ["plan", "--noise-multiplier", "1.0", "--delta", "1e-5", "--sample-rate", "0.01", "--steps", "1000"]
    code, out, err = run_cli(args)
    assert code == 0, err
    assert "epsilon (rdp upper)" in out and "prv upper" not in out
    assert err.count("PRV accountant failed") <= 1
    code, out, err = run_cli([*args, "--format", "json"])
    result = json.loads(out)
    assert result["epsilon_accountant"] == "rdp" and result["epsilon_lower"] is None
    assert result["clients"][0]["epsilon_accountant"] == "rdp"


def test_plan_labels_prv_when_prv_answers(run_cli):
    code, out, err = run_cli(["plan", "--noise-multiplier", "1.0", "--delta", "1e-5", "--sample-rate", "0.01",
                              "--steps", "1000", "--format", "json"])
    assert code == 0, err
    result = json.loads(out)
    assert result["epsilon_accountant"] == "prv" and result["epsilon_lower"] is not None


def test_plan_at_the_bound_answers():
    """At the bound itself calibration works and its answer holds (its time is in the README, not asserted)."""
    from accounting import planning, prv
    from accounting.events import PoissonGaussianEvent

    sigma = planning.calibrate_noise(target_epsilon=100.0, delta=1e-5, workloads=[(0.01, 1000)])
    event = PoissonGaussianEvent(noise_multiplier=sigma, sample_rate=0.01, count=1000)
    assert prv.epsilon([event], delta=1e-5).upper <= 100.0


# -- quiet output ------------------------------------------------------------------------------------------------------

def test_train_prints_no_third_party_warnings_or_progress(tiny_llama_dir, tiny_csv, tmp_path):
    """The causal-LM tiny run used to end with transformers' FutureWarning (is_gradient_checkpointing)."""
    argv = _train(tiny_llama_dir, tiny_csv, tmp_path / "run", "--task", "causal-lm")
    quiet = ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_DISABLE_PROGRESS_BARS",
             "HF_DATASETS_DISABLE_PROGRESS_BARS", "PYTHONWARNINGS")
    env = {k: v for k, v in os.environ.items() if k not in quiet}  # the CLI must set these itself
    proc = subprocess.run([sys.executable, "-m", "dpfed.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for text in ("Warning", "warnings.warn", "Generating train split", "examples/s", "Loading weights", "LOAD REPORT"):
        assert text not in proc.stderr, proc.stderr


def test_dataset_progress_bars_are_off_in_the_cli(tiny_csv, tmp_path):
    """What the CLI sets up silences `datasets` (a hub dataset goes through it), here on a local csv."""
    code = ("import datasets, sys\n"
            "from dpfed.cli import quiet_third_party\n"
            "quiet_third_party()\n"
            f"datasets.load_dataset('csv', data_files={str(tiny_csv)!r}, cache_dir={str(tmp_path / 'hf')!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_DATASETS_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Generating train split" not in proc.stderr and "examples/s" not in proc.stderr, proc.stderr


def test_library_code_configures_no_warnings():
    """Only the CLI filters warnings: importing the library leaves the filters alone."""
    code = ("import warnings, logging\n"
            "import numpy, torch, transformers, peft, safetensors, datasets  # third-party filters are theirs\n"
            "before, level = list(warnings.filters), logging.getLogger().level\n"
            "import dpfed.data, dpfed.config, dpfed.cli, accounting.planning, attacks.audit\n"
            "assert warnings.filters == before, 'import changed warnings.filters'\n"
            "assert logging.getLogger().level == level and not logging.getLogger().handlers\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


# -- the on-disk cache -------------------------------------------------------------------------------------------------

def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_tokens_and_prefix_states_are_cached_and_reused(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from dpfed import data
    from dpfed.config import DataConfig
    from dpfed.model import load_base

    cache = tmp_path / "cache"
    monkeypatch.setenv("DPFED_CACHE", str(cache))
    records = data.load_records(DataConfig(source=tiny_csv, text_column="sentence", label_column="sentiment"),
                                task="classification")
    tok = data.load_tokenizer(tiny_bert_dir)
    model = load_base(tiny_bert_dir, task="classification")
    model.prefix_start = 1

    def kinds() -> list[str]:
        return sorted(p.relative_to(cache).parts[0] for p in cache.rglob("*.safetensors"))

    first = data.tokenize(records, tok, max_length=32)
    data.attach_prefix_cache(model, first, batch_size=64)
    files = sorted(cache.rglob("*.safetensors"))
    assert kinds() == ["prefix", "tokens"]  # one file per shard and kind
    assert all(mode == (0o600 if Path(name).suffix else 0o700) for name, mode in _modes(cache).items())

    bottom = model.bottom
    calls: list[int] = []

    def counting(ids, mask):
        calls.append(ids.shape[0])
        return bottom(ids, mask)

    monkeypatch.setattr(model, "bottom", counting)
    second = data.tokenize(records, tok, max_length=32)
    data.attach_prefix_cache(model, second, batch_size=64)
    assert calls == [] and second.ids == first.ids  # a cache hit never runs the model
    assert all(torch.equal(a, b) for a, b in zip(first.hidden, second.hidden))
    assert sorted(cache.rglob("*.safetensors")) == files

    # another split: records seen before come from the cache, only new ones are computed
    data.attach_prefix_cache(model, data.tokenize(records.subset(range(300)), tok, max_length=32), batch_size=64)
    assert calls == []
    other = records.subset(range(300, 400))
    fresh = data.tokenize(other, tok, max_length=6)  # truncated: new token ids
    data.attach_prefix_cache(model, fresh, batch_size=64)
    computed = sum(calls)
    assert 0 < computed <= 100
    calls.clear()
    again = data.tokenize(other, tok, max_length=6)
    data.attach_prefix_cache(model, again, batch_size=64)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(fresh.hidden, again.hidden))

    # other frozen weights are another store
    monkeypatch.undo()
    monkeypatch.setenv("DPFED_CACHE", str(cache))
    with torch.no_grad():
        model.encoder.embeddings.word_embeddings.weight[0, 0] += 1.0
    data.attach_prefix_cache(model, first, batch_size=64)
    assert len({p.parent for p in (cache / "prefix").rglob("*.safetensors")}) == 2


def test_cached_states_equal_uncached_and_a_bad_file_is_recomputed(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from dpfed import data
    from dpfed.config import DataConfig
    from dpfed.model import load_base

    records = data.load_records(DataConfig(source=tiny_csv, text_column="sentence", label_column="sentiment"),
                                task="classification")
    tok = data.load_tokenizer(tiny_bert_dir)
    model = load_base(tiny_bert_dir, task="classification")
    model.prefix_start = 1
    monkeypatch.setenv("DPFED_CACHE", "off")
    plain = data.tokenize(records, tok, max_length=32)
    data.attach_prefix_cache(model, plain)
    reference = [h.clone() for h in plain.hidden]
    # the slow obvious twin: one record at a time through the frozen prefix
    for i in (0, 7, 123):
        b = plain.batch([i])
        assert torch.allclose(model.bottom(b["input_ids"], b["attention_mask"])[0], reference[i], atol=1e-5)

    monkeypatch.setenv("DPFED_CACHE", str(tmp_path / "c"))
    cold = data.tokenize(records, tok, max_length=32)
    data.attach_prefix_cache(model, cold)
    for path in (tmp_path / "c").rglob("*.safetensors"):
        path.write_bytes(b"truncated")
    warm = data.tokenize(records, tok, max_length=32)
    data.attach_prefix_cache(model, warm)
    assert warm.ids == plain.ids
    assert all(torch.equal(a, b) for a, b in zip(warm.hidden, reference))
    assert all(p.stat().st_size > 100 for p in (tmp_path / "c").rglob("*.safetensors"))  # rewritten


def test_cache_off_writes_nothing(tiny_bert_dir, tiny_csv, tmp_path, monkeypatch):
    from dpfed import data
    from dpfed.config import DataConfig

    monkeypatch.setenv("HOME", str(tmp_path))
    for value in ("off", "0", ""):
        monkeypatch.setenv("DPFED_CACHE", value)
        assert data.cache_dir() is None
    records = data.load_records(DataConfig(source=tiny_csv, text_column="sentence", label_column="sentiment"),
                                task="classification")
    data.tokenize(records, data.load_tokenizer(tiny_bert_dir), max_length=32)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.delenv("DPFED_CACHE")
    assert data.cache_dir() == tmp_path / ".cache" / "dpfed"


# -- the PEFT export and the README's examples -------------------------------------------------------------------------

def _readme() -> str:
    return (ROOT / "README.md").read_text()


def test_peft_export_names_a_loadable_base(finished_run, tiny_bert_dir):
    from transformers import AutoModel

    from dpfed.model import resolve_model_path

    peft = finished_run / "adapter" / "peft"
    name = json.loads((peft / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert name == tiny_bert_dir
    AutoModel.from_pretrained(resolve_model_path(name))
    card = (peft / "README.md").read_text()
    assert f"base_model: {tiny_bert_dir}" in card


def test_embedded_base_is_named_by_its_embedded_name(tiny_bert_dir, tmp_path):
    """The embedded model is exported as `embedded:all-minilm-l6-v2` (never the virtualenv's folder)."""
    from dpfed.adapters.export import export_adapters
    from dpfed.adapters.lorasb import inject_lorasb
    from dpfed.model import load_base, select_targets

    model = load_base(tiny_bert_dir, task="classification")
    adapters = inject_lorasb(model, select_targets(model, ("query",)), rank=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Could not find a config file")  # PEFT's hub look-up of the name
        export_adapters(model, adapters, tmp_path / "adapter", task="classification",
                        base_model="embedded:all-minilm-l6-v2")
    peft = tmp_path / "adapter" / "peft"
    assert json.loads((peft / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:all-minilm-l6-v2"
    card = (peft / "README.md").read_text()
    assert "base_model: embedded:all-minilm-l6-v2" in card
    assert ".venv" not in card and "site-packages" not in card and tiny_bert_dir not in card


def test_readme_peft_example_runs_as_written(tiny_bert_dir, tmp_path, run_cli, monkeypatch):
    """The README's "Bring your own data" command (tiny model, one round) and then its PEFT example verbatim,
    with `runs/reviews` pointing at that run: it loads the base that base_model_name_or_path names."""
    text = _readme()
    command = re.search(r"```bash\n(.*?)```", text[text.index("## Bring your own data"):], re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "runs" / "reviews")
    argv += ["--model", tiny_bert_dir, "--rounds", "1", "--local-steps", "1", "--format", "json"]
    monkeypatch.chdir(ROOT)
    code, _, err = run_cli(argv)
    assert code == 0, err
    section = text[text.index("The PEFT adapter loads with"):]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"runs/reviews/adapter/peft"' in example
    proc = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    predicted = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - the example prints a list literal
    assert len(predicted) == 2 and set(predicted) <= {"1", "2", "3", "4", "5"}


def test_readme_and_comm_show_the_same_labelled_ratios(run_cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli(["comm", "--model", "gemma-2-9b", "--rank", "fed-sb=200,32", "--clients", "25"])
    assert code == 0, err
    flora = next(line for line in out.splitlines() if "flora" in line and "fedex" not in line)
    assert "119.4×" in flora and "229.7×" in flora
    assert "bytes × fed-sb r=200 (round total)" in out and "paper count × fed-sb r=200" in out
    readme = " ".join(_readme().split())
    assert "**bytes × fed-sb (round total)** is 119.4×" in readme
    assert "**paper count × fed-sb** is 229.7×" in readme


def test_readme_states_the_epsilon_bound():
    from accounting.planning import MAX_EPSILON

    readme = " ".join(_readme().split())
    assert f"**ε is at most {MAX_EPSILON:g}**" in readme


# -- the causal-LM summary (dpfed/cli/train.py's owner applies the fix) ------------------------------------------------

def test_causal_lm_summary_shows_the_loss_before_training(tiny_llama_dir, tiny_csv, tmp_path, run_cli):
    code, out, err = run_cli(_train(tiny_llama_dir, tiny_csv, tmp_path / "run", "--task", "causal-lm"))
    assert code == 0, err
    assert "nan" not in out and "eval loss before federated training" in out


def test_raw_tqdm_bars_are_off_in_the_cli():
    """transformers de-quantises a GGUF model under a raw tqdm bar (not its own logging): the CLI turns tqdm off."""
    code = ("import sys\n{imp}from tqdm.auto import tqdm\n"
            "for _ in tqdm(range(3), desc='Converting and de-quantizing GGUF tensors'):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    bare = subprocess.run([sys.executable, "-c", code.format(imp="")], capture_output=True, text=True, env=env)
    assert "de-quantizing" in bare.stderr  # without the CLI the bar shows
    cli = subprocess.run([sys.executable, "-c", code.format(imp="import dpfed.cli\n")], capture_output=True, text=True,
                         env=env)
    assert cli.returncode == 0 and cli.stderr == ""
