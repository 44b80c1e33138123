"""The DP-step benchmark runs end to end on the CPU (minimal shapes, no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_cpu_path_runs_all_methods(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "benchmarks.dp_step", "--device", "cpu", "--model", "micro-llama",
           "--shapes", "2x8", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = {r["method"]: r for r in report["results"]}
    assert sorted(results) == ["a", "b", "c", "d", "e"]
    for r in results.values():
        assert r["error"] is None, r
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 1
        assert r["saved_bytes"] > 0 and r["adapter_bytes"] > 0
    assert set(results["a"]["phases_ms"]) >= {"per-sample fwd+bwd", "clip+sum", "noise", "apply+sgd"}
    ratios = report["ratios"]["2x8"]
    for key in ("time_a_over_b", "time_a_over_d", "time_a_over_e", "saved_a_over_b"):
        assert ratios[key] is not None and ratios[key] > 0
    assert "time a/b" in proc.stdout  # the table was printed


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_baselines_are_private_and_train():
    """d gets per-sample gradients for every LoRA parameter; e runs ghost clipping; both move the adapter."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from benchmarks import dp_step
    from dpfed.privacy import per_example_loss

    with torch.random.fork_rng(devices=[]):  # build_template seeds torch's global RNG
        s, _ = dp_step.build_settings(["--device", "cpu", "--model", "micro-llama", "--shapes", "2x8"])
        template = dp_step.build_template(s.model, max_len=8, device=s.device, dtype=s.base_dtype, seed=0)
        batches = dp_step.make_batches(2, 8, vocab=s.model.vocab, count=1, device=s.device, seed=1)
        for method, kind in (("d", GradSampleModule), ("e", GradSampleModuleFastGradientClipping)):
            step, model = dp_step.setup(method, template, batches, s)
            assert isinstance(model, kind)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            assert trainable and all(("lora_" in n) for n in trainable)
            if method == "d":
                per_example_loss(model, batches[0], task="causal-lm").mean().backward()
                assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 2 for p in trainable.values())
                model.zero_grad(set_to_none=True)
            before = {n: p.detach().clone() for n, p in trainable.items()}
            step(batches[0])
            assert all(not torch.equal(before[n], p) for n, p in trainable.items()), method


@pytest.mark.parametrize("text,ok", [("16x256,64x128", True), ("8x", False), ("0x8", False)])
def test_parse_shapes(text, ok):
    from benchmarks.dp_step import parse_shapes

    if ok:
        assert parse_shapes(text) == [(16, 256), (64, 128)]
    else:
        with pytest.raises(SystemExit):
            parse_shapes(text)
