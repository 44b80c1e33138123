"""Integer encoding for distributed DP with secure aggregation: rotation, scaling, conditional rounding, Skellam shares.

The scheme (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, arXiv 2102.06387, Sec. 4: flattening by a random
rotation, scaling, conditional randomized rounding, modular arithmetic; with the Skellam noise
of Agarwal, Kairouz, Liu, NeurIPS 2021, arXiv 2110.04995, in place of the discrete Gaussian),
for one DP-SGD step over K sites, with one change: rounding is per record, not per site
(below):

1. **Per record** (on the site): its clipped gradient ``g`` (``||g||_2 <= C``, flattened to
   ``dim`` floats) is padded with zeros to ``d = 2**k``, rotated by ``H D`` (``D``: random
   signs from a *public* seed shared by every site and the server; ``H``: the Walsh-Hadamard
   matrix scaled to be orthonormal), scaled by ``gamma`` and rounded to an integer vector ``v``
   by **conditional randomized rounding**: each coordinate goes to its floor or ceiling with
   the probability that keeps it unbiased, and the whole vector is re-drawn until
   ``||v||_2^2 <= l2_squared`` (an integer; :class:`RoundedSensitivity`).
2. **Site sum**: the site adds its records' integer vectors (exact int64 arithmetic) and its
   noise share ``Sk(mu_site)`` (``Poisson(mu_site/2) - Poisson(mu_site/2)`` per coordinate,
   drawn from an explicit ``torch.Generator``), and reduces modulo ``m = 2**bits``: the
   message in ``[0, m)`` (:func:`site_message`), the only thing that leaves the site.
3. **Secure aggregation** returns the messages' sum modulo ``m`` (:func:`secure_sum` is the
   in-process stand-in; :mod:`dpfed.flower.secure_codec` carries messages through Flower's
   SecAgg+ exactly).
4. **Decode** (server): centre into ``[-m/2, m/2)``, check for wrap-around, divide by
   ``gamma``, undo the rotation, drop the padding (:func:`decode`): the noisy sum of the clipped
   gradients in float units, with per-coordinate noise variance ``mu_total / gamma^2``
   (the Skellam noise is i.i.d. per coordinate, so the orthonormal inverse rotation keeps its
   covariance ``mu I``).

**Why each record is rounded, not the site's sum.** DP is record-level: adding or removing one
record must change the released integer sum by a vector of bounded norm. If a site rounded its
*sum*, one record would change the sum by at most ``gamma C`` before rounding, but the rounded
sums of the two neighbouring datasets differ by that change *plus* two independent rounding
errors, so the record-level sensitivity of the rounded sum is not ``gamma C`` and is not the
rounding bound either. Rounding each record's vector separately makes the record's
contribution to the integer sum *exactly* its own ``v`` (the other records' integer vectors
do not depend on it), so ``||v||_2^2 <= l2_squared`` is the L2 sensitivity (squared) and
``l1 = min(sqrt(d l2_squared), l2_squared)`` the L1 sensitivity (``|v_i| <= v_i^2`` for
integers) that :mod:`accounting.skellam` needs. The rejection step enforces the bound on
every record, so the sensitivity holds deterministically whatever the input (a gradient above
the clip norm is refused; the rounding bound's probability ``rounding_beta`` only sets how
often a draw is repeated). The rotation is norm-preserving and data-independent.

**No wrap-around.** Each coordinate of the integer sum is bounded by ``max_records *
floor(sqrt(l2_squared))`` (deterministic: ``|v_i| <= ||v||_2``) plus the noise, whose total
variance is at most ``max_sites * mu_site``; the noise bound ``t`` is the smallest integer with
``2 d P(Sk >= t) <= overflow_beta`` by the Chernoff bound of the Skellam distribution
(``P(Sk(V) >= t) <= exp(V (sqrt(1 + (t/V)^2) - 1) - t asinh(t/V))``, from its moment generating
function ``exp(V (cosh s - 1))``) and a union bound over coordinates and signs. ``bits`` is
refused (``ValueError`` naming it) unless ``signal + t <= m/2 - 1``; :meth:`SecureEncoding.margin`
reports the margin. :func:`decode` refuses a sum with a coordinate beyond ``signal + t``
(:class:`ModularWrapError`): at the stated bounds that happens with probability at most
``overflow_beta``, and a sum that wrapped by less than ``m/2 - signal - t`` is always caught.
Wrap-around is a utility failure, never a privacy one: the modular sum is post-processing of
the integer sum.

Caller's contract (what integration must pass):

- ``per_example``: the (B, dim) float tensor of one step's *clipped* per-example gradients of
  the site's Poisson sample (each row norm <= ``clip``; :func:`dpfed.privacy.clip_factors`
  scaling), flattened in a fixed parameter order that every site and the server share; B may
  be 0.
- ``rounding_generator`` / ``noise_generator``: CPU ``torch.Generator`` objects seeded from
  secret entropy (:func:`dpfed.privacy.new_seed`), never shared; ``rotation_seed`` is public.
- ``mu_total``: from :func:`accounting.skellam.calibrate_mu` with this encoding's
  :attr:`SecureEncoding.sensitivity`; ``min_sites``: the fewest sites whose shares must be in
  a released sum (fewer: :class:`TooFewSitesError`, discard the round); ``max_sites`` and
  ``max_records``: public upper bounds for the overflow analysis.

Not protected: timing (the number of rounding re-draws depends on the data), floating-point
attacks on the Poisson sampler, a server that lies about the public seed or parameters.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dpfed.errors import ConfigError, DpfedError

__all__ = [
    "DEFAULT_OVERFLOW_BETA",
    "DEFAULT_ROUNDING_BETA",
    "MAX_BITS",
    "ModularWrapError",
    "OverflowMargin",
    "RoundedSensitivity",
    "SecureEncoding",
    "TooFewSitesError",
    "centered",
    "choose_scale",
    "conditional_round",
    "decode",
    "encode_records",
    "encode_site_sum",
    "flatten_per_example",
    "unflatten",
    "hadamard",
    "noise_bound",
    "noise_share",
    "padded_dim",
    "rotate",
    "rotation_signs",
    "rounded_sensitivity",
    "secure_sum",
    "site_message",
    "skellam_log_tail",
    "unrotate",
]

#: Probability parameter of the conditional-rounding bound (Kairouz et al. use e^-0.5): a draw is
#: re-done with probability at most this, so a record needs at most 1 / (1 - beta) draws on average.
DEFAULT_ROUNDING_BETA = math.exp(-0.5)
#: Union-bounded probability that the summed noise pushes some coordinate past its bound.
DEFAULT_OVERFLOW_BETA = 2.0 ** -40
#: Largest modulus exponent: decoding divides in float64, exact for integers below 2**53.
MAX_BITS = 53
DEFAULT_MAX_TRIES = 1000


class ModularWrapError(DpfedError):
    """A decoded sum has a coordinate outside the range the encoding guarantees: it wrapped around (discard it)."""


class TooFewSitesError(DpfedError):
    """Fewer messages than ``min_sites``: the sum would carry too little noise and must not be released."""


# -- validation helpers ---------------------------------------------------------------------
def _int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _probability(value: object, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number in {'[0, 1)' if allow_zero else '(0, 1)'}, got {value!r}")
    value = float(value)
    if not ((0.0 <= value if allow_zero else 0.0 < value) and value < 1.0):
        raise ConfigError(f"{name} must be in {'[0, 1)' if allow_zero else '(0, 1)'}, got {value!r}")
    return value


def _cpu_generator(generator: object, name: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ConfigError(f"{name} must be a torch.Generator (no global RNG), got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ConfigError(f"{name} must be a CPU generator, got one on {generator.device}")
    return generator


# -- rotation -------------------------------------------------------------------------------
def padded_dim(dim: int) -> int:
    """The smallest power of two >= ``dim`` (the Walsh-Hadamard transform needs one)."""
    dim = _int(dim, "dim", 1)
    return 1 << (dim - 1).bit_length()


def rotation_signs(d: int, *, seed: int) -> torch.Tensor:
    """The public diagonal D: ``d`` float64 signs in {-1, +1} from ``seed`` (shared by every site and the server)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(_int(seed, "rotation_seed", 0))
    return torch.randint(0, 2, (d,), generator=g, dtype=torch.int64).to(torch.float64) * 2.0 - 1.0


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform ``H x / sqrt(n)`` over the last axis (n a power of two); its own inverse."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ConfigError(f"the Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        y = y.reshape(-1, n // (2 * h), 2, h)  # (rows, blocks, pair, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n))


def rotate(x: torch.Tensor, *, signs: torch.Tensor) -> torch.Tensor:
    """``H D x`` over the last axis (length d = len(signs))."""
    return hadamard(x * signs)


def unrotate(y: torch.Tensor, *, signs: torch.Tensor) -> torch.Tensor:
    """The exact inverse of :func:`rotate`: ``D H y`` (H is symmetric and orthonormal, D^2 = I)."""
    return hadamard(y) * signs


# -- sensitivity and sizing -------------------------------------------------------------------
@dataclass(frozen=True)
class RoundedSensitivity:
    """Sensitivities of the integer sum to one record, in integer units (what :mod:`accounting.skellam` takes).

    ``l2_squared``: the integer bound conditional rounding enforces on ``||v||_2^2``;
    ``l2 = sqrt(l2_squared)``; ``l1 = min(sqrt(padded_dim * l2_squared), l2_squared)``.
    """

    padded_dim: int
    l2_squared: int
    l2: float
    l1: float


def rounded_sensitivity(*, dim: int, clip: float, scale: float,
                        rounding_beta: float = DEFAULT_ROUNDING_BETA) -> RoundedSensitivity:
    """The conditional-rounding bound of Kairouz, Liu, Steinke 2021 (arXiv 2102.06387) for ``||x||_2 <= c = scale * clip``.

    Randomized rounding moves each of the d coordinates by less than 1, so ``||v|| <= c + sqrt(d)``
    always; with probability >= 1 - beta, ``||v||^2 <= c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)``.
    The bound used is the smaller one (the first alone when ``rounding_beta == 0``), squared
    and floored (``||v||^2`` is an integer); the same expression as tensorflow_federated's
    distributed_dp ``rounded_l2_norm_bound``. Privacy does not rest on the probability
    statement: :func:`conditional_round` enforces the bound on every record.
    """
    d = padded_dim(dim)
    c = _positive(scale, "scale") * _positive(clip, "clip")
    beta = _probability(rounding_beta, "rounding_beta", allow_zero=True)
    bound_sq = (c + math.sqrt(d)) ** 2
    if beta > 0:
        bound_sq = min(bound_sq, c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(d) / 2.0))
    l2_squared = math.floor(bound_sq)
    if l2_squared < 1:
        raise ConfigError(f"scale * clip is too small to encode anything (rounding bound {bound_sq!r} < 1)")
    return RoundedSensitivity(padded_dim=d, l2_squared=l2_squared, l2=math.sqrt(l2_squared),
                              l1=min(math.sqrt(d * l2_squared), float(l2_squared)))


