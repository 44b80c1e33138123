"""The release boundary's rules, and the fixes found in review (issue: every byte that leaves a site is accounted)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from accounting.sampling import GRID, exact_rate, sample_rate
from dpfed.privacy import make_generator, poisson_sample
from dpfed.release import CHANNELS, Basis, ReleaseError, release, write_site_local

README = Path(__file__).resolve().parents[2] / "README.md"


def test_undeclared_and_site_local_fields_cannot_be_released():
    with pytest.raises(ReleaseError, match="'loss_of_site_3' is not declared"):
        release("metrics", {"round": 1, "loss_of_site_3": 0.1}, unit="record")
    with pytest.raises(ReleaseError, match="site-local"):
        release("metrics", {"round": 1, "train_loss": 0.1}, unit="record")
    with pytest.raises(ReleaseError, match="site-local"):
        release("site_reply", {"sampled": 3}, unit="record")


def test_client_level_withholds_what_undoes_client_sampling():
    line = {"round": 2, "clients": ["client-001"], "bytes_up": 9000, "bytes_up_per_site": 4500,
            "aggregation_error": 1e-8, "accuracy": 0.7}
    assert release("metrics", line, unit="record") == line
    for unit in ("client", "both"):
        assert release("metrics", line, unit=unit) == {"round": 2, "bytes_up_per_site": 4500, "accuracy": 0.7}


def test_site_local_file_is_private(tmp_path):
    path = tmp_path / "site" / "diag.jsonl"
    write_site_local(path, {"mean_loss": 0.3})
    write_site_local(path, {"mean_loss": 0.2})
    assert (path.stat().st_mode & 0o777) == 0o600 and (path.parent.stat().st_mode & 0o777) == 0o700
    assert len(path.read_text().splitlines()) == 2


def test_readme_privacy_model_lists_every_released_field():
    """A field added to a channel must be explained in the README's table of what leaves a site."""
    text = README.read_text()
    start = text.index("### Every field that leaves a site")
    section = text[start:text.index("\n## ", start)]
    listed = set(re.findall(r"`([a-z_0-9]+)`", section))
    missing = [f"{ch}.{name}" for ch, fields in CHANNELS.items() for name in fields if name not in listed]
    assert not missing, f"README lacks: {missing}"
    assert {b.value for b in Basis} <= set(re.findall(r"\*\*([a-z-]+)\*\*", section))


# -- sampling: the recorded q is the inclusion probability ----------------------------------------
@pytest.mark.parametrize("b, n", [(256, 981), (16, 114), (1, 3), (7, 7), (300, 200)])
def test_sample_rate_is_on_the_draw_grid_and_never_below_b_over_n(b, n):
    q = sample_rate(b, n)
    assert q >= min(1.0, b / n) and q - min(1.0, b / n) <= 1.2e-16
    assert (q * GRID).is_integer()
    assert exact_rate(q) == q


def test_poisson_sample_draws_float64_uniforms():
    """The inclusion rule is u < q with u float64 on the 2**-53 grid (a float32 draw overshoots q by up to 6e-8)."""
    q = sample_rate(5, 37)
    idx = poisson_sample(4000, q, generator=make_generator(123))
    u = torch.rand(4000, generator=make_generator(123), dtype=torch.float64)
    assert torch.equal(idx, torch.nonzero(u < q).flatten())
    assert torch.all(u * GRID == torch.floor(u * GRID))  # k / 2**53


def test_client_records_the_rate_it_samples(tiny_bert_dir, tiny_csv, tmp_path):
    from accounting.ledger import Ledger
    from dpfed import config as cfgmod
    from dpfed.runner import make_clients, prepare

    cfg = cfgmod.from_dict({
        "model": {"name": tiny_bert_dir, "rank": 4, "max_length": 32},
        "data": {"source": tiny_csv, "text_column": "sentence", "label_column": "sentiment", "num_clients": 3,
                 "public_fraction": 0.0},
        "init": {"strategy": "random", "head": "random"},
        "train": {"rounds": 1, "local_steps": 1, "batch_size": 16},
        "privacy": {"epsilon": 3.0, "delta": 1e-4}, "seed": 0, "device": "cpu"})
    job = prepare(cfg)
    for c in make_clients(job, ledger=Ledger(tmp_path / "l.jsonl"), seed=0):
        assert c.round_events()[0].sample_rate == sample_rate(16, c.num_examples) == c.sample_rate


def test_both_units_with_dp_init_are_refused(run_cli, tiny_bert_dir, tiny_csv, tmp_path):
    """init: dp is record-level only; under 'both' its client-level cost would be missing from the server ledger."""
    code, _, err = run_cli(["train", "--model", tiny_bert_dir, "--dataset", tiny_csv, "--text-column", "sentence",
                            "--label-column", "sentiment", "--clients", "3", "--init", "dp", "--privacy-unit", "both",
                            "--client-epsilon", "5", "--delta", "1e-4", "--out", str(tmp_path / "o")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "init 'dp'" in err and "not per client" in err
    assert not (tmp_path / "o").exists()
