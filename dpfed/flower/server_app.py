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

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from attacks.plan import audit_plan
from dpfed.flower import records as rec
from dpfed.flower.settings import ServerSettings, check_supported
from dpfed.flower.strategy import FedSBStrategy, SiteInfo, reply_node
from dpfed.payload import Manifest

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
    """Run the whole federated job over ``grid`` (or continue it: ``resume``); write the run directory.

    Returns the summary, or ``{"paused_after_round": r}`` when ``stop-after`` ended the session early.
    """
    from dpfed.adapters.lorasb import trainable_state
    from dpfed.errors import ConfigError
    from dpfed.runner import prepare
    from dpfed.session import reopen

    run_dir = settings.out_dir.resolve()
    again = None
    if settings.resume:  # the checks and the rebuilt job of `dpfed train --resume` (dpfed.session.reopen)
        progress("setup", {"stage": "reopen"})
        again = reopen(run_dir, progress=progress, audit=audit_plan)
        job, cfg = again.job, again.job.cfg
        check_supported(cfg)
        if 0 < settings.stop_after < again.first:
            raise ConfigError(f"stop-after must be 0 or >= the first round to run ({again.first}), "
                              f"got {settings.stop_after}")
    else:
        cfg = settings.run_config()
        check_supported(cfg)
        if run_dir.exists() and (not run_dir.is_dir() or any((run_dir / f).exists() for f in _RUN_FILES)):
            raise ConfigError(f"out-dir must be a new directory or hold no run files, got '{run_dir}'")
        progress("setup", {"stage": "prepare"})
        job = prepare(cfg, audit=audit_plan(cfg))  # the ServerApp is a composition root: it builds the audit plan
    frozen = job.method.frozen_state()
    label_names = tuple(job.splits.test.label_names)
    global_state = trainable_state(job.model)
    strategy = FedSBStrategy(method=job.method, manifest=Manifest.of(global_state), seed=job.seed,
                             client_fraction=cfg.train.client_fraction, min_sites=settings.min_sites, dp=job.dp)
    meet = _Handshake(grid, strategy, cfg=cfg, split_seed=job.split_seed, label_names=label_names, frozen=frozen,
                      timeout=settings.round_timeout)
    expected = settings.sites or (len(again.site_sizes) if again is not None else cfg.data.num_clients)
    progress("setup", {"stage": "sites", "expected": expected})
    _wait_for_nodes(grid, expected, settings.wait_timeout)
    meet.new_nodes()
    if len(strategy.roster) < settings.min_sites:
        raise ConfigError(f"min-sites must be <= the sites that joined within {settings.wait_timeout:g} s "
                          f"({len(strategy.roster)}: {meet.refusals or 'no refusals'}), got {settings.min_sites}")
    joined = {s.site_id: s.num_examples for s in strategy.sites()}
    if again is not None:  # σ and the sample rates were planned for these sites: the same ones must come back
        if joined != again.site_sizes:
            raise ConfigError(f"sites must be the ones the run started with (site-id: records) to resume, got "
                              f"{joined} instead of {again.site_sizes}")
        return _run(job, run_dir, grid, strategy, meet, settings, global_state, progress, again=again)
    sizes = list(joined.values())
    if job.secure is not None and job.dp and sorted(sizes) != sorted(len(s) for s in job.shards):
        from dpfed.setup import calibrate_secure, secure_noise_multiplier

        # μ (from q = b / n_min) and the bits (from the largest sites' records) for the sites' own sizes
        secure = calibrate_secure(cfg, sizes, dim=job.secure.dim, rotation_seed=job.secure.rotation_seed)
        job = dataclasses.replace(job, secure=secure, noise_multiplier=secure_noise_multiplier(secure))
    elif job.dp and cfg.privacy.noise_multiplier is None and sorted(sizes) != sorted(len(s) for s in job.shards):
        from dpfed.runner import calibrate

        job = dataclasses.replace(job, noise_multiplier=calibrate(cfg, sizes))  # plan σ for the sites' own sizes
    if job.secure is not None and job.dp:  # SecAgg+ carries the integer messages exactly only within its field
        from dpfed.flower.secure_codec import secaggplus_params

        secaggplus_params(bits=job.secure.bits, max_sites=job.secure.max_sites)
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

    def record(self, server_round: int, noise_multiplier: float | None, frozen_sha256: str | None = None):
        return rec.run_record(server_round=server_round, cfg_yaml=self.cfg_yaml, split_seed=self.split_seed,
                              label_names=self.label_names, noise_multiplier=noise_multiplier,
                              frozen_sha256=frozen_sha256 or self.frozen_sha256)

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