def choose_scale(*, clip: float, dim: int, max_inflation: float = 0.01,
                 rounding_beta: float = DEFAULT_ROUNDING_BETA) -> float:
    """The smallest power of two ``scale`` whose rounded L2 sensitivity is within ``1 + max_inflation`` of ``scale * clip``.

    A power of two makes the decoding division exact. Larger scales cost bits (log2 scale)
    and nothing else.
    """
    clip = _positive(clip, "clip")
    inflation = _positive(max_inflation, "max_inflation")
    for k in range(-60, 61):
        scale = 2.0 ** k
        if scale * clip < 1.0:
            continue
        sens = rounded_sensitivity(dim=dim, clip=clip, scale=scale, rounding_beta=rounding_beta)
        if sens.l2 <= (1.0 + inflation) * scale * clip:
            return scale
    raise ConfigError(f"no power-of-two scale up to 2**60 keeps the rounding inflation below {max_inflation!r}")


def skellam_log_tail(t: float, variance: float) -> float:
    """Chernoff bound on log P(Sk >= t) for Skellam noise of variance V: ``V (sqrt(1 + (t/V)^2) - 1) - t asinh(t/V)``."""
    if variance <= 0:
        return 0.0 if t <= 0 else -math.inf
    r = t / variance
    return variance * (math.sqrt(1.0 + r * r) - 1.0) - t * math.asinh(r)


