"""What each side of a Flower run decides, read from Flower's flat key/value configs.

A site's settings come from its SuperNode's ``--node-config``: only the site controls them
(where its data and its ledger live, its privacy budget, its noise seed). The server's come
from the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden by ``flwr run
--run-config``). Every rule violation raises :class:`~dpfed.errors.ConfigError` naming the
key, the rule and the value. Nothing here imports ``flwr``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfed.config import RunConfig
from dpfed.errors import ConfigError

# node-config keys a site understands (README "Multiple sites (Flower)")
NODE_KEYS = {
    "partition-id": "demo data: this site's shard index of the run's own partition (0-based)",
    "num-partitions": "demo data: number of shards; must equal the run's data.num_clients",
    "data-path": "the site's own csv/tsv/json/jsonl file (instead of partition-id)",
    "site-id": "the client id in the site's ledger (default client-NNN from partition-id)",
    "ledger": "path of the site's privacy ledger (default dpfed-site/<site-id>/ledger.jsonl)",
    "epsilon": "the site's own record-level epsilon budget (default: the run config's)",
    "delta": "the site's own delta (default: the run config's)",
    "seed": "seed of the site's sampling and noise (default: OS entropy; knowing it removes the noise)",
    "noise-multiplier": "the site's own sigma (default: the one the server planned)",
    "model": "local path of the base model when it differs from the run config's model.name",
    "device": "cpu | cuda | cuda:N | auto (default: the run config's)",
}

# run-config keys of the ServerApp (pyproject.toml [tool.flwr.app.config])
RUN_KEYS = {
    "config": "dpfed YAML run config on the server ('' = the built-in demo config)",
    "out-dir": "run directory on the server ('' = runs/flower-<time>)",
    "sites": "sites to wait for before round 1 (0 = data.num_clients)",
    "min-sites": "a round completes when at least this many sites answered validly",
    "round-timeout": "seconds to wait for the replies of one round",
    "wait-timeout": "seconds to wait for the sites to connect",
    "rounds": "override train.rounds (0 = keep the config's)",
    "epsilon": "override privacy.epsilon (0 = keep the config's)",
    "seed": "override the run seed (-1 = keep the config's)",
    "resume": "continue the run in out-dir from its last checkpoint (the sites keep their ledgers)",
    "stop-after": "end this session after this round, leaving the run resumable (0 = run every round)",
}
RUN_DEFAULTS = {"config": "", "out-dir": "", "sites": 0, "min-sites": 1, "round-timeout": 600.0,
                "wait-timeout": 120.0, "rounds": 0, "epsilon": 0.0, "seed": -1,
                "resume": False, "stop-after": 0}


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pos(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def _epsilon(value: Any) -> float:
    """A site's own budget: finite, > 0 and within the range dpfed plans and trains for (as on the CLI)."""
    from accounting.planning import epsilon_range_problem

    eps = _pos("epsilon", value)
    if (problem := epsilon_range_problem(eps)) is not None:
        raise ConfigError(f"epsilon {problem}, got {eps!r}")
    return eps


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value.strip()


def _unknown(where: str, given: Mapping[str, Any], known: Mapping[str, str]) -> None:
    extra = sorted(set(given) - set(known))
    if extra:
        raise ConfigError(f"{where} has unknown key '{extra[0]}' (known: {', '.join(sorted(known))})")


@dataclass(frozen=True)
class SiteSettings:
    """A site's own choices (its SuperNode's node config)."""

    site_id: str
    ledger: Path
    partition_id: int | None = None
    num_partitions: int | None = None
    data_path: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    seed: int | None = None
    noise_multiplier: float | None = None
    model: str | None = None
    device: str | None = None

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any], *, base_dir: Path | None = None) -> SiteSettings:
        """Validate a node config; relative paths resolve against ``base_dir`` (default: cwd)."""
        node = dict(node)
        _unknown("node config", node, NODE_KEYS)
        base = Path.cwd() if base_dir is None else base_dir
        pid = node.get("partition-id")
        data_path = node.get("data-path")
        if (pid is None) == (data_path is None):
            raise ConfigError("node config must set exactly one of partition-id (demo data) or data-path (the "
                              f"site's own file), got partition-id={pid!r}, data-path={data_path!r}")
        num = None
        if pid is not None:
            pid = _int("partition-id", pid, 0)
            num = _int("num-partitions", node.get("num-partitions"), 1)
            if pid >= num:
                raise ConfigError(f"partition-id must be < num-partitions = {num}, got {pid}")
        else:
            path = Path(_str("data-path", data_path)).expanduser()
            data_path = str(path if path.is_absolute() else base / path)
            if "site-id" not in node:
                raise ConfigError("site-id must be set with data-path (it names the site in its ledger), got none")
        site_id = _str("site-id", node["site-id"]) if "site-id" in node else f"client-{pid:03d}"
        ledger = Path(_str("ledger", node["ledger"])).expanduser() if "ledger" in node else Path("dpfed-site") / site_id / "ledger.jsonl"
        delta = node.get("delta")
        if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
        device = node.get("device")
        if device is not None and not (device in ("auto", "cpu", "cuda") or str(device).startswith("cuda:")):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        return cls(
            site_id=site_id, ledger=ledger if ledger.is_absolute() else base / ledger,
            partition_id=pid, num_partitions=num, data_path=data_path,
            epsilon=_epsilon(node["epsilon"]) if "epsilon" in node else None,
            delta=None if delta is None else float(delta),
            seed=_int("seed", node["seed"], 0) if "seed" in node else None,
            noise_multiplier=_pos("noise-multiplier", node["noise-multiplier"]) if "noise-multiplier" in node else None,
            model=_str("model", node["model"]) if "model" in node else None,
            device=device,
        )

    @property
    def index(self) -> int:
        """The site's index in its per-round seed path (the partition id; 0 for a site's own data)."""
        return self.partition_id or 0


