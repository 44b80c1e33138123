"""Canary clients: an empirical check of a client-level (DP-FedAvg) claim.

Andrew et al., "One-shot empirical privacy estimation for federated learning" (arXiv 2302.03098,
Alg. 1): ``K`` canary clients are added to the population. Each holds a fixed random unit
direction ``c_k`` over all trainable numbers and, whenever it is sampled, submits the update
``S · c_k`` (norm S, the clip: the largest update a real client can make). After training, the
statistic is ``cos(c_k, θ_final − θ_0)``. A canary that never took part has a direction
independent of the model, so its cosine has the exact null density ∝ (1 − t²)^{(d−3)/2}, i.e.
``(t + 1) / 2 ~ Beta((d−1)/2, (d−1)/2)`` (Andrew et al., Sec. 3). We use the one-run design of
Steinke, Nasr & Jagielski (arXiv 2305.08846): each canary client is in the population with
probability 1/2 (the secret bit), guesses on the ``k`` largest and ``k`` smallest cosines give an
ε lower bound by the same exact p-value procedure as the record-level audit; Andrew et al.'s
Gaussian estimate ``μ̂ = mean(cos_in) · √d`` (the null's std is ≈ 1/√d) turned into ε at δ by
μ-GDP is reported next to it as an *estimate*, not a bound.

Canary clients hold no data and spend nothing; the server's accounting is unchanged because a
canary is just one more client of the population, sampled at the same rate q.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CANARY_CLIENTS_FILE = "canary_clients.json"


@dataclass(frozen=True)
class CanaryClients:
    """``K`` unit directions over the flattened trainable state (sorted names) and the secret bits."""

    directions: torch.Tensor  # (K, d) float64, unit rows
    included: tuple[bool, ...]
    names: tuple[str, ...]
    seed: int

    @property
    def k(self) -> int:
        return len(self.included)


def flatten(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    return torch.cat([state[n].detach().double().flatten().cpu() for n in names])


def make_canary_clients(*, k: int, state: dict[str, torch.Tensor], seed: int) -> CanaryClients:
    """Directions from ``seed`` (Gaussian, normalised: uniform on the sphere), then the bits from a second stream."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        from dpfed.errors import ConfigError

        raise ConfigError(f"canary_clients must be an integer >= 2, got {k!r}")
    names = tuple(sorted(state))
    d = sum(state[n].numel() for n in names)
    dir_ss, bits_ss = np.random.SeedSequence(seed).spawn(2)
    g = np.random.default_rng(dir_ss).standard_normal((k, d))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    bits = tuple(bool(b) for b in np.random.default_rng(bits_ss).random(k) < 0.5)
    return CanaryClients(torch.from_numpy(g), bits, names, seed)


def canary_state(global_state: dict[str, torch.Tensor], canaries: CanaryClients, index: int, *,
                 clip: float) -> dict[str, torch.Tensor]:
    """What canary client ``index`` submits: ``global + S · c_k`` in the state's layout."""
    out, offset = {}, 0
    c = canaries.directions[index]
    for n in canaries.names:
        t = global_state[n]
        out[n] = (t.double() + clip * c[offset:offset + t.numel()].reshape(t.shape).to(t.device)).to(t.dtype)
        offset += t.numel()
    return out


def save(path: Path, canaries: CanaryClients) -> None:
    """Only the seed and bits: the directions are regenerated from the seed (they are large)."""
    path.write_text(json.dumps({"format": "dpfed-canary-clients/1", "seed": canaries.seed, "k": canaries.k,
                                "included": list(canaries.included), "names": list(canaries.names)}, indent=1) + "\n")
    path.chmod(0o600)


def load(path: Path, state: dict[str, torch.Tensor]) -> CanaryClients:
    data = json.loads(path.read_text())
    made = make_canary_clients(k=int(data["k"]), state=state, seed=int(data["seed"]))
    if list(made.included) != data["included"] or list(made.names) != data["names"]:
        from dpfed.errors import DataError

        raise DataError(f"{path}: the recorded bits or names do not match the ones its seed regenerates")
    return made


def null_cdf(t: np.ndarray, d: int) -> np.ndarray:
    """CDF of cos(c, v) for c uniform on the unit sphere of R^d and any fixed v: (t+1)/2 ~ Beta((d−1)/2, (d−1)/2)."""
    from scipy.stats import beta

    a = (d - 1) / 2
    return beta.cdf((np.asarray(t) + 1) / 2, a, a)


def audit(canaries: CanaryClients, *, theta0: dict[str, torch.Tensor], theta_final: dict[str, torch.Tensor],
          delta: float, confidence: float, k_fraction: float = 0.1) -> dict[str, Any]:
    """Cosines, the one-run ε lower bound, Andrew et al.'s ε estimate, and a check of the null."""
    from scipy.stats import kstest

    from attacks import metrics as mt

    diff = flatten(theta_final, canaries.names) - flatten(theta0, canaries.names)
    d = diff.numel()
    norm = float(diff.norm())
    cos = (canaries.directions @ diff / (norm if norm > 0 else 1.0)).numpy()
    bits = np.asarray(canaries.included, dtype=bool)
    k = max(1, int(math.floor(k_fraction * canaries.k)))
    one_run = mt.one_run_audit(scores=cos, included=bits, k_plus=k, k_minus=k, delta=delta, confidence=confidence)
    ceiling = mt.one_run_ceiling(m=canaries.k, r=2 * k, delta=delta, confidence=confidence)
    out_cos = cos[~bits]
    null_p = float(kstest(out_cos, lambda t: null_cdf(t, d)).pvalue) if len(out_cos) > 1 else None
    mu = float(np.mean(cos[bits]) * math.sqrt(d)) if bits.any() else 0.0
    eps_est = mt.gdp_epsilon(mu=max(mu, 0.0), delta=delta) if mu > 0 else 0.0
    return {
        "method": "canary clients (Andrew et al. 2023) with the one-run guesses of Steinke et al. 2023",
        "canary_clients": canaries.k, "included": int(bits.sum()), "dimension": d, "guesses": int(one_run["r"]),
        "correct": int(one_run["v"]), "k_plus": k, "k_minus": k,
        "epsilon_lower_bound": float(one_run["epsilon_lower_bound"]), "epsilon_lower_bound_ceiling": ceiling,
        "mean_cos_included": float(np.mean(cos[bits])) if bits.any() else None,
        "mean_cos_excluded": float(np.mean(out_cos)) if len(out_cos) else None,
        "null_std": 1 / math.sqrt(d), "null_ks_p_value": null_p,
        "gaussian_mu_estimate": mu, "epsilon_estimate": eps_est,
        "cosines": cos.tolist(),
    }
