"""The round loop: select sites → their DP updates (through a transport) → aggregation → ledgers → release.

:func:`start` writes what a run needs before its first round (the configuration, the budget,
the ledgers, the accounted DP initialisation, the initial state and checkpoint);
:func:`train_rounds` runs rounds until the schedule or a budget ends them, then writes the
adapter and the summary. The sites are behind a :class:`Transport`: :class:`InProcessSites`
holds them in this process; a distributed transport only has to deliver the same
:class:`~dpfed.client.ClientResult` for the same round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from accounting.events import PoissonGaussianEvent, PoissonSkellamEvent
from accounting.prv import epsilon as prv_epsilon
from accounting.sampling import exact_rate, sample_rate
from dpfed import config as config_mod
from dpfed.adapters.init import factors_from_gradient, zero_factors
from dpfed.adapters.lorasb import load_trainable_state, trainable_state
from dpfed.aggregation import ClientLevelDP, FedSBAggregator
from dpfed.client import ClientResult, SiteMessage
from dpfed.errors import BudgetError, ConfigError
from dpfed.evaluation import evaluate
from dpfed.payload import FRAMING_BYTES, KIND_DOWN, KIND_UP, Manifest, encode
from dpfed.privacy import make_generator
from dpfed.release import release, unit_of
from dpfed.rundir import (LABELS_JSON, RUN_JSON, SERVER_LEDGER, SUMMARY, INITIAL_STATE, METRICS, append_metrics,
                          build_summary, checkpoint_meta, save_checkpoint, save_state, sha256_hex, write_budget, write_json)
from dpfed.secure_encoding import ModularWrapError, SecureEncoding, TooFewSitesError, decode, secure_sum, unflatten
from dpfed.seeds import RunStream, child_seed, secure_generators, site_generators
from dpfed.setup import Job, dp_init_params, make_clients

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]

SERVER_ID = "all-clients"  # the server ledger's one account: the client-level guarantee holds for every client
CLIENT_TRUST = "requires a trusted aggregator (the server adds the noise)"


class RoundAborted(Exception):
    """A transport could not complete a round (too few valid replies); the run stops with this reason."""


class Transport(Protocol):
    """How the server reaches the sites: one round's local training, and the budget check before it.

    ``site_ids`` and ``site_sizes`` (each site's population n, public by declaration) are fixed
    for the run; ``round_extras`` and ``summary_extras`` add the transport's own declared fields
    (``dpfed.release``) to the metrics line and the summary.
    """

    site_ids: list[str]
    site_sizes: dict[str, int]

    def check_budgets(self, chosen: list[int]) -> None:
        """Raise :class:`~dpfed.errors.BudgetError` if a chosen site would pass its budget this round."""

    def train(self, rnd: int, chosen: list[int], global_state: dict[str, torch.Tensor],
              progress: Progress) -> list[ClientResult]:
        """Each chosen site's result for round ``rnd`` (its events are in its ledger before it returns).

        Raises :class:`RoundAborted` when the round cannot be completed."""

    def round_extras(self) -> dict[str, Any]:
        """Fields of the last round's metrics line that only this transport knows."""

    def summary_extras(self) -> dict[str, Any]:
        """Fields of the summary that only this transport knows."""


@dataclass(frozen=True)
class SecureSum:
    """What secure aggregation reveals to the server in one round: the sum of the site messages, nothing else.

    ``total``: the messages' sum modulo ``2**bits`` ((padded_dim,) int64), or None when the round
    is discarded (``discarded`` says why: fewer than ``min_sites`` messages); ``sites``: whose
    messages are in it (availability, public).
    """

    round: int
    total: torch.Tensor | None
    sites: tuple[str, ...]
    discarded: str | None = None


def secure_aggregate(messages: list[SiteMessage], *, encoding: SecureEncoding, round: int) -> SecureSum:  # noqa: A002
    """The in-process stand-in for secure aggregation: only the modular sum leaves (fewer than min_sites: no sum)."""
    sites = tuple(m.client_id for m in messages)
    try:
        total = secure_sum([m.message for m in messages], encoding=encoding)
    except TooFewSitesError as exc:
        return SecureSum(round, None, sites, str(exc))
    return SecureSum(round, total, sites)


def secure_step(job: Job, summed: SecureSum, global_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's FedSGD step from the secure sum: decode, divide by the expected total batch b·K, SGD with train.lr.

    The expected batch ``Σ_i q_i n_i = b · K`` over the K sites in the sum (every q_i = b / n_i
    since b <= n_i), never the realised one. Raises :class:`ModularWrapError` if the sum wrapped.
    """
    flat = decode(summed.total, encoding=job.secure)  # (dim,) float64: Σ clipped gradients + Skellam noise / scale
    expected = float(job.cfg.train.batch_size * len(summed.sites))
    grads = unflatten(flat / expected, {n: v.shape for n, v in global_state.items()})
    lr = job.cfg.train.lr
    return {n: v - lr * grads[n].to(v.dtype) for n, v in global_state.items()}


def secure_record(encoding: SecureEncoding) -> dict[str, Any]:
    """The public encoding that ``run.json`` records: every field (``--resume`` rebuilds it) and the sensitivities
    (the ledger check reads μ and them)."""
    sens = encoding.sensitivity
    return {**encoding.to_public(), "l2_sensitivity": sens.l2, "l1_sensitivity": sens.l1}


def message_bytes(encoding: SecureEncoding) -> int:
    """Bytes of one site message: padded_dim words of 32 bits (SecAgg+'s modulus 2**32) plus our framing."""
    return 4 * encoding.padded_dim + FRAMING_BYTES


def colluding_server_epsilon(events: list, *, min_sites: int, delta: float) -> float:
    """ε of a site's events if a colluding server saw its own message: each Skellam event with μ / min_sites."""
    shares = [dataclasses.replace(e, mu=e.mu / min_sites) if isinstance(e, PoissonSkellamEvent) else e for e in events]
    return prv_epsilon(shares, delta=delta).upper


def secure_summary(job: Job, ledger, site_ids: list[str], *, discarded: list[int], claims: bool) -> dict[str, Any]:
    """The summary fields of secure aggregation: its public encoding, the colluding-server ε, the discarded rounds."""
    enc = job.secure
    sens = enc.sensitivity
    out: dict[str, Any] = {
        "secure_aggregation": {
            "noise": "Skellam shares (Agarwal, Kairouz, Liu 2021), one per site; their sum is Skellam",
            "mu_total": enc.mu_total, "mu_site": enc.mu_site, "min_sites": enc.min_sites, "max_sites": enc.max_sites,
            "noise_multiplier_equivalent": math.sqrt(enc.mu_total) / sens.l2,
            "noise_std_of_sum": enc.noise_std(enc.min_sites), "dim": enc.dim, "padded_dim": enc.padded_dim,
            "scale": enc.scale, "bits": enc.bits, "rotation_seed": enc.rotation_seed, "l2_sensitivity": sens.l2,
            "l1_sensitivity": sens.l1, "max_records": enc.max_records, "overflow_beta": enc.overflow_beta,
            "message_bytes": message_bytes(enc),
        },
        "rounds_discarded": list(discarded),
    }
    if claims:
        delta = job.cfg.privacy.delta
        out["epsilon_colluding_server"] = max(
            (colluding_server_epsilon(ledger.events(s), min_sites=enc.min_sites, delta=delta) for s in site_ids),
            default=0.0)
    return out


class InProcessSites:
    """The sites of a simulation, in this process, sharing the server's model object (one trains at a time).

    ``dropout(round, site_id)`` (tests): True makes that site drop out of that secure round before it
    trains (it sends nothing and spends nothing).
    """

    def __init__(self, job: Job, *, ledger, seed: int, diagnostics_dir: Path | None,
                 dropout: Callable[[int, str], bool] | None = None) -> None:
        self.job, self.ledger, self.seed = job, ledger, seed
        self.dropout = dropout
        self.clients = make_clients(job, ledger=ledger, seed=seed, diagnostics_dir=diagnostics_dir)
        self.site_ids = [c.client_id for c in self.clients]
        self.site_sizes = {c.client_id: c.num_examples for c in self.clients}

    def round_extras(self) -> dict[str, Any]:
        return {}

    def summary_extras(self) -> dict[str, Any]:
        return {}

    def check_budgets(self, chosen: list[int]) -> None:
        for i in chosen:
            self.clients[i].check_budget()

    def train(self, rnd: int, chosen: list[int], global_state: dict[str, torch.Tensor],
              progress: Progress) -> list[ClientResult]:
        results = []
        for i in chosen:
            c = self.clients[i]
            # per-round draws: a run resumed at any round draws what an uninterrupted one would
            c.sample_generator, noise = site_generators(self.seed, i, rnd, history=len(self.ledger.events(c.client_id)),
                                                        device=self.job.device)
            if c.dp is not None:
                c.noise_generator = noise
            progress("client", {"round": rnd, "client": c.client_id})
            results.append(c.fit(self.job.model, global_state, round=rnd, on_step=lambda: progress("step", {"round": rnd})))
        return results

    def secure_round(self, rnd: int, chosen: list[int], global_state: dict[str, torch.Tensor],
                     progress: Progress) -> SecureSum:
        """Each chosen site's message (events in its ledger first), summed here: the server gets the sum only."""
        messages = []
        for i in chosen:
            c = self.clients[i]
            if self.dropout is not None and self.dropout(rnd, c.client_id):
                continue
            c.sample_generator, noise, rounding = secure_generators(self.seed, i, rnd,
                                                                    history=len(self.ledger.events(c.client_id)))
            progress("client", {"round": rnd, "client": c.client_id})
            messages.append(c.secure_message(self.job.model, global_state, round=rnd, rounding_generator=rounding,
                                             noise_generator=noise))
            progress("step", {"round": rnd})
        return secure_aggregate(messages, encoding=self.job.secure, round=rnd)


def server_event(job: Job) -> PoissonGaussianEvent:
    """One round of DP-FedAvg: the Poisson-subsampled Gaussian mechanism on whole clients."""
    return PoissonGaussianEvent(noise_multiplier=job.client_noise_multiplier,
                                sample_rate=exact_rate(job.cfg.train.client_fraction), count=1, unit="client")


def client_level_epsilon(job: Job, server_ledger, extra: int = 0) -> float:
    events = server_ledger.events(SERVER_ID) + [server_event(job)] * extra
    return prv_epsilon(events, delta=job.cfg.privacy.client_delta_value).upper


def in_process_init_contributions(job: Job, ledger, params) -> list[dict[str, torch.Tensor]]:
    """Each in-process site's DP-initialisation release (site order); events appended before each returns."""
    parts = []
    for i, c in enumerate(make_clients(job, ledger=ledger, seed=job.seed)):
        sample_gen, noise_gen = site_generators(job.seed, i, 0, history=len(ledger.events(c.client_id)),
                                                device=job.device)
        parts.append(c.init_contribution(job.model, job.adapters, params=params, sample_generator=sample_gen,
                                         noise_generator=noise_gen))
    return parts


def dp_init(job: Job, ledger, *, contributions: Callable[[Any], list[dict[str, torch.Tensor]]] | None = None,
            sizes: list[int] | None = None) -> dict[str, Any]:
    """``init: dp``: every site releases a clipped, noised gradient sum (its ledger first); the server signs and SVDs.

    Round 0 of each site's ledger holds the event. Per-site generators derive from the run seed
    at round 0, which no training round uses. ``contributions(params)`` returns the sites'
    releases in site order (default: the in-process sites); ``sizes`` their populations.
    """
    params = dp_init_params(job.cfg)
    zero_factors(job.adapters)  # the estimate is taken at W0
    parts = (contributions or (lambda p: in_process_init_contributions(job, ledger, p)))(params)
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for n, v in part.items():
            total[n] = total[n] + v.to(job.device) if n in total else v.to(job.device)
    factors_from_gradient(job.adapters, total, lr=job.cfg.init.lr,
                          generator=make_generator(child_seed(job.seed, RunStream.INIT, 1)))
    values = sum(a.out_features * a.in_features for a in job.adapters.values())
    sizes = sizes or job.population_sizes()
    eps_init = max(prv_epsilon([PoissonGaussianEvent(noise_multiplier=params.noise_multiplier,
                                                     sample_rate=sample_rate(params.expected_batch_size, n), count=1)],
                               delta=job.cfg.privacy.delta).upper for n in sizes)
    return {"dp_init_noise_multiplier": params.noise_multiplier, "dp_init_clip": params.clip,
            "dp_init_batch_size": params.expected_batch_size, "dp_init_epsilon_alone": eps_init,
            "dp_init_contributors": float(len(parts)), "dp_init_bytes_up_per_client": float(4 * values + FRAMING_BYTES)}


def evaluate_job(job: Job) -> dict[str, float]:
    """The global model (as it is in ``job.model``) on the evaluator's test split."""
    return evaluate(job.model, job.test, task=job.cfg.model.task, device=job.device,
                    batch_size=job.cfg.train.eval_batch_size, autocast_dtype=job.autocast_dtype)


def start(job: Job, run_dir: Path, *, ledger, server_ledger, progress: Progress,
          run_info: dict[str, Any] | None = None, transport: Any = None) -> tuple[dict, dict, dict]:
    """Write everything before round 1; return ``(global_state, eval0, init_info)``.

    Order matters: the ledgers exist before the DP initialisation appends to them, and
    ``run.json`` and the round-0 checkpoint come last (a directory without them was never
    trained and can be removed).
    """
    cfg = job.cfg
    config_text = config_mod.to_yaml(cfg)
    (run_dir / "config.yaml").write_text(config_text)
    if job.splits.test.labels is not None:  # head index -> label (declared, or from the test split and public data)
        write_json(run_dir / LABELS_JSON, {str(i): name for i, name in enumerate(job.splits.test.label_names)})
    write_budget(run_dir, job)
    canary_clients = (job.audit.canary_clients(trainable_state(job.model), split_seed=job.split_seed)
                      if job.audit is not None else None)
    if job.audit is not None:
        job.audit.save(run_dir, canaries=job.canaries, attack_records=job.attack_records, canary_clients=canary_clients)
    init_info = dict(job.init_info)
    if cfg.init.strategy == "dp":
        progress("setup", {"stage": "init", "strategy": "dp"})
        remote = getattr(transport, "init_contributions", None)  # a distributed transport asks its sites
        init_info.update(dp_init(job, ledger, contributions=remote,
                                 sizes=list(transport.site_sizes.values()) if transport is not None else None))
    global_state = trainable_state(job.model)
    save_state(run_dir / INITIAL_STATE, global_state)
    eval0 = evaluate_job(job)
    # never the noise/sampling seed unless the user chose it: knowing it would let anyone subtract the noise
    write_json(run_dir / RUN_JSON, {
        "config_sha256": sha256_hex(config_text.encode()),
        "split_seed": job.split_seed,
        "seed": job.seed if job.seed_is_user else None,
        "noise_multiplier": job.noise_multiplier,
        "client_noise_multiplier": job.client_noise_multiplier,
        "init_info": init_info,
        "initial_eval": eval0,
        **(run_info or {}),
        **({"secure_aggregation": secure_record(job.secure)} if job.secure is not None and job.dp else {}),
    })
    save_checkpoint(run_dir, round=0, global_state=global_state, frozen=job.method.frozen_state(),
                    meta=checkpoint_meta(run_dir, ledger, server_ledger))
    return global_state, eval0, init_info


def _select(job: Job, rnd: int, n_sites: int, q_client: float, per_round: int, seed: int) -> list[int]:
    gen = np.random.default_rng(child_seed(seed, RunStream.SELECT, rnd))
    if job.client_dp:  # Poisson: each site independently with probability q (the accounting needs it)
        return [i for i in range(n_sites) if gen.random() < q_client]
    return sorted(gen.choice(n_sites, size=per_round, replace=False).tolist())


def train_rounds(job: Job, run_dir: Path, *, transport: Transport, ledger, server_ledger,
                 global_state: dict[str, torch.Tensor], start_round: int, seed: int, eval0: dict[str, float],
                 init_info: dict[str, Any], progress: Progress, resumed: dict[str, Any] | None,
                 keep_rounds: bool = False, stop_after: int = 0) -> dict[str, Any]:
    """Rounds ``start_round`` .. ``train.rounds``; a budget refusal ends the run early. Returns the summary.

    ``keep_rounds`` also keeps the global state after every round in ``rounds/round-NNN.safetensors``.
    ``stop_after`` > 0 ends this session after that round when rounds remain: no adapter and no
    summary are written, the run stays resumable, and ``{"paused_after_round": r}`` is returned.
    """
    cfg, model = job.cfg, job.model
    t_start = time.time()
    n_sites = len(transport.site_ids)
    q_client = exact_rate(cfg.train.client_fraction)  # numpy's random() draws k / 2**53: exactly q on the grid
    if job.client_dp:  # DP-FedAvg: uniform weights, Poisson client sampling at rate q, fixed denominator q·N
        aggregator: Any = ClientLevelDP(FedSBAggregator(weighting="uniform"), clip=cfg.privacy.client_clip,
                                        noise_multiplier=job.client_noise_multiplier,
                                        expected_clients=q_client * n_sites, generator=make_generator(0))
    else:
        aggregator = job.method
    canary_clients = (job.audit.canary_clients(trainable_state(job.model), split_seed=job.split_seed)
                      if job.audit is not None and cfg.data.canary_clients else None)
    manifest = Manifest.of(global_state)
    up_size = len(encode(global_state, manifest, round=0, kind=KIND_UP))  # fixed by the manifest
    secure = job.secure is not None and job.dp  # one FedSGD step per round through secure aggregation
    if secure:
        if not hasattr(transport, "secure_round"):
            raise ConfigError("privacy.aggregation 'secure' is implemented in process only (this transport has no "
                              "secure aggregation), got a transport without it")
        up_size = message_bytes(job.secure)
    # a resumed secure run: the rounds discarded before the interruption (metrics.jsonl, cut at the checkpoint)
    discarded: list[int] = _discarded_rounds(run_dir / METRICS) if secure and resumed is not None else []
    down_state = global_state  # what the server sends at the start of the next round (method-specific)
    agg_errors: list[float] = []
    per_round = max(1, int(math.ceil(q_client * n_sites)))
    load_trainable_state(model, global_state)
    last_eval = evaluate_job(job)
    progress("start", {"rounds": cfg.train.rounds - start_round + 1, "clients_per_round": per_round,
                       "local_steps": cfg.train.local_steps, "eval": last_eval, "noise_multiplier": job.noise_multiplier})
    bytes_up, bytes_down, stop_reason = [], [], "completed"
    rounds_done = start_round - 1
    claims = job.noise_enabled  # the noise-free twin claims no ε
    for rnd in range(start_round, cfg.train.rounds + 1):
        chosen = _select(job, rnd, n_sites, q_client, per_round, seed)
        if job.client_dp:
            aggregator.generator = make_generator(child_seed(seed, RunStream.SERVER_NOISE, rnd))
        try:
            transport.check_budgets(chosen)
            if job.client_dp and cfg.privacy.client_epsilon is not None:
                eps_c = client_level_epsilon(job, server_ledger, extra=1)
                if eps_c > cfg.privacy.client_epsilon:
                    raise BudgetError(f"client-level epsilon would reach {eps_c:.4f} > budget {cfg.privacy.client_epsilon:g} "
                                      f"(over by {eps_c - cfg.privacy.client_epsilon:.4f}) if the server released another "
                                      f"round; refusing")
        except BudgetError as exc:  # stop before anyone passes the budget
            stop_reason = str(exc)
            log.warning("stopping before round %d: %s", rnd, exc)
            break
        t_round = time.time()
        down = encode(down_state, Manifest.of(down_state), round=rnd, kind=KIND_DOWN)
        secure_line: dict[str, Any] = {}
        if secure:  # only the sum reaches this code: the transport sums the site messages
            summed = transport.secure_round(rnd, chosen, global_state, progress)
            results, ups = [], [up_size] * len(summed.sites)
            bytes_down.extend([len(down)] * len(summed.sites))
            reason = summed.discarded
            if reason is None:
                try:
                    global_state = down_state = secure_step(job, summed, global_state)
                except ModularWrapError as exc:  # a utility failure, never a privacy one: the sum is not used
                    reason = str(exc)
            if reason is not None:  # the state is unchanged; the senders' events stay in their ledgers
                discarded.append(rnd)
                log.warning("round %d discarded: %s", rnd, reason)
            secure_line = {"clients": list(summed.sites), "secure_sites": len(summed.sites), "round_discarded": reason}
        else:
            try:
                results = transport.train(rnd, chosen, global_state, progress)
            except RoundAborted as exc:
                stop_reason = str(exc)
                log.warning("stopping: %s", exc)
                break
            ups = [len(encode(r.state, manifest, round=rnd, kind=KIND_UP)) for r in results]
            bytes_down.extend([len(down)] * len(results))
        states, sizes = [r.state for r in results], [r.num_examples for r in results]
        if canary_clients is not None:  # client-level audit: included canaries, Poisson-sampled like every client
            cgen = np.random.default_rng(child_seed(seed, RunStream.CANARY_CLIENT_SAMPLE, rnd))
            for k, inside in enumerate(canary_clients.included):
                if cgen.random() < q_client and inside:
                    states.append(job.audit.canary_state(global_state, canary_clients, k))
                    sizes.append(1)
        if job.client_dp:
            global_state = down_state = aggregator.aggregate(states, sizes, global_state=global_state)
            # write-ahead: the server's event is durable before the noised state is released
            server_ledger.append(client=SERVER_ID, round=rnd, event=server_event(job))
        elif results:
            agg = aggregator.aggregate(states, sizes, round=rnd)  # folds into W0 where the method does
            global_state, down_state = agg.state, agg.down
            agg_errors.append(agg.error)
        bytes_up.extend(ups)
        load_trainable_state(model, global_state)
        ev = last_eval = evaluate_job(job)
        eps_sites = {s: prv_epsilon(ledger.events(s), delta=cfg.privacy.delta).upper
                     for s in transport.site_ids} if job.dp and claims else {}
        # through the release boundary: under client-level DP the sampled sites, their count and anything
        # computed from single sites' updates are withheld (dpfed.release declares every field)
        line = release("metrics", {
            "round": rnd, "clients": [r.client_id for r in results], **ev,  # the sites whose updates were averaged
            "epsilon_spent": max(eps_sites.values()) if eps_sites else None,
            "bytes_up": sum(ups), "bytes_down": len(down) * len(chosen), "bytes_up_per_site": up_size,
            "aggregation_error": agg_errors[-1] if results and not job.client_dp else None,
            "seconds": time.time() - t_round,
            **({"client_level_epsilon": client_level_epsilon(job, server_ledger)} if job.client_dp and claims else {}),
            **transport.round_extras(),
            **secure_line,
        }, unit=unit_of(cfg))
        append_metrics(run_dir / METRICS, line)
        # the round's metrics line first, then its checkpoint: an interruption between the two leaves a line
        # that resume drops (it redoes the round), never a checkpointed round without its line
        save_checkpoint(run_dir, round=rnd, global_state=global_state, frozen=job.method.frozen_state(),
                        meta=checkpoint_meta(run_dir, ledger, server_ledger))
        if keep_rounds:
            (run_dir / "rounds").mkdir(exist_ok=True)
            save_state(run_dir / "rounds" / f"round-{rnd:03d}.safetensors", global_state)
        rounds_done = rnd
        progress("round", line)
        if 0 < stop_after <= rnd < cfg.train.rounds:
            log.info("pausing after round %d of %d: the run is resumable", rnd, cfg.train.rounds)
            return {"paused_after_round": rnd}
    job.method.export(run_dir / "adapter", task=cfg.model.task, base_model=cfg.model.name)
    sizes_by_site = dict(transport.site_sizes)
    eps_final = ({s: prv_epsilon(ledger.events(s), delta=cfg.privacy.delta) for s in transport.site_ids}
                 if job.dp and claims else {})
    client_level = None
    if job.client_dp and claims:
        client_level = {
            "guarantee": "client-level DP (DP-FedAvg): adding or removing one client's whole data",
            "epsilon": client_level_epsilon(job, server_ledger), "delta": cfg.privacy.client_delta_value,
            "epsilon_target": cfg.privacy.client_epsilon, "noise_multiplier": job.client_noise_multiplier,
            "clip": cfg.privacy.client_clip, "sampling": f"Poisson, each client independently with q = {q_client:g}",
            "rounds_released": len(server_ledger.events(SERVER_ID)), "accountant": "prv (upper bound)",
            "ledger": SERVER_LEDGER, "trust": CLIENT_TRUST,
        }
    summary = build_summary(job, eps_clients=eps_final,
                            sample_rates={s: sample_rate(cfg.train.batch_size, n) for s, n in sizes_by_site.items()},
                            client_sizes=sizes_by_site, clients_per_round=per_round,
                            rounds_done=rounds_done, stop_reason=stop_reason, resumed=resumed, eval0=eval0,
                            last_eval=last_eval, bytes_up=bytes_up, bytes_down=bytes_down, agg_errors=agg_errors,
                            trainable=sum(v.numel() for v in global_state.values()), t_start=t_start,
                            client_level=client_level, init_info=init_info,
                            secure=secure_summary(job, ledger, transport.site_ids, discarded=discarded,
                                                  claims=bool(job.dp and claims)) if secure else None)
    summary.update(release("summary", transport.summary_extras(), unit=unit_of(cfg)))
    write_json(run_dir / SUMMARY, summary)
    return summary


def _recorded_encoding(record: dict | None, run_dir: Path) -> SecureEncoding:
    """The secure encoding ``run.json`` recorded (:func:`secure_record`), rebuilt and checked against its sensitivities."""
    from dpfed.errors import ConfigError

    if not isinstance(record, dict):
        raise ConfigError(f"{run_dir}/{RUN_JSON} must record the secure encoding to resume a privacy.aggregation "
                          f"'secure' run, got {record!r}")
    sens = {k: record.get(k) for k in ("l2_sensitivity", "l1_sensitivity")}
    enc = SecureEncoding.from_public({k: v for k, v in record.items() if k not in sens})
    if (enc.sensitivity.l2, enc.sensitivity.l1) != tuple(sens.values()):
        raise ConfigError(f"{run_dir}/{RUN_JSON}'s secure encoding must reproduce its recorded sensitivities, got "
                          f"{(enc.sensitivity.l2, enc.sensitivity.l1)} vs {tuple(sens.values())}")
    return enc


def _discarded_rounds(metrics: Path) -> list[int]:
    """The rounds ``metrics.jsonl`` records as discarded (secure aggregation with fewer than ``min_sites`` messages)."""
    import json

    if not metrics.is_file():
        return []
    lines = (json.loads(x) for x in metrics.read_text().splitlines() if x.strip())
    return [int(x["round"]) for x in lines if x.get("round_discarded") is not None]


@dataclass(frozen=True)
class Reopened:
    """A run directory opened to continue: the rebuilt job, its ledgers, and where to go on."""

    job: Job
    ledger: Any
    server_ledger: Any
    first: int  # the first round still to run
    eval0: dict[str, float]
    site_sizes: dict[str, int]  # each site's population, as the run recorded it


def reopen(run_dir: Path, *, progress: Progress, device: str | None = None, ledger_key: bytes | None = None,
           audit: Callable[[Any], Any] | None = None) -> Reopened:
    """Everything ``--resume`` checks and rebuilds before its first round, for any transport.

    Refuses a finished run, a changed ``config.yaml``, a ledger whose chain disagrees with the
    checkpoint (``dpfed.rundir_check``), a keyed ledger without its key, and a site that has
    already spent more than its budget. Rebuilds the data split and the model with the recorded
    split seed and σ; the adapter factors and the state come from the checkpoint. A torn last
    ledger line is repaired conservatively (the round in flight stays counted).
    """
    import dataclasses
    import json

    import yaml

    from dpfed.errors import ConfigError, RunComplete
    from dpfed.jsonio import read_json_object
    from dpfed.privacy import new_seed
    from dpfed.rundir import (
        LEDGER,
        load_checkpoint,
        open_ledger_for_resume,
        truncate_metrics,
    )
    from dpfed.rundir_check import verify_run_ledgers
    from dpfed.setup import prepare

    if not (run_dir / "config.yaml").is_file() or not (run_dir / RUN_JSON).is_file():
        raise ConfigError(f"--resume must name a run directory with config.yaml and {RUN_JSON}, got '{run_dir}'")
    if (run_dir / SUMMARY).is_file():  # written only when a run ends (all rounds, or a budget stop)
        raise RunComplete(run_dir, read_json_object(run_dir / SUMMARY, what="summary"))
    config_text = (run_dir / "config.yaml").read_bytes()
    info = json.loads((run_dir / RUN_JSON).read_text())
    meta, trainable, frozen = load_checkpoint(run_dir)
    digest = sha256_hex(config_text)
    if digest != info["config_sha256"] or digest != meta["config_sha256"]:
        raise ConfigError(f"{run_dir}/config.yaml changed since the run started (sha256 mismatch); refusing to resume")
    cfg = config_mod.from_dict(yaml.safe_load(config_text))
    if device is not None:
        cfg = config_mod.override(cfg, device=device)
    # rebuild data split and model; the adapter factors and state come from the checkpoint, so init is skipped
    cheap = config_mod.override(cfg, **{"init.strategy": "random", "init.head": "random",
                                        "privacy.noise_multiplier": info["noise_multiplier"],
                                        "privacy.client_noise_multiplier": info.get("client_noise_multiplier")})
    job = prepare(cheap, progress=progress, split_seed=int(info["split_seed"]),
                  audit=audit(cheap) if audit is not None else None)
    seed_is_user = info.get("seed") is not None  # an OS-entropy seed was never recorded: draw a new one
    job = dataclasses.replace(job, cfg=cfg, init_info=info.get("init_info", {}), seed_is_user=seed_is_user,
                              seed=int(info["seed"]) if seed_is_user else new_seed())
    if job.secure is not None:  # the public encoding the run started with, exactly (μ, bits, rotation seed)
        job = dataclasses.replace(job, secure=_recorded_encoding(info.get("secure_aggregation"), run_dir))
    job.method.load_frozen_state(frozen)
    load_trainable_state(job.model, trainable)
    first = int(meta["round"]) + 1
    flower = info.get("flower") or {}
    site_sizes = ({str(k): int(v) for k, v in flower["sites"].items()} if flower.get("sites")
                  else {f"client-{i:03d}": n for i, n in enumerate(job.population_sizes())})

    def in_flight_record() -> list[tuple[str, int, Any]]:
        if not job.dp:
            return []
        if job.secure is not None:
            sens = job.secure.sensitivity
            return [(site, first, PoissonSkellamEvent(mu=job.secure.mu_total, l2_sensitivity=sens.l2,
                                                      l1_sensitivity=sens.l1, count=1,
                                                      sample_rate=sample_rate(cfg.train.batch_size, n)))
                    for site, n in site_sizes.items()]
        return [(site, first, PoissonGaussianEvent(noise_multiplier=job.noise_multiplier,
                                                   sample_rate=sample_rate(cfg.train.batch_size, n),
                                                   count=cfg.train.local_steps)) for site, n in site_sizes.items()]

    def in_flight_server() -> list[tuple[str, int, Any]]:
        return [(SERVER_ID, first, server_event(job))]

    ledger = open_ledger_for_resume(run_dir / LEDGER, meta["ledger_head"], in_flight_record, key=ledger_key)
    server_ledger = (open_ledger_for_resume(run_dir / SERVER_LEDGER, meta.get("server_ledger_head"), in_flight_server,
                                            key=ledger_key) if job.client_dp else None)
    if ledger.keyed and not ledger.mac_verified:
        raise ConfigError(f"--ledger-key must be given to resume {run_dir}: its ledger is keyed (HMAC), got no key")
    verify_run_ledgers(run_dir, key=ledger_key)  # a torn line is repaired above; the rest must agree with the checkpoint
    if job.dp:  # refuse at once if the ledger already holds more than the budget
        for site in site_sizes:
            eps = prv_epsilon(ledger.events(site), delta=cfg.privacy.delta).upper
            if eps > cfg.privacy.epsilon:
                raise ConfigError(f"client {site} has already spent epsilon {eps:.4f} > budget {cfg.privacy.epsilon:g} "
                                  f"(over by {eps - cfg.privacy.epsilon:.4f}); refusing to resume")
    truncate_metrics(run_dir / METRICS, last_round=first - 1)
    return Reopened(job=job, ledger=ledger, server_ledger=server_ledger, first=first,
                    eval0=info.get("initial_eval") or {}, site_sizes=site_sizes)
