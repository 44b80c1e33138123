"""Carry the integer messages of :mod:`dpfed.secure_encoding` through Flower's SecAgg+ exactly.

How SecAgg+ treats values (flwr 1.42; ``flwr.client.mod.secaggplus_mod._collect_masked_vectors``,
``flwr.common.secure_aggregation.quantization``, ``SecAggPlusWorkflow.unmask_stage``), with R =
``clipping_range``, T = ``quantization_range``, M = ``modulus_range``, W = ``max_weight``:

- site: ``q_ratio = round(num_examples / W * T)``; the float arrays are multiplied by
  ``q_ratio / T``, clipped to ``[-R, R]``, shifted by ``+R``, multiplied by ``T / (2R)`` and
  stochastically rounded (``ceil`` to **int32**, then ``-1`` where ``np.random.rand() < ceil - x``:
  the *global* numpy RNG); ``q_ratio`` is prepended as one more entry; masks are added modulo M
  (mask entries come from ``randint(0, M - 1)``, i.e. [0, M-2]: never M-1).
- server: the masked vectors are summed modulo M and unmasked, giving
  ``S = sum_k quantized_k mod M`` and ``Q = sum_k q_ratio_k mod M``; it returns
  ``((S * 2R/T - R) - (K - 1) R) * T / Q`` with K the number of sites whose vectors are in the sum.

Exact transport of integer vectors ``u_k`` in ``[0, 2**bits)`` (:func:`secaggplus_params`):

- ``R = 2**(bits-1)``, ``T = 2**bits``: the quantizer ``T / (2R)`` is 1, so a float64 array of
  integers ``x`` in ``[-R, R-1]`` (the centred representative of ``u_k``, :func:`to_secagg`) is
  neither clipped nor scaled, ``x + R`` is an exact integer in ``[0, T)``, ``ceil`` leaves it,
  and stochastic rounding never moves it (``rand() < 0`` is impossible);
- ``W = 1`` and every site reports ``num_examples = 1``: ``q_ratio = T`` and the multiplier
  ``q_ratio / T`` is exactly 1.0;
- ``M = 2**32`` (the workflow's documented maximum) with ``max_sites * T < M``: then neither
  ``S = sum_k (x_k + R)`` nor ``Q = K T`` wraps, the server returns
  ``(sum_k x_k) / K`` in float64, and :func:`from_secagg` recovers ``sum_k x_k`` by multiplying by
  K and rounding (the float error is below 2**-18), then reduces it modulo ``2**bits``, which
  equals ``sum_k u_k mod 2**bits``, what :func:`dpfed.secure_encoding.secure_sum` returns.

Hence ``bits <= 31`` (the int32 cast) and ``max_sites * 2**bits < 2**32`` (e.g. at most 29 bits for
up to 7 sites, 28 for up to 15). Flower's defaults (``clipping_range=8``, ``quantization_range=2**22``) would saturate
every integer beyond +-8 and rescale the rest: they cannot carry the encoding.

Caller's contract: the site's ClientApp returns ``to_secagg(message)`` as its arrays in
**float64** (float32 holds integers exactly only below 2**24; :func:`dpfed.flower.records.to_record`
casts to float32, so do not route this payload through it) with ``num_examples = 1``; the
server passes the aggregated arrays and K (``len(results)`` in the strategy's ``aggregate_fit``)
to :func:`from_secagg`, checks K against ``min_sites`` (discarding the round below it) and
decodes with :func:`dpfed.secure_encoding.decode`. A wrong K that divides the true one by an
integer goes unnoticed here (the integrality check catches most others).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dpfed.errors import ConfigError

__all__ = [
    "FLOWER_MAX_MODULUS",
    "SECAGG_NUM_EXAMPLES",
    "SecAggPlusParams",
    "from_secagg",
    "secaggplus_params",
    "to_secagg",
]

#: ``SecAggPlusWorkflow``'s documented ceiling for ``modulus_range`` (its default, 2**32).
FLOWER_MAX_MODULUS = 2 ** 32
#: What every site reports as ``num_examples`` (with ``max_weight = 1``, the workflow's weight factor is exactly 1).
SECAGG_NUM_EXAMPLES = 1
_INT32_BITS = 31  # quantize() casts ceil(x + R) to int32: x + R < 2**31
_INTEGRAL_TOL = 1e-6


@dataclass(frozen=True)
class SecAggPlusParams:
    """The ``SecAggPlusWorkflow`` arguments under which it carries ``bits``-bit integers exactly (module docstring)."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    bits: int
    max_sites: int

    def workflow_kwargs(self) -> dict:
        """Keyword arguments for ``flwr.server.workflow.SecAggPlusWorkflow(num_shares=..., reconstruction_threshold=..., **these)``."""
        return {"clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
                "modulus_range": self.modulus_range, "max_weight": self.max_weight}


