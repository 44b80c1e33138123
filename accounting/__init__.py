"""Privacy accounting: mechanism events, PRV/RDP bounds, append-only ledgers, planning.

- ``accounting.events``: immutable, validated, serialisable mechanism records
  (``PoissonGaussianEvent``, ``GaussianEvent``, ``FixedSizeGaussianEvent``) with a
  privacy unit (``"record"`` or ``"client"``); add/remove-one neighbouring relation.
- ``accounting.prv``: ``epsilon(events, *, delta, eps_error=None) -> EpsilonBound``, the
  PRV accountant's ``(lower, estimate, upper)`` bracket; report ``upper``.
- ``accounting.rdp``: ``epsilon(events, *, delta) -> float``, the looser but cheap RDP bound.
- ``accounting.ledger``: ``Ledger``, one crash-safe, hash-chained JSON-lines file for
  many clients; ``MemoryLedger``, the same interface and chain in memory (library use, not
  durable); ``spent(ledger, client, *, delta)``.
- ``accounting.planning``: ``calibrate_noise``, ``max_rounds``, ``epsilon_curve`` with
  fresh accountants (never a live ledger).

This package imports nothing from ``dpfed`` or ``attacks``, and importing it (or any of
its modules) does not import torch or prv-accountant; the latter is loaded on first use.
"""
