"""The Flower ``ServerApp``: the round loop of :func:`dpfed.runner.run`, with the sites on the other side of a SuperLink.

The server prepares the job as ``dpfed train`` does (config, split seed, model, B/A and head
initialisation, σ planned from the sites' sizes), meets the sites (handshake: each receives
the frozen B and A once and announces its id and size), then runs the rounds with
:class:`~dpfed.flower.strategy.FedSBStrategy` and writes the run directory ``dpfed train``
writes: ``config.yaml``, ``budget.json``, ``run.json``, ``initial_state.safetensors``,
``checkpoint.safetensors``/``.json``, ``metrics.jsonl``, ``summary.json``, ``adapter/``, plus
``rounds/round-NNN.safetensors`` (the global state after each round). The authoritative
privacy ledgers stay with the sites; ``ledger.jsonl`` here holds the events the sites
reported with their accepted replies, so ``dpfed budget`` works on the server's copy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from dpfed.flower import records as rec
from dpfed.flower.settings import ServerSettings, check_supported
from dpfed.flower.strategy import FedSBStrategy, SiteInfo, reply_node
from dpfed.payload import Manifest
from dpfed.privacy import sample_rate
from dpfed.release import release, unit_of

log = logging.getLogger(__name__)

app = ServerApp()

ERROR_FILE = "error.txt"  # one line, for the local launcher, when the run stops on an input error
REPORTED_NOTE = "reported by the site with its reply (the site's own ledger is authoritative)"
_RUN_FILES = ("config.yaml", "summary.json", "checkpoint.safetensors", "metrics.jsonl", "ledger.jsonl")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from accounting.errors import AccountingError
    from dpfed.errors import DpfedError

    settings = ServerSettings.from_run_config(context.run_config)
    try:
        serve(grid, settings)
    except (DpfedError, AccountingError) as exc:
        log.error("error: %s", exc)
        try:
            settings.out_dir.mkdir(parents=True, exist_ok=True)
            (settings.out_dir / ERROR_FILE).write_text(f"{exc}\n")
        except OSError:
            pass
        raise


def _noop(kind: str, info: dict[str, Any]) -> None:
    return None


def serve(grid: Grid, settings: ServerSettings, *, progress=_noop) -> dict[str, Any]:
    """Run the whole federated job over ``grid``; write the run directory; return the summary."""
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.errors import ConfigError
    from dpfed.runner import prepare

    cfg = settings.run_config()
    check_supported(cfg)
    run_dir = settings.out_dir.resolve()
    if run_dir.exists() and (not run_dir.is_dir() or any((run_dir / f).exists() for f in _RUN_FILES)):
        raise ConfigError(f"out-dir must be a new directory or hold no run files, got '{run_dir}'")
    progress("setup", {"stage": "prepare"})
    job = prepare(cfg)
    frozen = job.method.frozen_state()
    label_names = tuple(job.splits.test.label_names)
    global_state = trainable_state(job.model)
    strategy = FedSBStrategy(method=job.method, manifest=Manifest.of(global_state), seed=job.seed,
                             client_fraction=cfg.train.client_fraction, min_sites=settings.min_sites, dp=job.dp)
    meet = _Handshake(grid, strategy, cfg=cfg, split_seed=job.split_seed, label_names=label_names, frozen=frozen,
                      timeout=settings.round_timeout)
    expected = settings.sites or cfg.data.num_clients
    progress("setup", {"stage": "sites", "expected": expected})
    _wait_for_nodes(grid, expected, settings.wait_timeout)
    meet.new_nodes()
    if len(strategy.roster) < settings.min_sites:
        raise ConfigError(f"min-sites must be <= the sites that joined within {settings.wait_timeout:g} s "
                          f"({len(strategy.roster)}: {meet.refusals or 'no refusals'}), got {settings.min_sites}")
    sizes = [s.num_examples for s in strategy.sites()]
    if job.dp and cfg.privacy.noise_multiplier is None and sorted(sizes) != sorted(len(s) for s in job.shards):
        from dpfed.runner import calibrate

        job.noise_multiplier = calibrate(cfg, sizes)  # plan σ for the sites' own sizes
    return _run(job, run_dir, grid, strategy, meet, settings, global_state, progress)


def _wait_for_nodes(grid: Grid, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(set(grid.get_node_ids())) < expected and time.monotonic() < deadline:
        time.sleep(0.5)


class _Handshake:
    """Meets each new node once: sends the run config and the frozen factors, reads the site's id and size."""

    def __init__(self, grid: Grid, strategy: FedSBStrategy, *, cfg, split_seed: int, label_names: tuple[str, ...],
                 frozen, timeout: float) -> None:
        from dpfed import config as cfgmod

        self.grid, self.strategy, self.timeout = grid, strategy, timeout
        self.cfg_yaml = cfgmod.to_yaml(cfg)
        self.split_seed, self.label_names = split_seed, label_names
        self.frozen = rec.to_record(frozen)
        self.frozen_sha256 = rec.digest(frozen)
        self.seen: set[int] = set()
        self.refusals: list[str] = []

    def record(self, server_round: int, noise_multiplier: float | None):
        return rec.run_record(server_round=server_round, cfg_yaml=self.cfg_yaml, split_seed=self.split_seed,
                              label_names=self.label_names, noise_multiplier=noise_multiplier,
                              frozen_sha256=self.frozen_sha256)

    def new_nodes(self) -> None:
        """Handshake with every connected node not met yet; a node that errs or clashes is retried next time."""
        live = set(self.grid.get_node_ids())
        nodes = sorted(live - self.seen)
        if not nodes:
            return
        content = RecordDict({rec.CONFIG: self.record(0, None), rec.FROZEN: self.frozen})
        msgs = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY, group_id="handshake")
                for n in nodes]
        news: list[str] = []
        for reply in self.grid.send_and_receive(msgs, timeout=self.timeout):
            node = reply_node(reply, msgs)
            if reply.has_error():
                news.append(f"node {node} failed: {reply.error.reason}")
                continue
            self.seen.add(node)
            if rec.REFUSAL in reply.content:
                r = reply.content.config_records[rec.REFUSAL]
                news.append(f"{r.get('site-id')} refused: {r.get('reason')}")
                continue
            try:
                site = reply.content.config_records[rec.SITE]
                info = SiteInfo(node, str(site["site-id"]), int(site["num-examples"]))
            except (KeyError, TypeError, ValueError):
                news.append(f"node {node}: malformed handshake reply")
                continue
            old = next((s for s in self.strategy.roster.values() if s.site_id == info.site_id), None)
            if old is not None and old.node_id in live:
                self.seen.discard(node)  # two live nodes claim one site: ask again once one of them is gone
                news.append(f"node {node} refused: site-id {info.site_id!r} is already held by node {old.node_id}")
                continue
            if old is not None:  # the site came back on a new node
                del self.strategy.roster[old.node_id]
            self.strategy.roster[node] = info
        for r in news:
            log.warning("handshake: %s", r)
        self.refusals.extend(news)