def secaggplus_params(*, bits: int, max_sites: int, modulus_range: int = FLOWER_MAX_MODULUS) -> SecAggPlusParams:
    """``R = 2**(bits-1)``, ``T = 2**bits``, ``W = 1`` and ``modulus_range``; refuses what SecAgg+ cannot carry exactly."""
    for name, value, low in (("bits", bits, 2), ("max_sites", max_sites, 1), ("modulus_range", modulus_range, 2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    bits, max_sites, modulus_range = int(bits), int(max_sites), int(modulus_range)
    if modulus_range & (modulus_range - 1) or modulus_range > FLOWER_MAX_MODULUS:
        raise ConfigError(f"modulus_range must be a power of two <= 2**32 (SecAgg+), got {modulus_range}")
    if bits > _INT32_BITS:
        raise ConfigError(f"bits must be <= {_INT32_BITS} for SecAgg+ (its quantizer casts to int32), got {bits}")
    if max_sites * (1 << bits) >= modulus_range:
        most = max((b for b in range(2, _INT32_BITS + 1) if max_sites << b < modulus_range), default=None)
        raise ConfigError(
            f"max_sites * 2**bits must be < modulus_range={modulus_range} so that SecAgg+'s summed weight "
            f"factor (max_sites * 2**bits) does not wrap; got max_sites={max_sites}, bits={bits} "
            f"(at most bits={most} for {max_sites} sites)")
    return SecAggPlusParams(clipping_range=float(1 << (bits - 1)), quantization_range=1 << bits,
                            modulus_range=modulus_range, max_weight=1.0, bits=bits, max_sites=max_sites)


def to_secagg(message: np.ndarray, *, params: SecAggPlusParams) -> list[np.ndarray]:
    """A site's message (int64 in ``[0, 2**bits)``, e.g. ``site_message(...).numpy()``) as SecAgg+'s float64 arrays.

    The centred representative in ``[-2**(bits-1), 2**(bits-1))``, one flat float64 array.
    """
    u = np.asarray(message)
    if u.ndim != 1 or not np.issubdtype(u.dtype, np.integer):
        raise ConfigError(f"message must be a 1-D integer array, got {u.dtype} of shape {u.shape}")
    if u.size and (int(u.min()) < 0 or int(u.max()) >= params.quantization_range):
        raise ConfigError(f"message entries must lie in [0, 2**{params.bits})")
    half = params.quantization_range // 2
    x = ((u.astype(np.int64) + half) % params.quantization_range) - half
    return [x.astype(np.float64)]


def from_secagg(aggregated: Sequence[np.ndarray], *, params: SecAggPlusParams, num_sites: int) -> np.ndarray:
    """The modular sum ``sum_k u_k mod 2**bits`` (int64) from what ``SecAggPlusWorkflow`` hands to ``aggregate_fit``.

    ``num_sites``: K, the number of sites whose vectors are in the sum (``len(results)``).
    Raises ``ConfigError`` if K is out of range or the values are not K-fold integral (a
    wrong K or different SecAgg+ parameters).
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, numbers.Integral) or not (
            1 <= num_sites <= params.max_sites):
        raise ConfigError(f"num_sites must be an integer in [1, {params.max_sites}], got {num_sites!r}")
    if len(aggregated) != 1:
        raise ConfigError(f"expected the one flat array to_secagg sends, got {len(aggregated)} arrays")
    y = np.asarray(aggregated[0], dtype=np.float64) * num_sites  # SecAgg+ returned sum_k x_k / K
    r = np.rint(y)
    if y.size and float(np.max(np.abs(y - r))) > _INTEGRAL_TOL:
        raise ConfigError(f"the aggregate times num_sites={num_sites} is not integral (max deviation "
                          f"{float(np.max(np.abs(y - r)))!r}): wrong num_sites or SecAgg+ parameters")
    return np.mod(r.astype(np.int64), params.quantization_range)
