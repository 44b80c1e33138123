"""The Flower ``ClientApp``: a site's handshake (``query``) and its training step (``train``).

``train`` runs :meth:`dpfed.client.Client.fit` on the site's own data: the budget check
against the site's own ledger and budget (its node config, whatever the server asks), K
DP-SGD steps on R, the round's events appended and fsynced to the site's ledger, and only
then the reply (the payload and its metrics). A refusal (budget, a config the site will not
accept) is a reply with a ``refusal`` record, never a payload.

Flower starts a fresh process for every message, so the site rebuilds its client each
round; the frozen factors it received in the handshake stay in its Flower context.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from attacks.plan import audit_plan  # the ClientApp is a composition root: it builds the audit plan it runs with
from dpfed.flower import records as rec
from dpfed.flower.secure_round import FIT_CONFIG, is_secure_round, secure_only_mod

log = logging.getLogger(__name__)

app = ClientApp(mods=[secure_only_mod])  # SecAgg+ (Flower's secaggplus_mod) for the messages of secure rounds only


def _settings(context: Context):
    from dpfed.flower.settings import SiteSettings

    return SiteSettings.from_node_config(context.node_config)


def _server_config(run: rec.RunMessage):
    import yaml

    from dpfed import config as cfgmod
    from dpfed.flower.settings import check_supported

    cfg = cfgmod.from_dict(yaml.safe_load(run.cfg_yaml))
    check_supported(cfg)
    return cfg


def _spent(ledger, site_id: str, delta: float | None) -> float | None:
    """The site's ε so far from its own ledger (PRV upper bound); None without DP."""
    from accounting.prv import epsilon

    if delta is None:
        return None
    events = ledger.events(site_id)
    return epsilon(events, delta=delta).upper if events else 0.0


def _refusing(what: str):
    """Wrap a handler: read the site's settings and the run record, and turn an input error into a refusal.

    The handler gets ``(msg, context, settings, run)``. A refusal is a reply with a ``refusal``
    record (never a payload), logged on the site with ``what`` was refused.
    """

    def wrap(handler):
        def inner(msg: Message, context: Context) -> Message:
            from accounting.errors import AccountingError
            from dpfed.errors import DpfedError

            site_id, server_round = "?", 0
            try:
                settings = _settings(context)
                site_id = settings.site_id
                secure = is_secure_round(msg)
                run = rec.parse_run_record(msg.content.config_records[FIT_CONFIG if secure else rec.CONFIG])
                server_round = run.server_round
                return handler(msg, context, settings, run)
            except (DpfedError, AccountingError, KeyError) as exc:
                log.warning("site %s refuses %s (round %d): %s", site_id, what, server_round, exc)
                if is_secure_round(msg):  # inside SecAgg+ a refusal is a dropout: the protocol goes on without it
                    raise RuntimeError(f"site {site_id} refuses the secure round {server_round}: {exc}") from None
                return Message(rec.refusal(str(exc), site_id=site_id, server_round=server_round), reply_to=msg)

        # Flower sees a plain (msg, context) handler; no __wrapped__, so no one inspects the inner signature
        inner.__name__, inner.__qualname__, inner.__doc__ = handler.__name__, handler.__qualname__, handler.__doc__
        return inner

    return wrap