def default_config_path() -> Path | None:
    """``configs/demo.yaml`` next to the package (a source checkout or the app bundle), if present."""
    path = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    return path if path.is_file() else None


@dataclass(frozen=True)
class ServerSettings:
    """The ServerApp's run config."""

    config: Path | None
    out_dir: Path
    sites: int
    min_sites: int
    round_timeout: float
    wait_timeout: float
    rounds: int
    epsilon: float
    seed: int
    resume: bool = False
    stop_after: int = 0

    @classmethod
    def from_run_config(cls, run: Mapping[str, Any]) -> ServerSettings:
        run = {**RUN_DEFAULTS, **run}
        _unknown("run config", run, RUN_KEYS)
        config = run["config"]
        if not isinstance(config, str):
            raise ConfigError(f"config must be a path string ('' for the built-in demo), got {config!r}")
        out = run["out-dir"]
        if not isinstance(out, str):
            raise ConfigError(f"out-dir must be a path string ('' for runs/flower-<time>), got {out!r}")
        epsilon = run["epsilon"]
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon < 0:
            raise ConfigError(f"epsilon must be a finite number >= 0 (0 keeps the config's), got {epsilon!r}")
        if epsilon > 0:
            _epsilon(epsilon)
        resume = run["resume"]
        if not isinstance(resume, bool):
            raise ConfigError(f"resume must be true or false, got {resume!r}")
        if resume and not out.strip():
            raise ConfigError("out-dir must name the run directory to continue when resume is true, got ''")
        if resume and any(run[k] != RUN_DEFAULTS[k] for k in ("config", "rounds", "epsilon", "seed")):
            changed = next(k for k in ("config", "rounds", "epsilon", "seed") if run[k] != RUN_DEFAULTS[k])
            raise ConfigError(f"{changed} must be left unset when resume is true (the run continues with the "
                              f"config.yaml in out-dir), got {run[changed]!r}")
        path = Path(config.strip()).expanduser() if config.strip() else default_config_path()
        if path is not None and not path.is_absolute() and not path.exists():
            bundled = Path(__file__).resolve().parents[2] / path  # e.g. configs/demo.yaml inside the app bundle
            path = bundled if bundled.is_file() else path
        return cls(
            config=path,
            out_dir=Path(out).expanduser() if out.strip() else Path("runs") / time.strftime("flower-%Y%m%d-%H%M%S"),
            sites=_int("sites", run["sites"], 0),
            min_sites=_int("min-sites", run["min-sites"], 1),
            round_timeout=_pos("round-timeout", run["round-timeout"]),
            wait_timeout=_pos("wait-timeout", run["wait-timeout"]),
            rounds=_int("rounds", run["rounds"], 0),
            epsilon=float(epsilon),
            seed=_int("seed", run["seed"], -1),
            resume=resume,
            stop_after=_int("stop-after", run["stop-after"], 0),
        )

    def run_config(self) -> RunConfig:
        """The dpfed run config: the YAML file (or the defaults) with this run config's overrides."""
        from dpfed import config as cfgmod

        cfg = cfgmod.load(self.config) if self.config is not None else cfgmod.RunConfig()
        return cfgmod.override(cfg, **{"train.rounds": self.rounds or None, "privacy.epsilon": self.epsilon or None,
                                        "seed": None if self.seed < 0 else self.seed})


def check_supported(cfg: RunConfig) -> None:
    """The rules a Flower run adds to a valid :class:`RunConfig` (what the app implements)."""
    if cfg.privacy.aggregation == "secure" and cfg.privacy.record_level and cfg.sites_per_round() < 2:
        raise ConfigError(f"sites per round must be >= 2 for privacy.aggregation 'secure' on Flower (SecAgg+ sums "
                          f"two or more sites), got {cfg.sites_per_round()}")
    if cfg.data.canaries and cfg.data.canary_kind != "gradient":
        raise ConfigError(f"canary_kind must be 'gradient' in a Flower run (random-word canaries are planted in "
                          f"process only), got {cfg.data.canary_kind!r}")