def noise_bound(*, variance: float, d: int, overflow_beta: float) -> int:
    """Smallest integer t with ``2 d exp(skellam_log_tail(t, variance)) <= overflow_beta`` (union bound over coordinates, signs)."""
    log_budget = math.log(overflow_beta) - math.log(2.0 * d)

    def ok(t: int) -> bool:
        return skellam_log_tail(float(t), variance) <= log_budget

    hi = max(1, int(math.sqrt(2.0 * max(variance, 1.0) * -log_budget)) + 1)
    while not ok(hi):
        hi *= 2
    lo = 0  # invariant: not ok(lo) or lo == 0, ok(hi)
    if ok(lo):
        return 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class OverflowMargin:
    """How far a summed coordinate can go (``signal + noise``) against the largest one the modulus holds (``half_range``).

    ``margin = half_range - signal - noise >= 0``; exceeded with probability at most ``failure_probability``.
    """

    signal: int
    noise: int
    half_range: int
    margin: int
    failure_probability: float


@dataclass(frozen=True)
class SecureEncoding:
    """The public parameters of one secure-aggregation step, shared by every site and the server.

    Keyword-only and validated on construction: ``bits`` too small for the stated bounds is
    refused with a ``ConfigError`` (a ``ValueError``) that says how many are needed.
    """

    dim: int  # length of the flat update (before padding)
    clip: float  # per-example L2 clip norm C, float units
    scale: float  # gamma: integer units per float unit (a power of two: exact decoding)
    bits: int  # modulus m = 2**bits
    rotation_seed: int  # public seed of the rotation's signs
    mu_total: float  # Skellam variance per coordinate of the summed noise (integer units), for min_sites shares
    min_sites: int  # fewest shares in a released sum
    max_sites: int  # most shares in a sum (overflow analysis)
    max_records: int  # most records whose vectors can enter one sum, over all sites (overflow analysis)
    rounding_beta: float = DEFAULT_ROUNDING_BETA
    overflow_beta: float = DEFAULT_OVERFLOW_BETA

    def __init__(self, *, dim: int, clip: float, scale: float, bits: int, rotation_seed: int, mu_total: float,
                 min_sites: int, max_sites: int, max_records: int, rounding_beta: float = DEFAULT_ROUNDING_BETA,
                 overflow_beta: float = DEFAULT_OVERFLOW_BETA) -> None:
        set_ = object.__setattr__
        set_(self, "dim", _int(dim, "dim", 1))
        set_(self, "clip", _positive(clip, "clip"))
        set_(self, "scale", _positive(scale, "scale"))
        set_(self, "bits", _int(bits, "bits", 2))
        set_(self, "rotation_seed", _int(rotation_seed, "rotation_seed", 0))
        set_(self, "mu_total", _positive(mu_total, "mu_total"))
        set_(self, "min_sites", _int(min_sites, "min_sites", 1))
        set_(self, "max_sites", _int(max_sites, "max_sites", 1))
        set_(self, "max_records", _int(max_records, "max_records", 1))
        set_(self, "rounding_beta", _probability(rounding_beta, "rounding_beta", allow_zero=True))
        set_(self, "overflow_beta", _probability(overflow_beta, "overflow_beta", allow_zero=False))
        if self.max_sites < self.min_sites:
            raise ConfigError(f"max_sites must be >= min_sites ({self.min_sites}), got {self.max_sites}")
        if self.bits > MAX_BITS:
            raise ConfigError(f"bits must be <= {MAX_BITS} (decoding divides in float64), got {self.bits}")
        if self.max_sites * (1 << self.bits) >= 1 << 63:
            raise ConfigError(f"max_sites * 2**bits must stay below 2**63 (int64 sums), got {self.max_sites} * 2**{self.bits}")
        if self.scale * self.clip >= 2.0 ** 40:
            raise ConfigError(f"scale * clip must be < 2**40 (float64 rounding keeps the fraction), got {self.scale * self.clip!r}")
        margin = self.margin()
        if margin.margin < 0:
            need = (margin.signal + margin.noise + 1).bit_length() + 1
            raise ConfigError(
                f"bits={self.bits} is too small: a summed coordinate can reach {margin.signal + margin.noise} "
                f"(signal {margin.signal} from max_records={self.max_records}, noise {margin.noise}), "
                f"more than 2**(bits-1) - 1 = {margin.half_range}; need bits >= {need}")

    @classmethod
    def plan(cls, *, dim: int, clip: float, scale: float, rotation_seed: int, mu_total: float, min_sites: int,
             max_sites: int, max_records: int, rounding_beta: float = DEFAULT_ROUNDING_BETA,
             overflow_beta: float = DEFAULT_OVERFLOW_BETA) -> SecureEncoding:
        """The encoding with the fewest ``bits`` that never wraps at the stated bounds."""
        kw = {"dim": dim, "clip": clip, "scale": scale, "rotation_seed": rotation_seed, "mu_total": mu_total,
                  "min_sites": min_sites, "max_sites": max_sites, "max_records": max_records, "rounding_beta": rounding_beta,
                  "overflow_beta": overflow_beta}
        sens = rounded_sensitivity(dim=dim, clip=clip, scale=scale, rounding_beta=rounding_beta)
        min_sites = _int(min_sites, "min_sites", 1)
        max_sites = _int(max_sites, "max_sites", 1)
        signal = _int(max_records, "max_records", 1) * math.isqrt(sens.l2_squared)
        noise = noise_bound(variance=max_sites * _positive(mu_total, "mu_total") / min_sites, d=sens.padded_dim,
                            overflow_beta=_probability(overflow_beta, "overflow_beta", allow_zero=False))
        return cls(bits=max(2, (signal + noise).bit_length() + 1), **kw)  # validates, and refuses > MAX_BITS

    # -- derived quantities --
    def to_public(self) -> dict[str, int | float]:
        """Every field, as the JSON object the server sends its sites (all public: config and record counts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_public(cls, fields: dict) -> SecureEncoding:
        """The encoding from :meth:`to_public`'s object, validated again on construction (a site checks what it gets)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(fields, dict) or sorted(fields) != sorted(names):
            got = sorted(fields) if isinstance(fields, dict) else type(fields).__name__
            raise ConfigError(f"secure encoding must carry exactly the fields {names}, got {got}")
        return cls(**fields)

    @property
    def sensitivity(self) -> RoundedSensitivity:
        """The record-level sensitivities of the integer sum (pass ``l2`` and ``l1`` to :mod:`accounting.skellam`)."""
        return rounded_sensitivity(dim=self.dim, clip=self.clip, scale=self.scale, rounding_beta=self.rounding_beta)

    @property
    def padded_dim(self) -> int:
        return padded_dim(self.dim)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def mu_site(self) -> float:
        """The variance of one site's share: ``mu_total / min_sites``."""
        return self.mu_total / self.min_sites

    def noise_std(self, sites: int) -> float:
        """Standard deviation per coordinate of the decoded sum's noise with ``sites`` shares, in float units."""
        return math.sqrt(sites * self.mu_site) / self.scale

    def margin(self) -> OverflowMargin:
        """The overflow analysis at the stated bounds (module docstring)."""
        signal = self.max_records * math.isqrt(self.sensitivity.l2_squared)
        noise = noise_bound(variance=self.max_sites * self.mu_site, d=self.padded_dim, overflow_beta=self.overflow_beta)
        half = (1 << (self.bits - 1)) - 1
        return OverflowMargin(signal=signal, noise=noise, half_range=half, margin=half - signal - noise,
                              failure_probability=self.overflow_beta)


