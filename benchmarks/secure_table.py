"""Local DP vs distributed DP (secure aggregation) vs central DP-SGD vs non-private, side by side (issue 16).

Every row gets the same number T of DP-SGD steps per record's site, the same expected batch b per
site and step, the same seed and data: local = T / K rounds of K local steps (each site adds the
full noise); secure = T rounds of one FedSGD step summed by secure aggregation (Skellam shares);
central = T steps over the pooled records (one site holding them all, expected batch b · sites,
the same sampling rate) — the reference no deployment gets; non-private = local without DP.

    python -m benchmarks.secure_table --config benchmarks/configs/secure-headroom.yaml --steps 16 --epsilons 3,1

Runs ``dpfed train`` once per row (a fresh process, as a user would) and prints a markdown table
with accuracy, eval loss, ε (sum / colluding server), noise, bytes per site per round and wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path


def _train(out: Path, config: Path, seed: int, *args: str) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("dpfed")), "train", "-c", str(config), "--seed", str(seed), "--device", "cpu",
           "--format", "json", "--out", str(out), *args]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["_wall"] = time.time() - t0
    print(f"  {out.name}: {summary['_wall']:.0f} s", file=sys.stderr)
    return summary


def _row(eps: str, name: str, s: dict) -> str:
    sa = s.get("secure_aggregation")
    if sa:
        noise = (f"Skellam μ_site {sa['mu_site']:.4g} (σ-equiv. of share {math.sqrt(sa['mu_site']) / sa['l2_sensitivity']:.3f}; "
                 f"of sum {sa['noise_multiplier_equivalent']:.3f})")
    else:
        noise = "none" if s["noise_multiplier"] is None else f"σ = {s['noise_multiplier']:.3f}"
    spent = "—" if s["epsilon_spent"] is None else f"{s['epsilon_spent']:.3f}"
    coll = s.get("epsilon_colluding_server")
    ev = s["initial_eval"]
    return (f"| {eps} | {name} | {ev['accuracy']:.4f} → **{s['accuracy']:.4f}** | {ev['eval_loss']:.4f} → "
            f"**{s['eval_loss']:.4f}** | {spent} | {'—' if coll is None else f'{coll:.2f}'} | {noise} | "
            f"{s['bytes_up_per_client_round']} | {s['wall_seconds']:.0f} s |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("benchmarks/configs/secure-headroom.yaml"))
    ap.add_argument("--steps", type=int, default=16, help="DP-SGD steps T per record's site (a multiple of --local-steps)")
    ap.add_argument("--local-steps", type=int, default=4, help="K of the local row")
    ap.add_argument("--batch-size", type=int, default=128, help="expected batch b per site and step")
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--epsilons", default="3,1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/secure-table"))
    a = ap.parse_args(argv)
    if a.steps < 1 or a.steps % a.local_steps:
        raise SystemExit(f"--steps must be a positive multiple of --local-steps ({a.local_steps}), got {a.steps}")
    b, T, K = str(a.batch_size), a.steps, a.local_steps
    rows = []
    for e in a.epsilons.split(","):
        common = (a.config, a.seed, "--epsilon", e)
        rows.append(_row(e, "local", _train(a.out / f"local-e{e}", *common, "--batch-size", b, "--rounds",
                                            str(T // K), "--local-steps", str(K))))
        rows.append(_row(e, "secure", _train(a.out / f"secure-e{e}", *common, "--batch-size", b, "--rounds", str(T),
                                             "--local-steps", "1", "--aggregation", "secure")))
        rows.append(_row(e, "central (pooled, 1 site)", _train(
            a.out / f"central-e{e}", *common, "--clients", "1", "--batch-size", str(a.batch_size * a.sites),
            "--rounds", str(T), "--local-steps", "1")))
    rows.append(_row("∞", "non-private (local, --no-dp)", _train(
        a.out / "nodp", a.config, a.seed, "--no-dp", "--batch-size", b, "--rounds", str(T // K), "--local-steps", str(K))))
    print(f"T = {T} DP-SGD steps per record's site, b = {a.batch_size}, seed {a.seed}, config {a.config}")
    print("| ε | aggregation | accuracy (before → after) | eval loss (before → after) | ε spent (sum) | "
          "ε colluding server | noise per site | bytes up per site per round | wall (training) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
