"""Every derived seed of a run, in one place: named streams instead of magic numbers.

A run has two roots. The *run seed* (the user's ``--seed``, or OS entropy that is never
recorded) drives sampling, noise, selection and initialisation; the *split seed* (derived
from a user seed, or drawn independently so that recording it reveals no noise) drives the
data split and everything an auditor must be able to rebuild (canaries, held-out records).
Each purpose is one stream; per-site and per-round streams append their indices. The numbers
are those the runner used before the streams had names, so fixed-seed runs are unchanged.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from dpfed.privacy import make_generator

__all__ = ["RunStream", "SplitStream", "child_seed", "secure_generators", "site_generators"]


class RunStream(IntEnum):
    """Streams derived from the run seed."""

    SPLIT = 1  # the split seed itself, when the run seed is the user's
    INIT = 2  # head and adapter initialisation; (INIT, 1): the DP init's SVD; (INIT, 2): PEFT's A
    SAMPLE = 3  # (SAMPLE, site, round, history): Poisson sampling of a site's records
    NOISE = 4  # (NOISE, site, round, history): a site's Gaussian noise
    SELECT = 5  # (SELECT, round): which sites train (fixed-size) or Poisson client sampling
    SERVER_NOISE = 6  # (SERVER_NOISE, round): the DP-FedAvg noise the server adds
    FLORA_A = 10  # (FLORA_A, round, layer): FLoRA's fresh A after each fold
    CANARY_CLIENT_SAMPLE = 12  # (CANARY_CLIENT_SAMPLE, round): Poisson sampling of the audit's canary clients


class SplitStream(IntEnum):
    """Streams derived from the split seed (what an auditor rebuilds)."""

    CANARIES = 6  # the audit's canaries (records or gradient coordinates) and their bits
    PLANT = 7  # where random-word canaries are planted
    ATTACK_RECORDS = 8  # members chosen for the membership attacks
    HOLDOUT = 9  # non-members set aside before the split
    CANARY_CLIENTS = 10  # the client-level audit's canary clients


def child_seed(seed: int, *path: int) -> int:
    """A 63-bit seed derived from ``seed`` along ``path`` (a stream, then its indices)."""
    return int(np.random.SeedSequence([int(seed), *(int(p) for p in path)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def site_generators(seed: int, index: int, rnd: int, *, history: int,
                    device: torch.device | str = "cpu") -> tuple[torch.Generator, torch.Generator]:
    """The sampling (CPU) and noise (``device``) generators of site ``index`` in round ``rnd``.

    ``history`` is how many records the site's own ledger holds before the round: mixing it in
    means a fixed seed never repeats its sampling and noise on the same ledger (a second run, or
    a round redone after a crash), while an in-process site and a Flower site with the same seed
    and ledger draw the same bits.
    """
    return (make_generator(child_seed(seed, RunStream.SAMPLE, index, rnd, history)),
            make_generator(child_seed(seed, RunStream.NOISE, index, rnd, history), device))


def secure_generators(seed: int, index: int, rnd: int, *,
                      history: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Site ``index``'s sampling, Skellam-noise and rounding generators (all CPU) for a secure round ``rnd``.

    The same draws for an in-process site and a Flower site with the same seed and ledger, so a
    Flower run under secure aggregation equals the in-process one.
    """
    sample, noise = site_generators(seed, index, rnd, history=history, device="cpu")
    return sample, noise, make_generator(child_seed(seed, RunStream.NOISE, index, rnd, history, 1))
