"""The release boundary: every field that leaves a site or lands in a file an operator may share.

A reviewer lists everything dpfed releases by reading this one file. Each field of each
channel is declared with its *basis*:

- ``noised``: the output of an accounted mechanism whose event is in the ledger before release
  (the global state; a site's DP-SGD update);
- ``post-processing``: a function of noised values and public values only (accuracy of the
  released model on the evaluator's test split, ε derived from the ledger's events);
- ``public``: public by an explicit declaration that the README repeats (a site's record count,
  the configured schedule, the payload size fixed by the manifest);
- ``timing``: wall-clock seconds; a side channel that the guarantee does not cover (README);
- ``site-local``: never released. It may only go to the site's own mode-0600 diagnostics file
  (:func:`write_site_local`), which the README marks as outside the guarantee.

A field may also be released only under some privacy units: under client-level DP
(DP-FedAvg) which sites were Poisson-sampled, how many were, and anything computed from a
single site's un-noised update are withheld, since publishing them undoes the amplification
by sampling that the client-level accountant claims.

:func:`release` is the only way a metrics line, a summary or a site reply is assembled: an
undeclared field raises :class:`ReleaseError` (a bug, never silently written), a site-local
field raises too, and a field not releasable under the run's unit is dropped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = ["Basis", "Field", "ReleaseError", "CHANNELS", "release", "declared", "write_site_local", "SITE_LOCAL_DIR"]

SITE_LOCAL_DIR = "site-local"  # in-process runs: one mode-0600 file per simulated site under this folder


class Basis(str, Enum):
    NOISED = "noised"
    POST = "post-processing"
    PUBLIC = "public"
    TIMING = "timing"
    SITE_LOCAL = "site-local"


class ReleaseError(RuntimeError):
    """A value was about to leave through the boundary without a declaration (a bug, not a user error)."""


ALL_UNITS = frozenset({"none", "record", "client", "both"})
NOT_CLIENT = frozenset({"none", "record"})  # withheld whenever a client-level guarantee is claimed


@dataclass(frozen=True)
class Field:
    """One declared field: its basis, why it is safe, and the privacy units under which it is released."""

    name: str
    basis: Basis
    why: str
    units: frozenset = ALL_UNITS


def _table(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


_EVAL = "the released (noised) global state evaluated on the evaluator's test split, which is never trained on"
_EPS = "the accountant's upper bound over the ledger's events (σ, q = b/n, counts: public values)"

METRICS = _table(
    Field("round", Basis.PUBLIC, "the configured schedule"),
    Field("clients", Basis.PUBLIC, "sites chosen by the server's seed without looking at data (record level); "
          "withheld under client-level DP: it would reveal which sites were Poisson-sampled", NOT_CLIENT),
    Field("accuracy", Basis.POST, _EVAL),
    Field("eval_loss", Basis.POST, _EVAL),
    Field("epsilon_spent", Basis.POST, _EPS),
    Field("client_level_epsilon", Basis.POST, _EPS + " (server ledger)"),
    Field("bytes_up", Basis.PUBLIC, "payload size fixed by the manifest × the sites chosen (record level); withheld "
          "under client-level DP: it reveals how many sites were sampled", NOT_CLIENT),
    Field("bytes_down", Basis.PUBLIC, "as bytes_up", NOT_CLIENT),
    Field("bytes_up_per_site", Basis.PUBLIC, "payload size of one upload, fixed by the manifest"),
    Field("aggregation_error", Basis.POST, "computed from the sites' noised states (record level); withheld under "
          "client-level DP, where the sites' states are not noised at the client level", NOT_CLIENT),
    Field("seconds", Basis.TIMING, "wall time of the round"),
    Field("flower_bytes_up", Basis.PUBLIC, "Flower message sizes of fixed-shape float32 arrays", NOT_CLIENT),
    Field("sites_rejected", Basis.PUBLIC, "sites whose reply failed the server's checks (availability, not record "
          "values)", NOT_CLIENT),
    Field("sites_refused", Basis.PUBLIC, "sites that refused the round (their budget: a function of public events)",
          NOT_CLIENT),
    Field("sites_failed", Basis.PUBLIC, "sites that did not answer in time (availability)", NOT_CLIENT),
    Field("secure_sites", Basis.PUBLIC, "secure aggregation: how many site messages the sum holds (availability)",
          NOT_CLIENT),
    Field("round_discarded", Basis.PUBLIC, "secure aggregation: why the round's sum was not released (fewer than "
          "min_sites messages: availability), or null", NOT_CLIENT),
    Field("train_loss", Basis.SITE_LOCAL, "un-noised loss of the sampled records: one outlier moves it without bound"),
    Field("client_update_norms", Basis.SITE_LOCAL, "raw norms of single sites' updates"),
)

SITE_REPLY = _table(
    Field("state", Basis.NOISED, "the site's state after K DP-SGD steps (clipped, Gaussian noise, event in the "
          "site's ledger before the reply)"),
    Field("site_id", Basis.PUBLIC, "the site's name"),
    Field("client_id", Basis.PUBLIC, "the site's name (in-process)"),
    Field("round", Basis.PUBLIC, "the server's round"),
    Field("num_examples", Basis.PUBLIC, "the site's record count, public by declaration (q = b / n needs it)"),
    Field("events", Basis.PUBLIC, "the mechanisms' parameters (σ, q, count): public values"),
    Field("steps", Basis.PUBLIC, "the configured local steps"),
    Field("epsilon_spent", Basis.POST, _EPS),
    Field("message", Basis.NOISED, "secure aggregation: the site's clipped, integer-encoded gradient sum plus its "
          "Skellam share, modulo 2^bits (event in the site's ledger before it leaves); only secure aggregation "
          "reads it, the server sees the sum of all messages"),
    Field("sampled", Basis.SITE_LOCAL, "the realised Poisson sample count"),
    Field("mean_loss", Basis.SITE_LOCAL, "un-noised loss of the sampled records"),
)

_CONF = "the run configuration or a value derived from it and the public record counts"
SUMMARY = _table(*(
    [Field(n, Basis.PUBLIC, _CONF) for n in (
        "method", "privacy", "privacy_unit", "epsilon_target", "delta", "accountant", "noise_multiplier", "clip",
        "rounds_planned", "local_steps", "batch_size", "clients", "clients_per_round", "init", "noise", "rank",
        "payload_values", "payload_formula", "framing_bytes", "trainable_params", "adapted_layers", "device", "seed",
        "test_examples", "bytes_up_per_client_round", "bytes_down_per_client_round")]
    + [
        Field("epsilon_spent", Basis.POST, _EPS),
        Field("epsilon_per_client", Basis.POST, _EPS),
        Field("client_level", Basis.POST, "the client-level ε from the server ledger, and its configuration"),
        Field("sample_rates", Basis.PUBLIC, "q = b / n from the public record counts"),
        Field("client_sizes", Basis.PUBLIC, "each site's record count, public by declaration"),
        Field("rounds_completed", Basis.PUBLIC, "how far the schedule went; a budget stop depends on public events only"),
        Field("stop_reason", Basis.PUBLIC, "completed, or the budget refusal (public events)"),
        Field("resumed", Basis.PUBLIC, "the round a resumed run restarted from and the ledger's record count"),
        Field("init_info", Basis.POST, "the initialisation: from declared public data, data-free, or the noised "
              "DP initialisation"),
        Field("initial_eval", Basis.POST, "the initial state (public or noised) on the evaluator's test split"),
        Field("accuracy", Basis.POST, _EVAL),
        Field("eval_loss", Basis.POST, _EVAL),
        Field("accuracy_before", Basis.POST, "the initial state on the evaluator's test split"),
        Field("aggregation_error", Basis.POST, "from the sites' noised states (record level)", NOT_CLIENT),
        Field("aggregation_error_max", Basis.POST, "as aggregation_error", NOT_CLIENT),
        Field("data_fingerprints", Basis.PUBLIC, "hashes of the test split and the declared public data"),
        Field("wall_seconds", Basis.TIMING, "wall time of training"),
        Field("setup_seconds", Basis.TIMING, "wall time of setup"),
        Field("flower", Basis.PUBLIC, "the Flower deployment: sites, timeouts, and the count of failed replies"),
        Field("secure_aggregation", Basis.PUBLIC, "secure aggregation's public encoding (dimension, scale, bits, "
              "rotation seed, sensitivities, μ, min_sites): from the configuration and the public record counts"),
        Field("epsilon_colluding_server", Basis.POST, _EPS + ", with each site's own Skellam share alone "
              "(μ / min_sites): the ε if secure aggregation were broken"),
        Field("rounds_discarded", Basis.PUBLIC, "secure aggregation: rounds whose sum held fewer than min_sites "
              "messages (availability) and was not released"),
    ]))

CHECKPOINT = _table(
    Field("round", Basis.PUBLIC, "the schedule"),
    Field("ledger_head", Basis.TIMING, "hash of the ledger: public mechanism parameters and the wall-clock time "
          "of each append"),
    Field("server_ledger_head", Basis.TIMING, "as ledger_head, for the server ledger"),
    Field("config_sha256", Basis.PUBLIC, "hash of the configuration"),
    Field("ledger_keyed", Basis.PUBLIC, "whether the site's ledger lines carry an HMAC"),
)

CHANNELS: dict[str, dict[str, Field]] = {"metrics": METRICS, "site_reply": SITE_REPLY, "summary": SUMMARY,
                                         "checkpoint": CHECKPOINT}


def unit_of(cfg) -> str:
    """The privacy unit a run claims: ``none``, ``record``, ``client`` or ``both``."""
    return cfg.privacy.unit if cfg.privacy.enabled else "none"


def declared(channel: str, name: str) -> Field:
    """The declaration of ``name`` on ``channel``; :class:`ReleaseError` if there is none."""
    try:
        return CHANNELS[channel][name]
    except KeyError:
        raise ReleaseError(f"{channel} field {name!r} is not declared in dpfed.release: declare its basis "
                           f"(noised, post-processing, public, timing) before releasing it") from None


def release(channel: str, values: Mapping[str, Any], *, unit: str) -> dict[str, Any]:
    """Check ``values`` against ``channel``'s declarations and return what may leave under ``unit``.

    An undeclared or site-local field raises :class:`ReleaseError`; a field withheld under
    ``unit`` is dropped (the declaration says why). Order is kept.
    """
    if unit not in ALL_UNITS:
        raise ReleaseError(f"unit must be one of {sorted(ALL_UNITS)}, got {unit!r}")
    out: dict[str, Any] = {}
    for name, value in values.items():
        f = declared(channel, name)
        if f.basis is Basis.SITE_LOCAL:
            raise ReleaseError(f"{channel} field {name!r} is site-local ({f.why}); it may only go to the site's own "
                               "diagnostics file")
        if unit in f.units:
            out[name] = value
    return out


def comparable(channel: str, names: Iterable[str]) -> list[str]:
    """Fields that must be byte-identical between neighbouring datasets (not noised, post-processed or timing)."""
    return [n for n in names if declared(channel, n).basis is Basis.PUBLIC]


def write_site_local(path: Path, values: Mapping[str, Any]) -> None:
    """Append one line of a site's own diagnostics to ``path`` (created mode 0600, folder 0700).

    These values (a site's own training loss, its realised sample count) are NOT differentially
    private; the file is for the site's operator and must not be shared (README, privacy model).
    """
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(json.dumps(dict(values)) + "\n")