class FlowerSites:
    """The sites of a Flower run behind :class:`dpfed.session.Transport`: the same round loop as ``dpfed train``.

    A round sends the global state and the run record to the chosen sites through the grid,
    checks every reply (:meth:`FedSBStrategy.collect`), copies the events each accepted site
    reports into the server's ``ledger.jsonl`` (the sites' own ledgers stay authoritative) and
    returns the accepted updates; fewer than ``min-sites`` valid replies abort the round. A site
    checks its own budget and refuses with a reply, so nothing is checked here beforehand.
    """

    def __init__(self, job, *, grid: Grid, strategy: FedSBStrategy, meet: _Handshake, settings: ServerSettings,
                 ledger, run_dir: Path) -> None:
        self.job, self.grid, self.strategy, self.meet, self.settings = job, grid, strategy, meet, settings
        self.ledger, self.run_dir = ledger, run_dir
        sites = strategy.sites()
        self.site_ids = [s.site_id for s in sites]
        self.site_sizes = {s.site_id: s.num_examples for s in sites}
        self.seen_sites = set(self.site_ids)
        self._extras: dict[str, Any] = {}
        # the frozen tensors change after the handshake when the method folds into W0 (every round) or when
        # the DP initialisation sets B and A from the sites' releases: send them with every round then
        self.resend_frozen = job.method.spec.folds or job.cfg.init.strategy == "dp"

    def check_budgets(self, chosen: list[int]) -> None:
        return None  # each site enforces its own budget and refuses with a reply

    def train(self, rnd: int, chosen: list[int], global_state, progress) -> list:
        from dpfed.client import ClientResult
        from dpfed.session import RoundAborted

        if not chosen:  # client-level Poisson sampling chose nobody: the server releases noise only
            self._extras = {"flower_bytes_up": 0, "sites_rejected": [], "sites_refused": [], "sites_failed": []}
            return []
        sites = self._connected(rnd, chosen)
        frozen = self.job.method.frozen_state()
        messages = self.strategy.configure_sites(rnd, sites, rec.to_record(global_state),
                                                 self.meet.record(rnd, self.job.noise_multiplier, rec.digest(frozen)),
                                                 frozen=rec.to_record(frozen) if self.resend_frozen else None)
        out = self.strategy.collect(rnd, self.grid.send_and_receive(messages, timeout=self.settings.round_timeout))
        self._extras = {"flower_bytes_up": sum(a.flower_bytes for a in out.accepted), **_outcome_lists(out)}
        if len(out.accepted) < self.settings.min_sites:
            raise RoundAborted(f"round {rnd}: {len(out.accepted)} of {len(out.chosen)} sites answered validly "
                               f"(minimum {self.settings.min_sites}); {out.problems()}")
        for acc in out.accepted:  # the server's copy of what each site reports having recorded
            for ev in acc.events:
                self.ledger.append(client=acc.site_id, round=rnd, event=ev, note=REPORTED_NOTE)
        steps = self.job.cfg.train.local_steps
        results = [ClientResult(a.site_id, rnd, a.state, a.num_examples, a.events, steps) for a in out.accepted]
        return results

    def _connected(self, rnd: int, chosen: list[int]) -> list:
        """The chosen sites' roster entries (a site that (re)joined since the last round gets its handshake first)."""
        from dpfed.session import RoundAborted

        self.meet.new_nodes()
        self.seen_sites |= {s.site_id for s in self.strategy.sites()}
        by_id = {s.site_id: s for s in self.strategy.sites()}
        missing = [self.site_ids[i] for i in chosen if self.site_ids[i] not in by_id]
        if missing:
            raise RoundAborted(f"round {rnd}: sites {missing} are not connected")
        return [by_id[self.site_ids[i]] for i in chosen]

    def secure_round(self, rnd: int, chosen: list[int], global_state, progress):
        """A secure round through Flower's SecAgg+: the server gets the sum of the chosen sites' messages only.

        Each site sends the events it recorded with its masked vector (public report); they go
        into the server's copy of the ledger for every site that handed one in, summed or not.
        """
        import json

        import torch

        from dpfed.flower.secure_codec import secaggplus_params
        from dpfed.flower.secure_round import SECURE_ENCODING, STATE_NAMES, run_secaggplus
        from dpfed.session import RoundAborted, SecureSum

        enc = self.job.secure
        try:
            sites = self._connected(rnd, chosen)
        except RoundAborted as exc:  # a site that is not there drops out: the sum needs min_sites messages
            self._extras = {}
            return SecureSum(rnd, None, (), str(exc))
        names = sorted(global_state)
        config = {**self.meet.record(rnd, self.job.noise_multiplier, rec.digest(self.job.method.frozen_state())),
                  SECURE_ENCODING: json.dumps(enc.to_public()), STATE_NAMES: json.dumps(names)}
        arrays = [global_state[n].detach().cpu().numpy() for n in names]
        out = run_secaggplus(self.grid, nodes=[s.node_id for s in sites], arrays=arrays, config=config,
                             params=secaggplus_params(bits=enc.bits, max_sites=enc.max_sites),
                             threshold=max(2, enc.min_sites), server_round=rnd, timeout=self.settings.round_timeout)
        by_node = {s.node_id: s for s in sites}
        for node in out.sent:  # the server's copy of what each sender reports having recorded
            report = out.reports.get(node, {})
            site = by_node[node]
            try:
                events = _report_events(report, site_id=site.site_id, server_round=rnd)
            except ValueError as exc:
                log.warning("round %d: %s's report is unusable (%s); its own ledger holds the round", rnd,
                            site.site_id, exc)
                continue
            for ev in events:
                self.ledger.append(client=site.site_id, round=rnd, event=ev, note=REPORTED_NOTE)
        order = [s.node_id for s in sites]
        self._extras = {}
        if out.total is None:
            senders = tuple(by_node[n].site_id for n in order if n in out.sent)
            return SecureSum(rnd, None, senders, out.reason)
        summed = tuple(by_node[n].site_id for n in order if n in out.summed)
        if len(summed) < enc.min_sites:
            return SecureSum(rnd, None, summed, f"the sum holds {len(summed)} messages, fewer than min_sites "
                                                f"{enc.min_sites}: not released")
        return SecureSum(rnd, torch.from_numpy(out.total), summed)

    def init_contributions(self, params) -> list:
        """``init: dp`` on the sites: each sends its clipped, noised W0-gradient sum (its ledger first)."""
        from dpfed.errors import DpfedError

        self.meet.new_nodes()
        sites = self.strategy.sites()
        shapes = {n: (a.out_features, a.in_features) for n, a in self.job.adapters.items()}
        manifest = Manifest(tuple(sorted(shapes)), tuple(shapes[n] for n in sorted(shapes)))
        from dpfed.adapters.lorasb import trainable_state

        config = self.meet.record(0, self.job.noise_multiplier)
        state = rec.to_record(trainable_state(self.job.model))  # R = 0 and the head the gradients are taken at
        msgs = [Message(content=RecordDict({rec.CONFIG: config, rec.ARRAYS: state}), dst_node_id=s.node_id,
                        message_type=f"{MessageType.QUERY}.dp_init", group_id="dp-init") for s in sites]
        by_node = {s.node_id: s for s in sites}
        parts: dict[str, dict] = {}
        for reply in self.grid.send_and_receive(msgs, timeout=self.settings.round_timeout):
            site = by_node.get(reply_node(reply, msgs))
            if site is None or reply.has_error() or rec.REFUSAL in reply.content:
                why = (reply.error.reason if reply.has_error() else
                       reply.content.config_records[rec.REFUSAL].get("reason") if rec.REFUSAL in reply.content else "?")
                raise DpfedError(f"init: dp needs every site's release, got none from "
                                 f"{site.site_id if site else 'an unknown node'} ({why})")
            acc = rec.check_reply(reply.content, manifest=manifest, site_id=site.site_id, server_round=0,
                                  num_examples=site.num_examples, dp=True)
            for ev in acc.events:  # the server's copy of what the site reports having recorded at round 0
                self.ledger.append(client=acc.site_id, round=0, event=ev, note=REPORTED_NOTE)
            parts[acc.site_id] = acc.state
        missing = sorted(set(self.site_ids) - set(parts))
        if missing:
            raise DpfedError(f"init: dp needs every site's release, got none from {missing}")
        return [parts[s] for s in self.site_ids]

    def round_extras(self) -> dict[str, Any]:
        return dict(self._extras)

    def summary_extras(self) -> dict[str, Any]:
        t = self.strategy.totals
        return {"flower": {
            "sites": sorted(self.seen_sites), "min_sites": self.settings.min_sites,
            "round_timeout": self.settings.round_timeout, "replies_rejected": t["rejected"],
            "sites_refused": t["refused"], "sites_failed": t["failed"], "handshake_refusals": self.meet.refusals,
            "ledgers": "each site keeps its own ledger (node config 'ledger'); ledger.jsonl here holds the events "
                       "the sites reported with their accepted replies",
        }}


