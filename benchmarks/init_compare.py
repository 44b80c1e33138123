"""Accuracy at the same total ε with ``init: public``, ``dp`` and ``random`` on a run config.

    python -m benchmarks.init_compare [--config configs/demo.yaml] [--init-lr 1e-4] [--out runs/init-compare]

Each strategy trains once from the same config and seed (same split, same sampling and noise
seeds); only the initialisation differs. For ``dp`` the initialisation's event is in every
client's ledger and the training σ is calibrated so that init + training end at the same ε.
Prints one line per strategy and writes ``OUT/init_compare.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from dpfed import config as cfgmod
    from dpfed.runner import prepare, run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    ap.add_argument("--init-lr", type=float, default=1e-4, help="init.lr of the gradient-sign estimates (public, dp)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategies", default="random,public,dp")
    ap.add_argument("--out", type=Path, default=Path("runs") / time.strftime("init-compare-%Y%m%d-%H%M%S"))
    args = ap.parse_args(argv)
    base = cfgmod.override(cfgmod.load(args.config), **{"seed": args.seed, "init.lr": args.init_lr})
    args.out.mkdir(parents=True, exist_ok=False)
    rows = []
    for strategy in args.strategies.split(","):
        cfg = cfgmod.override(base, **{"init.strategy": strategy})
        t0 = time.time()
        summary = run(prepare(cfg), args.out / strategy)
        row = {"init": strategy, "accuracy_before": summary["initial_eval"].get("accuracy"),
               "accuracy": summary["accuracy"], "epsilon_spent": summary["epsilon_spent"],
               "epsilon_target": summary["epsilon_target"], "noise_multiplier": summary["noise_multiplier"],
               "dp_init_epsilon_alone": summary["init_info"].get("dp_init_epsilon_alone"),
               "dp_init_bytes_up_per_client": summary["init_info"].get("dp_init_bytes_up_per_client"),
               "seconds": time.time() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (args.out / "init_compare.json").write_text(json.dumps({"config": str(args.config), "seed": args.seed,
                                                            "init_lr": args.init_lr, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
