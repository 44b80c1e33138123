"""The audit plan an audited run is built with: dpfed's setup and round loop call it, never ``attacks`` directly.

:class:`CanaryAudit` implements :class:`dpfed.setup.AuditPlan` from a run configuration:
record canaries (gradient or random-word), the held-out non-members of the membership attacks,
and the client-level audit's canary clients. Every draw comes from the run's *split seed*
(streams in :class:`dpfed.seeds.SplitStream`), so ``dpfed audit`` can rebuild what it needs;
the files it writes are mode 0600.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attacks import canaries as record_canaries
from attacks import client_canaries
from dpfed.config import RunConfig
from dpfed.data import Splits
from dpfed.seeds import SplitStream, child_seed

__all__ = ["CanaryAudit", "audit_plan"]


class CanaryAudit:
    """The audit of one run configuration (``data.canaries``, ``data.canary_kind``, ``data.canary_clients``,
    ``data.audit_holdout``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def holdout_size(self, n_records: int) -> int:
        """Records set aside as attack non-members: ``data.audit_holdout``, or min(500, 5%) with canaries."""
        d = self.cfg.data
        return d.audit_holdout or (min(500, n_records // 20) if d.canaries else 0)

    def plant(self, splits: Splits, *, label_names: tuple[str, ...], tokenizer: Any, split_seed: int):
        """Random-word canaries, each planted with probability 1/2 into its site's shard."""
        d = self.cfg.data
        canaries = record_canaries.make_canaries(m=d.canaries, label_names=label_names or None,
                                                 num_clients=d.num_clients,
                                                 seed=child_seed(split_seed, SplitStream.CANARIES), tokenizer=tokenizer)
        return record_canaries.plant(splits, canaries, seed=child_seed(split_seed, SplitStream.PLANT)), canaries

    def attack_records(self, splits: Splits, *, heldout: Any, split_seed: int, canaries: Any):
        return record_canaries.choose_attack_records(splits, heldout=heldout, n=len(heldout), canaries=canaries,
                                                     seed=child_seed(split_seed, SplitStream.ATTACK_RECORDS))

    def gradient_canaries(self, shapes: dict[str, int], *, split_seed: int):
        """White-box (Dirac) canaries over the trainable coordinates, and each site's included ones."""
        d = self.cfg.data
        canaries = record_canaries.make_gradient_canaries(m=d.canaries, shapes=shapes, num_clients=d.num_clients,
                                                          seed=child_seed(split_seed, SplitStream.CANARIES))
        fixed = tuple(canaries.fixed_records(i, clip=self.cfg.privacy.clip) for i in range(d.num_clients))
        return canaries, fixed

    def canary_clients(self, state: dict[str, torch.Tensor], *, split_seed: int):
        """The client-level audit's canary clients (``data.canary_clients``), or None."""
        k = self.cfg.data.canary_clients
        if not k:
            return None
        return client_canaries.make_canary_clients(k=k, state=state,
                                                   seed=child_seed(split_seed, SplitStream.CANARY_CLIENTS))

    def canary_state(self, global_state: dict[str, torch.Tensor], clients: Any, k: int) -> dict[str, torch.Tensor]:
        return client_canaries.canary_state(global_state, clients, k, clip=self.cfg.privacy.client_clip)

    def save(self, run_dir: Path, *, canaries: Any, attack_records: Any, canary_clients: Any) -> None:
        if canaries is not None:
            record_canaries.save_canaries(run_dir / "canaries.json", canaries)
        if attack_records is not None:
            record_canaries.save_attack_records(run_dir / "attack_records.json", attack_records)
        if canary_clients is not None:
            client_canaries.save(run_dir / client_canaries.CANARY_CLIENTS_FILE, canary_clients)


def audit_plan(cfg: RunConfig) -> CanaryAudit | None:
    """The plan a configuration asks for, or None when it asks for no audit."""
    d = cfg.data
    return CanaryAudit(cfg) if (d.canaries or d.canary_clients or d.audit_holdout) else None