@app.query()
@_refusing("the handshake")
def query(msg: Message, context: Context, settings, run: rec.RunMessage) -> Message:
    """Handshake: keep the frozen factors, announce the site's id, size, budget and what it has spent."""
    from accounting.ledger import Ledger
    from dpfed.errors import DpfedError
    from dpfed.flower.site import site_config, site_records

    cfg = site_config(_server_config(run), settings)
    frozen = msg.content.array_records[rec.FROZEN]
    if rec.digest(rec.from_record(frozen)) != run.frozen_sha256:
        raise DpfedError("frozen factors must match their announced sha256 (corrupted in transit?)")
    context.state[rec.STATE_KEY] = frozen
    ledger = Ledger(settings.ledger)
    audit = audit_plan(cfg)
    if audit is not None and cfg.data.canaries:  # the population counts this site's gradient canaries
        from dpfed.flower.site import build_site

        # σ is planned only after the handshake; the site is built here just to count its population (no step runs)
        n = build_site(_server_config(run), settings, split_seed=run.split_seed, label_names=run.label_names,
                       frozen=rec.from_record(frozen), noise_multiplier=run.noise_multiplier or 1.0, round=0,
                       ledger=ledger, audit=audit).client.num_examples
    else:
        n = len(site_records(cfg, settings, split_seed=run.split_seed, label_names=run.label_names, audit=audit))
    delta = cfg.privacy.delta if cfg.privacy.record_level else None
    info = {"site-id": settings.site_id, "num-examples": n, "own-budget": settings.epsilon is not None}
    metrics = {"num-examples": n}
    if delta is not None:
        metrics.update({"epsilon-budget": cfg.privacy.epsilon, "delta": delta,
                        "epsilon-spent": _spent(ledger, settings.site_id, delta)})
    if settings.epsilon is None and cfg.privacy.record_level:
        log.warning("site %s has no epsilon in its node config: it enforces the server's budget %g",
                    settings.site_id, cfg.privacy.epsilon)
    return Message(RecordDict({rec.SITE: ConfigRecord(info), rec.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.train()
@_refusing("the round")
def train(msg: Message, context: Context, settings, run: rec.RunMessage) -> Message:
    """One round: build the site's client, ``Client.fit`` (ledger first), reply with the payload."""
    from accounting.events import event_to_dict
    from accounting.ledger import Ledger
    from dpfed.errors import DpfedError
    from dpfed.flower.site import build_site

    cfg = _server_config(run)
    if rec.STATE_KEY not in context.state:
        raise DpfedError("this site holds no frozen factors for the run (no handshake); it needs a new handshake")
    if is_secure_round(msg):
        return _secure_train(msg, context, settings, run, cfg)
    # methods that fold into W0 (FedEx-LoRA, FLoRA) send the current frozen tensors with every round
    frozen_record = (msg.content.array_records[rec.FROZEN] if rec.FROZEN in msg.content.array_records
                     else context.state.array_records[rec.STATE_KEY])
    frozen = rec.from_record(frozen_record)
    if rec.digest(frozen) != run.frozen_sha256:
        raise DpfedError("frozen factors announced by the server differ from the ones this site received")
    global_state = rec.from_record(msg.content.array_records[rec.ARRAYS])
    ledger = Ledger(settings.ledger)
    site = build_site(cfg, settings, split_seed=run.split_seed, label_names=run.label_names, frozen=frozen,
                      noise_multiplier=run.noise_multiplier, round=run.server_round, ledger=ledger,
                      audit=audit_plan(cfg))
    _check_global(site, global_state)
    result = site.client.fit(site.model, global_state, round=run.server_round)  # budget check, K steps, ledger
    # from here on the round's events are in the site's ledger: a failure below can only over-count
    delta = site.cfg.privacy.delta if site.client.dp is not None else None
    content = rec.reply_record(state=result.state, site_id=settings.site_id, server_round=run.server_round,
                               num_examples=result.num_examples, events=[event_to_dict(e) for e in result.events],
                               steps=result.steps, epsilon_spent=_spent(ledger, settings.site_id, delta))
    return Message(content, reply_to=msg)


def _secure_train(msg: Message, context: Context, settings, run: rec.RunMessage, cfg) -> Message:
    """A secure round: this site's message (event in its ledger first) as the input ``secaggplus_mod`` masks."""
    import json

    from accounting.events import event_to_dict
    from accounting.ledger import Ledger
    from dpfed.errors import DpfedError
    from dpfed.flower.secure_codec import secaggplus_params, to_secagg
    from dpfed.flower.secure_round import SECURE_ENCODING, global_state_of, secure_reply
    from dpfed.flower.site import build_site
    from dpfed.privacy import new_seed
    from dpfed.release import release
    from dpfed.secure_encoding import SecureEncoding
    from dpfed.seeds import secure_generators

    frozen = rec.from_record(context.state.array_records[rec.STATE_KEY])
    if rec.digest(frozen) != run.frozen_sha256:
        raise DpfedError("frozen factors announced by the server differ from the ones this site received")
    try:
        encoding = SecureEncoding.from_public(json.loads(str(msg.content.config_records[FIT_CONFIG][SECURE_ENCODING])))
    except (KeyError, TypeError, ValueError) as exc:
        raise DpfedError(f"a secure round must carry the public secure encoding, got none usable ({exc})") from None
    params = secaggplus_params(bits=encoding.bits, max_sites=encoding.max_sites)
    global_state = global_state_of(msg.content)
    ledger = Ledger(settings.ledger)
    site = build_site(cfg, settings, split_seed=run.split_seed, label_names=run.label_names, frozen=frozen,
                      noise_multiplier=run.noise_multiplier, round=run.server_round, ledger=ledger,
                      audit=audit_plan(cfg), secure=encoding)
    _check_global(site, global_state)
    seed = settings.seed if settings.seed is not None else new_seed()  # as build_site: the site's own seed
    sample, noise, rounding = secure_generators(seed, settings.index, run.server_round,
                                                history=len(ledger.events(settings.site_id)))
    site.client.sample_generator = sample
    sent = site.client.secure_message(site.model, global_state, round=run.server_round, rounding_generator=rounding,
                                      noise_generator=noise)  # budget check; event fsynced before it returns
    events = [event_to_dict(e) for e in sent.events]
    spent = _spent(ledger, settings.site_id, site.cfg.privacy.delta)
    release("site_reply", {"message": sent.message, "site_id": settings.site_id, "round": run.server_round,
                           "events": events, "epsilon_spent": spent}, unit="record")
    content = secure_reply(to_secagg(sent.message.numpy(), params=params), site_id=settings.site_id,
                           server_round=run.server_round, events=events, epsilon_spent=spent)
    return Message(content, reply_to=msg)


@app.query("dp_init")
@_refusing("the DP initialisation")
def dp_init(msg: Message, context: Context, settings, run: rec.RunMessage) -> Message:
    """``init: dp``: the site's clipped, noised gradient sum of the adapted base weights (its ledger first)."""
    from accounting.events import event_to_dict
    from accounting.ledger import Ledger
    from dpfed.errors import DpfedError
    from dpfed.flower.site import build_site
    from dpfed.adapters.lorasb import load_trainable_state
    from dpfed.setup import dp_init_params

    cfg = _server_config(run)
    if rec.STATE_KEY not in context.state:
        raise DpfedError("this site holds no frozen factors for the run (no handshake); it needs a new handshake")
    frozen = rec.from_record(context.state.array_records[rec.STATE_KEY])
    ledger = Ledger(settings.ledger)
    # round 0: the generators the in-process DP initialisation derives for this site
    site = build_site(cfg, settings, split_seed=run.split_seed, label_names=run.label_names, frozen=frozen,
                      noise_multiplier=run.noise_multiplier, round=0, ledger=ledger, audit=audit_plan(cfg))
    state = rec.from_record(msg.content.array_records[rec.ARRAYS])  # the server's head (and R = 0)
    _check_global(site, state)
    load_trainable_state(site.model, state)
    params = dp_init_params(site.cfg)
    sums = site.client.init_contribution(site.model, site.method.layers, params=params,
                                         sample_generator=site.client.sample_generator,
                                         noise_generator=site.client.noise_generator)  # event appended before return
    delta = site.cfg.privacy.delta
    content = rec.reply_record(state=sums, site_id=settings.site_id, server_round=0,
                               num_examples=site.client.num_examples,
                               events=[event_to_dict(site.client.init_event(params))], steps=0,
                               epsilon_spent=_spent(ledger, settings.site_id, delta))
    return Message(content, reply_to=msg)


def _check_global(site, state) -> None:
    """The server's global state must fit this model and be finite (a site checks what it receives)."""
    import torch

    from dpfed.adapters.lorasb import trainable_state
    from dpfed.errors import DpfedError

    own = trainable_state(site.model)
    if set(own) != set(state) or any(tuple(own[k].shape) != tuple(state[k].shape) for k in own):
        raise DpfedError("the server's global state must match this site's trainable parameters (names and shapes)")
    if not all(torch.isfinite(v).all() for v in state.values()):
        raise DpfedError("the server's global state must be finite, got NaN or inf")