def _run(job, run_dir: Path, grid: Grid, strategy: FedSBStrategy, meet: _Handshake, settings: ServerSettings,
         global_state, progress, again=None) -> dict[str, Any]:
    """The session's round loop (``dpfed.session``) with the sites behind the grid; ``again``: a reopened run."""
    from accounting.ledger import Ledger
    from dpfed.rundir import LEDGER, SERVER_LEDGER
    from dpfed.session import start, train_rounds

    if again is not None:
        ledger, server_ledger = again.ledger, again.server_ledger
        sites = FlowerSites(job, grid=grid, strategy=strategy, meet=meet, settings=settings, ledger=ledger,
                            run_dir=run_dir)
        log.info("resuming %s at round %d", run_dir, again.first)
        return train_rounds(job, run_dir, transport=sites, ledger=ledger, server_ledger=server_ledger,
                            global_state=global_state, start_round=again.first, seed=job.seed, eval0=again.eval0,
                            init_info=job.init_info, progress=progress, keep_rounds=True,
                            resumed={"from_round": again.first - 1, "ledger_records": len(ledger)},
                            stop_after=settings.stop_after)
    run_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(run_dir / LEDGER)
    # client-level DP (DP-FedAvg): the server clips, adds the noise and keeps the server ledger, as in process
    server_ledger = Ledger(run_dir / SERVER_LEDGER) if job.client_dp else None
    sites = FlowerSites(job, grid=grid, strategy=strategy, meet=meet, settings=settings, ledger=ledger, run_dir=run_dir)
    state0, eval0, init_info = start(job, run_dir, ledger=ledger, server_ledger=server_ledger, progress=progress,
                                     run_info={"flower": {"sites": sites.site_sizes, "min_sites": settings.min_sites}},
                                     transport=sites)
    return train_rounds(job, run_dir, transport=sites, ledger=ledger, server_ledger=server_ledger, global_state=state0,
                        start_round=1, seed=job.seed, eval0=eval0, init_info=init_info, progress=progress, resumed=None,
                        keep_rounds=True, stop_after=settings.stop_after)


def _report_events(report: dict, *, site_id: str, server_round: int) -> tuple:
    """The privacy events in a secure round's public report, checked against the site and round it names."""
    import json

    from accounting.events import event_from_dict

    if report.get("site-id") != site_id or report.get("round") != server_round:
        raise ValueError(f"report names site {report.get('site-id')!r}, round {report.get('round')!r}")
    try:
        events = tuple(event_from_dict(e) for e in json.loads(str(report.get("events", "[]"))))
    except Exception as exc:  # JSON and AccountingInputError
        raise ValueError(f"events must be a JSON list of privacy events ({type(exc).__name__})") from None
    if not events:
        raise ValueError("no events")
    return events


def _outcome_lists(out) -> dict[str, Any]:
    return {"sites_rejected": out.rejected, "sites_refused": out.refused, "sites_failed": out.failed}
