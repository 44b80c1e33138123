"""The run options shared by ``train``, ``compare`` and ``flower-local`` (dpfed/cli/options.py, issue 13).

No training here: ``train`` stops at ``--print-config``; ``compare`` and ``flower-local`` stop where
the run would start, after their config is built.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from dpfed import config as cfgmod
from dpfed.cli import options
from dpfed.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DEMO = cfgmod.load(ROOT / "configs" / "demo.yaml")
NO_SLICE = "no public data declared, so no public slice; init.head 'public' -> 'random'"


def _stop(*args, **kwargs):
    raise ConfigError("stopped by the test")


def _resolved(command, run_cli, monkeypatch, tmp_path, *argv) -> tuple[cfgmod.RunConfig, str]:
    """The config ``command`` would run with ``argv``, and its stderr."""
    if command == "train":
        code, stdout, err = run_cli(["train", "--print-config", *argv])
        assert code == 0, err
        return cfgmod.from_dict(yaml.safe_load(stdout)), err
    if command == "compare":
        import dpfed.compare

        seen = []
        monkeypatch.setattr(dpfed.compare, "compare", lambda base, **kw: (seen.append(base), _stop())[1])
        code, _, err = run_cli(["compare", "--epsilon", "3", "--out", str(tmp_path / "o"), *argv])
        assert code == 2 and err.rstrip().endswith("error: stopped by the test"), err
        return seen[0], err
    pytest.importorskip("flwr", reason="the flower extra is not installed")
    import dpfed.flower.local

    monkeypatch.setattr(dpfed.flower.local, "LocalDeployment", _stop)
    monkeypatch.setattr(dpfed.flower.local, "bin_dir", lambda: None)
    code, _, err = run_cli(["flower-local", "--out", str(tmp_path / "o"), *argv])
    assert code == 2 and err.rstrip().endswith("error: stopped by the test"), err
    return cfgmod.load(tmp_path / "o" / "flower" / "dpfed-config.yaml"), err


COMMANDS = ("train", "compare", "flower-local")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_user_dataset_gets_no_public_slice(command, tiny_csv, run_cli, monkeypatch, tmp_path):
    cfg, err = _resolved(command, run_cli, monkeypatch, tmp_path, "--dataset", tiny_csv)
    assert cfg.data.source == str(Path(tiny_csv).resolve())  # stored absolute
    assert cfg.data.public_fraction == 0.0 and cfg.data.public_source is None and cfg.init.head == "random"
    assert f"--dataset {tiny_csv}: {NO_SLICE}" in err


@pytest.mark.parametrize("command", COMMANDS)
def test_the_config_dataset_keeps_its_public_slice(command, run_cli, monkeypatch, tmp_path):
    cfg, err = _resolved(command, run_cli, monkeypatch, tmp_path, "--dataset", DEMO.data.source)
    assert cfg.data.public_fraction == 0.08 and cfg.init.head == "public"
    assert "no public slice" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_declared_public_fraction_or_file_keeps_the_public_head(command, tiny_csv, run_cli, monkeypatch, tmp_path):
    cfg, err = _resolved(command, run_cli, monkeypatch, tmp_path, "--dataset", tiny_csv, "--public-fraction", "0.1")
    assert cfg.data.public_fraction == 0.1 and cfg.init.head == "public" and "no public slice" not in err
    public = tmp_path / "public.csv"
    with public.open("w", newline="") as fh:
        csv.writer(fh).writerows([["sentence", "sentiment"], ["good film", "pos"]])
    cfg, err = _resolved(command, run_cli, monkeypatch, tmp_path / "b", "--dataset", tiny_csv,
                         "--public-data", str(public))
    assert cfg.data.public_fraction == 0.0 and cfg.data.public_source == str(public.resolve())
    assert cfg.init.head == "public" and "no public slice" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_missing_dataset_path_is_one_line_before_anything_is_written(command, run_cli, tmp_path):
    argv = {"train": [], "compare": ["--epsilon", "3"], "flower-local": []}[command]
    code, _, err = run_cli([command, "--dataset", "nope/data.csv", "--out", str(tmp_path / "o"), *argv])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "error: data.source must be an existing file (a path is never looked up on the Hugging Face hub), " \
           "got 'nope/data.csv'" in err
    assert not (tmp_path / "o").exists()


def test_compare_refuses_a_missing_config(run_cli, tmp_path):
    code, _, err = run_cli(["compare", "--epsilon", "3", "--config", str(tmp_path / "none.yaml"),
                            "--out", str(tmp_path / "o")])
    assert code == 2 and "error: config must be a readable YAML file, got missing path" in err


def test_run_config_maps_each_option_to_its_field():
    cfg, notes = options.run_config(
        DEMO, epsilon=1.5, delta=1e-6, labels=" fresh, rotten ,", target_modules="query,value", clients=4,
        drop_invalid=True, no_dp=True, lora_alpha=16.0, privacy_unit="both", client_clip=0.5, canaries=10, seed=7)
    assert notes == []
    assert (cfg.privacy.epsilon, cfg.privacy.delta, cfg.privacy.enabled, cfg.privacy.unit, cfg.privacy.client_clip) \
        == (1.5, 1e-6, False, "both", 0.5)
    assert cfg.data.labels == ("fresh", "rotten") and cfg.model.target_modules == ("query", "value")
    assert (cfg.data.num_clients, cfg.data.drop_invalid, cfg.data.canaries, cfg.model.lora_alpha, cfg.seed) \
        == (4, True, 10, 16.0, 7)
    assert options.run_config(DEMO) == (DEMO, [])  # nothing given: the base config as it is


def test_a_given_init_is_kept_and_an_unset_public_init_switches(tiny_csv):
    base = cfgmod.override(DEMO, **{"init.strategy": "public"})
    cfg, notes = options.run_config(base, dataset=tiny_csv)
    assert cfg.init.strategy == "random" and "init.head and init.strategy 'public' -> 'random'" in notes[0]
    cfg, notes = options.run_config(base, dataset=tiny_csv, init="public")
    assert cfg.init.strategy == "public" and "init.head 'public' -> 'random' (" in notes[0]


@pytest.mark.parametrize("argv, refused", [
    (["--epsilon", "3"], "--epsilon"),
    (["-c", "x.yaml", "--no-dp", "--rounds", "2"], "--config, --rounds, --no-dp"),
    (["--drop-invalid", "--print-config", "--dataset", "d.csv"], "--dataset, --drop-invalid, --print-config"),
    (["--out", "o", "--canaries", "5"], "--canaries, --out"),
])
def test_resume_refuses_every_other_option(argv, refused, run_cli, tmp_path):
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--device", "cpu", *argv])
    assert code == 2
    assert err.strip() == f"error: --resume continues a run with its recorded config; got other options: {refused}"


def test_resume_accepts_device_format_and_ledger_key(run_cli, tmp_path):
    from accounting.ledger import new_key_file

    new_key_file(tmp_path / "key")
    code, _, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--device", "cpu", "--format", "json",
                            "--ledger-key", str(tmp_path / "key")])
    assert code == 2 and err.strip() == f"error: --resume must name an existing run directory, got '{tmp_path / 'run'}'"


def _params() -> dict[str, dict[str, object]]:
    """Every command's options: {command: {flag: click parameter}}."""
    import typer

    from dpfed.cli import _register, app

    _register()
    group = typer.main.get_command(app)
    return {name: {p.opts[0]: p for p in group.commands[name].params if p.opts[0].startswith("--")}
            for name in COMMANDS}


# the options a command declares itself, on purpose: a different type, default or set of values
OWN = {("compare", "--epsilon"), ("compare", "--seed"), ("compare", "--no-dp"), ("compare", "--config"),
       ("compare", "--out"), ("flower-local", "--init"), ("flower-local", "--resume")}


def test_a_shared_option_reads_the_same_in_every_command():
    params = _params()
    flags = {f for command in params.values() for f in command}
    for flag in sorted(flags):
        shared = [(c, params[c][flag]) for c in COMMANDS if flag in params[c] and (c, flag) not in OWN]
        if len(shared) < 2:
            continue
        first = shared[0][1]
        for command, p in shared[1:]:
            assert (p.help, p.type.name, p.default, p.is_flag) == (first.help, first.type.name, first.default, first.is_flag), \
                f"{flag} of {command} differs from {shared[0][0]}'s"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_renders(command, run_cli):
    code, stdout, _ = run_cli([command, "--help"])
    assert code == 0 and "--dataset" in stdout and "--public-fraction" in stdout
