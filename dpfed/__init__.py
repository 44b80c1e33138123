"""dpfed: differentially private federated fine-tuning with Fed-SB (LoRA-SB).

The pieces a researcher calls, importable from here (each is defined, and documented, in the
module named beside it; they load on first use, so ``import dpfed`` does not import torch):

One client's DP-SGD step (record-level DP; the unit of privacy is one record of one client):

- :class:`Client` (``dpfed.client``): a site's local rounds; it appends each round's events to
  its ledger before it returns the update. :class:`LocalTraining` says how it trains.
- :class:`DPSGDParams`, :func:`poisson_sample`, :func:`per_sample_gradients`,
  :func:`clipped_sum`, :func:`noised_mean` (``dpfed.privacy``): the step itself, piece by piece.
- :class:`PerSampleModule`, :class:`PerSampleLinear`, :func:`per_sample_mode`
  (``dpfed.persample``): per-sample gradients without hooks, and the base class a new
  trainable layer derives from.

Aggregation (``dpfed.aggregation``): :class:`FedSBAggregator` (exact mean of ``R`` and the head),
:class:`ClientLevelDP` (DP-FedAvg around it; client-level DP with a trusted aggregator).

Accounting (``accounting``): :class:`PoissonGaussianEvent`, :class:`GaussianEvent`,
:func:`epsilon` (PRV bracket; report ``upper``), :class:`Ledger` (on disk, crash-safe),
:class:`MemoryLedger` (in memory, not durable), :func:`spent`.

Planning: :func:`calibrate_noise` (smallest σ for a target ε, with fresh accountants).

Whole runs (``dpfed.runner``): :func:`prepare` (validate a ``dpfed.config.RunConfig`` and build
the job) and :func:`run` (train and write the run directory).

Audit: :func:`audit_run` (``attacks.audit``; membership-inference audit of a finished run). It
lives in the ``attacks`` package, which imports ``dpfed``; no ``dpfed`` module imports it.
"""

from __future__ import annotations

from importlib import import_module

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing; type checkers take it as true

__version__ = "0.1.0"

# name → module that defines it; resolved on first attribute access (PEP 562)
_EXPORTS: dict[str, str] = {
    # one client's step
    "Client": "dpfed.client",
    "LocalTraining": "dpfed.client",
    "DPSGDParams": "dpfed.privacy",
    "poisson_sample": "dpfed.privacy",
    "per_sample_gradients": "dpfed.privacy",
    "clipped_sum": "dpfed.privacy",
    "noised_mean": "dpfed.privacy",
    "PerSampleModule": "dpfed.persample",
    "PerSampleLinear": "dpfed.persample",
    "per_sample_mode": "dpfed.persample",
    # aggregation
    "FedSBAggregator": "dpfed.aggregation",
    "ClientLevelDP": "dpfed.aggregation",
    # accounting
    "PoissonGaussianEvent": "accounting.events",
    "GaussianEvent": "accounting.events",
    "epsilon": "accounting.prv",
    "Ledger": "accounting.ledger",
    "MemoryLedger": "accounting.ledger",
    "spent": "accounting.ledger",
    # planning
    "calibrate_noise": "accounting.planning",
    # whole runs
    "prepare": "dpfed.runner",
    "run": "dpfed.runner",
    # audit
    "audit_run": "attacks.audit",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing below runs at import
    from accounting.events import GaussianEvent, PoissonGaussianEvent
    from accounting.ledger import Ledger, MemoryLedger, spent
    from accounting.planning import calibrate_noise
    from accounting.prv import epsilon
    from attacks.audit import audit_run
    from dpfed.aggregation import ClientLevelDP, FedSBAggregator
    from dpfed.client import Client, LocalTraining
    from dpfed.persample import PerSampleLinear, PerSampleModule, per_sample_mode
    from dpfed.privacy import DPSGDParams, clipped_sum, noised_mean, per_sample_gradients, poisson_sample
    from dpfed.runner import prepare, run


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dpfed' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