# -- the flat layout every site and the server share -------------------------------------------
def flatten_per_example(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """Name → (B, *shape) per-example tensors as one (B, dim) float64 tensor, names in sorted order."""
    names = sorted(per_example)
    if not names:
        raise ConfigError("per_example must hold at least one parameter")
    b = per_example[names[0]].shape[0]
    return torch.cat([per_example[n].detach().reshape(b, -1).to("cpu", torch.float64) for n in names], dim=1)


def unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`flatten_per_example` for one vector: (dim,) → name → shape, names in sorted order."""
    out, start = {}, 0
    for n in sorted(shapes):
        size = math.prod(shapes[n])
        out[n] = flat[start:start + size].reshape(shapes[n])
        start += size
    if start != flat.numel():
        raise ConfigError(f"flat update must have {start} entries for these shapes, got {flat.numel()}")
    return out


# -- encoding ---------------------------------------------------------------------------------
def conditional_round(x: torch.Tensor, *, l2_squared: int, generator: torch.Generator,
                      max_tries: int = DEFAULT_MAX_TRIES) -> torch.Tensor:
    """Randomized rounding of each row of the (B, d) float64 ``x``, re-drawn until ``||row||_2^2 <= l2_squared``.

    Kairouz, Liu, Steinke 2021 (arXiv 2102.06387), conditional randomized rounding: ``floor(x) + Bernoulli(x - floor(x))``
    per coordinate (unbiased before the conditioning). Returns (B, d) int64. Raises
    ``ConfigError`` if a row still exceeds the bound after ``max_tries`` draws.
    """
    generator = _cpu_generator(generator, "generator")
    x = x.to(torch.float64)
    low = torch.floor(x)
    frac = x - low
    low = low.to(torch.int64)
    out = torch.empty_like(low)
    todo = torch.arange(x.shape[0])
    for _ in range(_int(max_tries, "max_tries", 1)):
        if todo.numel() == 0:
            return out
        draw = low[todo] + (torch.rand(frac[todo].shape, generator=generator, dtype=torch.float64) < frac[todo])
        ok = (draw * draw).sum(dim=1) <= l2_squared
        out[todo[ok]] = draw[ok]
        todo = todo[~ok]
    if todo.numel() == 0:
        return out
    raise ConfigError(f"conditional rounding: {todo.numel()} row(s) still above the L2 bound after {max_tries} draws "
                      "(is the input clipped to `clip`?)")


def encode_records(per_example: torch.Tensor, *, encoding: SecureEncoding, generator: torch.Generator,
                   max_tries: int = DEFAULT_MAX_TRIES) -> torch.Tensor:
    """Each record's integer vector: pad, rotate, scale, conditional rounding. (B, dim) float -> (B, padded_dim) int64."""
    if per_example.ndim != 2 or per_example.shape[1] != encoding.dim:
        raise ConfigError(f"per_example must have shape (B, {encoding.dim}), got {tuple(per_example.shape)}")
    x = per_example.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise ConfigError("per_example holds non-finite values")
    norms = x.norm(dim=1)
    if x.shape[0] and float(norms.max()) > encoding.clip * (1.0 + 1e-5):
        raise ConfigError(f"per_example rows must be clipped to norm <= clip={encoding.clip!r}, "
                          f"got a row of norm {float(norms.max())!r}")
    d = encoding.padded_dim
    x = torch.nn.functional.pad(x, (0, d - encoding.dim))  # (B, d)
    y = rotate(x, signs=rotation_signs(d, seed=encoding.rotation_seed)) * encoding.scale  # (B, d)
    return conditional_round(y, l2_squared=encoding.sensitivity.l2_squared, generator=generator, max_tries=max_tries)


def encode_site_sum(per_example: torch.Tensor, *, encoding: SecureEncoding, generator: torch.Generator,
                    max_tries: int = DEFAULT_MAX_TRIES) -> torch.Tensor:
    """The site's integer sum of its records' vectors, (padded_dim,) int64 (zeros for an empty sample)."""
    return encode_records(per_example, encoding=encoding, generator=generator, max_tries=max_tries).sum(dim=0)


def noise_share(*, encoding: SecureEncoding, generator: torch.Generator) -> torch.Tensor:
    """One site's Skellam share: ``Poisson(mu_site/2) - Poisson(mu_site/2)`` per coordinate, (padded_dim,) int64."""
    generator = _cpu_generator(generator, "generator")
    rate = torch.full((encoding.padded_dim,), encoding.mu_site / 2.0, dtype=torch.float64)
    a = torch.poisson(rate, generator=generator)
    b = torch.poisson(rate, generator=generator)
    return a.to(torch.int64) - b.to(torch.int64)


def site_message(int_sum: torch.Tensor, noise: torch.Tensor, *, encoding: SecureEncoding) -> torch.Tensor:
    """``(int_sum + noise) mod 2**bits``: (padded_dim,) int64 in [0, m), the only value a site hands to secure aggregation."""
    for name, t in (("int_sum", int_sum), ("noise", noise)):
        if t.dtype != torch.int64 or tuple(t.shape) != (encoding.padded_dim,):
            raise ConfigError(f"{name} must be an int64 tensor of shape ({encoding.padded_dim},), "
                              f"got {t.dtype} {tuple(t.shape)}")
    return torch.remainder(int_sum + noise, encoding.modulus)


def secure_sum(messages: Sequence[torch.Tensor], *, encoding: SecureEncoding) -> torch.Tensor:
    """What secure aggregation reveals: the messages' sum modulo 2**bits (the in-process stand-in).

    Refuses fewer than ``min_sites`` messages (:class:`TooFewSitesError`: discard the round) and
    more than ``max_sites`` (the overflow analysis would not hold).
    """
    if len(messages) < encoding.min_sites:
        raise TooFewSitesError(f"{len(messages)} site message(s), fewer than min_sites={encoding.min_sites}: "
                               "the sum would carry too little noise; discard the round")
    if len(messages) > encoding.max_sites:
        raise ConfigError(f"{len(messages)} site messages, more than max_sites={encoding.max_sites}")
    total = torch.zeros(encoding.padded_dim, dtype=torch.int64)
    for msg in messages:
        if msg.dtype != torch.int64 or tuple(msg.shape) != (encoding.padded_dim,):
            raise ConfigError(f"a message must be int64 of shape ({encoding.padded_dim},), got {msg.dtype} {tuple(msg.shape)}")
        if bool((msg < 0).any()) or bool((msg >= encoding.modulus).any()):
            raise ConfigError(f"a message must lie in [0, 2**{encoding.bits})")
        total = torch.remainder(total + msg, encoding.modulus)
    return total


def centered(total: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Map [0, 2**bits) to the centred representatives [-2**(bits-1), 2**(bits-1))."""
    half = 1 << (bits - 1)
    return torch.remainder(total + half, 1 << bits) - half


def decode(total: torch.Tensor, *, encoding: SecureEncoding) -> torch.Tensor:
    """The noisy sum of the clipped gradients, (dim,) float64, from the modular sum; :class:`ModularWrapError` if it wrapped."""
    if total.dtype != torch.int64 or tuple(total.shape) != (encoding.padded_dim,):
        raise ConfigError(f"total must be int64 of shape ({encoding.padded_dim},), got {total.dtype} {tuple(total.shape)}")
    c = centered(total, bits=encoding.bits)
    m = encoding.margin()
    limit = m.signal + m.noise
    worst = int(c.abs().max())
    if worst > limit:
        raise ModularWrapError(f"a summed coordinate decodes to magnitude {worst}, beyond the bound {limit} "
                               f"(signal {m.signal} + noise {m.noise}): the sum wrapped around 2**{encoding.bits}")
    y = c.to(torch.float64) / encoding.scale
    x = unrotate(y, signs=rotation_signs(encoding.padded_dim, seed=encoding.rotation_seed))
    return x[: encoding.dim]