def _run(job, run_dir: Path, grid: Grid, strategy: FedSBStrategy, meet: _Handshake, settings: ServerSettings,
         global_state, progress) -> dict[str, Any]:
    from accounting.ledger import Ledger
    from accounting.prv import epsilon as prv_epsilon
    from dpfed import config as cfgmod
    from dpfed.adapters.lorasb import load_trainable_state
    from dpfed.payload import KIND_DOWN, KIND_UP, encode
    from dpfed.runner import (LEDGER, RUN_JSON, build_summary, checkpoint_meta, evaluate, save_checkpoint, save_state,
                              sha256_hex, write_json)

    cfg = job.cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    config_text = cfgmod.to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_text)
    if job.dp:
        write_json(run_dir / "budget.json", {"accountant": "prv", "epsilon": cfg.privacy.epsilon,
                                              "delta": cfg.privacy.delta, "privacy_unit": "record"})
    ledger = Ledger(run_dir / LEDGER)
    save_state(run_dir / "initial_state.safetensors", global_state)

    def evaluate_global() -> dict[str, float]:
        return evaluate(job.model, job.test, task=cfg.model.task, device=job.device,
                        batch_size=cfg.train.eval_batch_size, autocast_dtype=job.autocast_dtype)

    eval0 = evaluate_global()
    write_json(run_dir / RUN_JSON, {
        "config_sha256": sha256_hex(config_text.encode()), "split_seed": job.split_seed,
        "seed": job.seed if job.seed_is_user else None, "noise_multiplier": job.noise_multiplier,
        "client_noise_multiplier": None, "init_info": job.init_info, "initial_eval": eval0,
        "flower": {"sites": {s.site_id: s.num_examples for s in strategy.sites()}, "min_sites": settings.min_sites},
    })
    save_checkpoint(run_dir, round=0, global_state=global_state, frozen=job.method.frozen_state(),
                    meta=checkpoint_meta(run_dir, ledger, None))
    (run_dir / "rounds").mkdir(exist_ok=True)
    manifest = Manifest.of(global_state)
    metrics_path = run_dir / "metrics.jsonl"
    t_start = time.time()
    progress("start", {"rounds": cfg.train.rounds, "sites": len(strategy.roster), "eval": eval0,
                       "noise_multiplier": job.noise_multiplier})
    bytes_up, bytes_down, agg_errors, stop_reason, rounds_done, last_eval = [], [], [], "completed", 0, eval0
    seen_sites = {s.site_id for s in strategy.sites()}
    for rnd in range(1, cfg.train.rounds + 1):
        meet.new_nodes()  # a site that (re)joined since the last round gets its handshake first
        seen_sites |= {s.site_id for s in strategy.sites()}
        t_round = time.time()
        arrays = rec.to_record(global_state)
        down = encode(global_state, manifest, round=rnd, kind=KIND_DOWN)
        messages = list(strategy.configure_train(rnd, arrays, meet.record(rnd, job.noise_multiplier), grid))
        replies = grid.send_and_receive(messages, timeout=settings.round_timeout)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        out = strategy.last
        if new_arrays is None:
            stop_reason = (f"round {rnd}: {len(out.accepted)} of {len(out.chosen)} sites answered validly "
                           f"(minimum {settings.min_sites}); {out.problems()}")
            log.warning("stopping: %s", stop_reason)
            break
        for acc in out.accepted:  # the server's copy of what each site reports having recorded
            for ev in acc.events:
                ledger.append(client=acc.site_id, round=rnd, event=ev, note=REPORTED_NOTE)
        global_state = out.aggregate.state
        agg_errors.append(out.aggregate.error)
        save_checkpoint(run_dir, round=rnd, global_state=global_state, frozen=job.method.frozen_state(),
                        meta=checkpoint_meta(run_dir, ledger, None))
        save_state(run_dir / "rounds" / f"round-{rnd:03d}.safetensors", global_state)
        ups = [len(encode(a.state, manifest, round=rnd, kind=KIND_UP)) for a in out.accepted]
        bytes_up.extend(ups)
        bytes_down.extend([len(down)] * len(out.chosen))
        load_trainable_state(job.model, global_state)
        ev = last_eval = evaluate_global()
        eps_clients = {c: prv_epsilon(ledger.events(c), delta=cfg.privacy.delta).upper
                       for c in ledger.clients()} if job.dp else {}
        line = release("metrics", {
            "round": rnd, "clients": [a.site_id for a in out.accepted], **ev,
            "epsilon_spent": max(eps_clients.values()) if eps_clients else None,
            "bytes_up": sum(ups), "bytes_down": len(down) * len(out.chosen),
            "bytes_up_per_site": len(encode(global_state, manifest, round=rnd, kind=KIND_UP)),
            "aggregation_error": out.aggregate.error, "seconds": time.time() - t_round,
            "flower_bytes_up": sum(a.flower_bytes for a in out.accepted), **_outcome_lists(out)}, unit=unit_of(cfg))
        _append_metrics(metrics_path, line)
        rounds_done = rnd
        progress("round", line)
    job.method.export(run_dir / "adapter", task=cfg.model.task, base_model=cfg.model.name)
    eps = {c: prv_epsilon(ledger.events(c), delta=cfg.privacy.delta) for c in ledger.clients()} if job.dp else {}
    trainable = sum(v.numel() for v in global_state.values())
    sites = strategy.sites()
    summary = build_summary(job, eps_clients=eps, client_level=None,
                            sample_rates={s.site_id: sample_rate(cfg.train.batch_size, s.num_examples) for s in sites},
                            client_sizes={s.site_id: s.num_examples for s in sites},
                            clients_per_round=max(1, int(math.ceil(cfg.train.client_fraction * len(sites)))),
                            rounds_done=rounds_done, stop_reason=stop_reason, resumed=None, eval0=eval0,
                            last_eval=last_eval, bytes_up=bytes_up, bytes_down=bytes_down, agg_errors=agg_errors,
                            trainable=trainable, t_start=t_start)
    summary.update({
        "flower": {
            "sites": sorted(seen_sites), "min_sites": settings.min_sites, "round_timeout": settings.round_timeout,
            "replies_rejected": strategy.totals["rejected"], "sites_refused": strategy.totals["refused"],
            "sites_failed": strategy.totals["failed"], "handshake_refusals": meet.refusals,
            "ledgers": "each site keeps its own ledger (node config 'ledger'); ledger.jsonl here holds the events "
                       "the sites reported with their accepted replies",
        },
    })
    write_json(run_dir / "summary.json", summary)
    return summary


def _outcome_lists(out) -> dict[str, Any]:
    return {"sites_rejected": out.rejected, "sites_refused": out.refused, "sites_failed": out.failed}


def _append_metrics(path: Path, line: dict[str, Any]) -> None:
    import os

    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
