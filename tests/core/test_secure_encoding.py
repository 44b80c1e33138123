"""The integer encoding for secure aggregation: exact integer sums, exact rotation, rounding bound, no overflow, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard as scipy_hadamard

from accounting import skellam
from dpfed import secure_encoding as se
from dpfed.errors import ConfigError
from dpfed.privacy import make_generator


def clipped_rows(n: int, dim: int, clip: float, seed: int) -> torch.Tensor:
    g = make_generator(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    norms = torch.rand(n, 1, generator=g, dtype=torch.float64) * clip  # norms in [0, clip]
    return x / x.norm(dim=1, keepdim=True) * norms


def encoding(**kw) -> se.SecureEncoding:
    base = {"dim": 100, "clip": 1.0, "scale": 64.0, "rotation_seed": 11, "mu_total": 400.0, "min_sites": 3, "max_sites": 4,
                "max_records": 50}
    return se.SecureEncoding.plan(**{**base, **kw})


# -- rotation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_the_orthonormal_sylvester_matrix(n):
    x = torch.randn(3, n, generator=make_generator(n), dtype=torch.float64)
    h = torch.from_numpy(scipy_hadamard(n).astype(np.float64)) / math.sqrt(n)
    torch.testing.assert_close(se.hadamard(x), x @ h.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(se.hadamard(se.hadamard(x)), x, rtol=0, atol=1e-12)


def test_rotation_is_orthonormal_and_its_inverse_exact():
    d = se.padded_dim(1000)
    assert d == 1024 and se.padded_dim(1024) == 1024 and se.padded_dim(1) == 1
    signs = se.rotation_signs(d, seed=5)
    assert set(signs.tolist()) == {-1.0, 1.0}
    assert torch.equal(signs, se.rotation_signs(d, seed=5)) and not torch.equal(signs, se.rotation_signs(d, seed=6))
    x = torch.randn(4, d, generator=make_generator(0), dtype=torch.float64)
    y = se.rotate(x, signs=signs)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), rtol=1e-13, atol=0)
    torch.testing.assert_close(se.unrotate(y, signs=signs), x, rtol=0, atol=1e-12)
    # the rotation spreads a spike: e_0 becomes +-1/sqrt(d) everywhere
    spike = torch.zeros(d, dtype=torch.float64)
    spike[0] = 1.0
    torch.testing.assert_close(se.rotate(spike, signs=signs).abs(), torch.full((d,), d**-0.5, dtype=torch.float64))


# -- rounding -----------------------------------------------------------------------------------
def test_rounded_sensitivity_hand_values():
    """dim 1500 -> d = 2048, c = 256: c^2 + d/4 + sqrt(2 log(1/e^-0.5)) (c + sqrt(d)/2) = 65536 + 512 + 278.63."""
    s = se.rounded_sensitivity(dim=1500, clip=1.0, scale=256.0)
    assert (s.padded_dim, s.l2_squared) == (2048, 66326)
    assert s.l1 == pytest.approx(min(math.sqrt(2048 * 66326), 66326))
    det = se.rounded_sensitivity(dim=1500, clip=1.0, scale=256.0, rounding_beta=0.0)
    assert det.l2_squared == math.floor((256 + math.sqrt(2048)) ** 2)
    assert se.choose_scale(clip=1.0, dim=1500, max_inflation=0.01) == 256.0  # sqrt(66326) / 256 = 1.006; 128 gives 1.017


def test_conditional_rounding_respects_the_bound_and_is_nearly_unbiased():
    d, c = 16, 6.0
    x = clipped_rows(1, d, 1.0, seed=3)
    x = (x / x.norm() * c).repeat(20000, 1)  # one point, many independent roundings
    bound = se.rounded_sensitivity(dim=d, clip=1.0, scale=c).l2_squared
    v = se.conditional_round(x, l2_squared=bound, generator=make_generator(4))
    assert v.dtype == torch.int64 and int((v * v).sum(1).max()) <= bound
    assert float((v.double() - x).abs().max()) < 1.0  # floor or ceiling only
    torch.testing.assert_close(v.double().mean(0), x[0], rtol=0, atol=0.03)  # std of a mean <= 0.5 / sqrt(2e4)


def test_conditional_rounding_rejects_until_the_bound_holds():
    d = 64
    x = torch.full((500, d), 0.5, dtype=torch.float64)  # ||x||^2 = 16; unconditioned rounding gives ~ Bin(64, 1/2)
    v = se.conditional_round(x, l2_squared=28, generator=make_generator(5))  # about 10 % of draws pass
    assert int((v * v).sum(1).max()) <= 28
    with pytest.raises(ConfigError, match="after 5 draws"):
        se.conditional_round(x[:1], l2_squared=2, generator=make_generator(5), max_tries=5)  # P(pass) ~ 1e-16


# -- the exact integer identity -----------------------------------------------------------------
def site_pieces(enc, sizes, seed=0):
    sums, shares, messages, rows = [], [], [], []
    for k, b in enumerate(sizes):
        x = clipped_rows(b, enc.dim, enc.clip, seed=seed + 10 * k)
        s = se.encode_site_sum(x, encoding=enc, generator=make_generator(seed + 10 * k + 1))
        z = se.noise_share(encoding=enc, generator=make_generator(seed + 10 * k + 2))
        sums.append(s), shares.append(z), rows.append(x)
        messages.append(se.site_message(s, z, encoding=enc))
    return sums, shares, messages, rows


def test_decoded_sum_is_the_sum_of_encoded_site_sums_plus_the_summed_noise_exactly():
    enc = encoding()
    sums, shares, messages, _ = site_pieces(enc, [7, 0, 12])
    assert all(int(m.min()) >= 0 and int(m.max()) < enc.modulus for m in messages)
    total = se.secure_sum(messages, encoding=enc)
    expected = sum(sums) + sum(shares)  # plain int64, no modulus
    assert torch.equal(se.centered(total, bits=enc.bits), expected)
    # decoding is the float image of that integer vector: divide by the scale, rotate back, unpad
    signs = se.rotation_signs(enc.padded_dim, seed=enc.rotation_seed)
    torch.testing.assert_close(se.decode(total, encoding=enc),
                               se.unrotate(expected.double() / enc.scale, signs=signs)[: enc.dim], rtol=0, atol=1e-12)


def test_each_record_contributes_exactly_its_own_bounded_vector():
    enc = encoding()
    x = clipped_rows(9, enc.dim, enc.clip, seed=1)
    v = se.encode_records(x, encoding=enc, generator=make_generator(2))
    assert int((v * v).sum(1).max()) <= enc.sensitivity.l2_squared
    assert float(v.abs().sum(1).max()) <= enc.sensitivity.l1
    assert torch.equal(se.encode_site_sum(x, encoding=enc, generator=make_generator(2)), v.sum(0))
    # without noise the decoded sum is the float sum up to rounding: each record moves by < sqrt(d) / scale
    total = se.secure_sum([se.site_message(v.sum(0), torch.zeros_like(v[0]), encoding=enc)] * 3, encoding=enc)
    err = (se.decode(total, encoding=enc) - 3 * x.sum(0)).norm()
    assert err <= 3 * 9 * math.sqrt(enc.padded_dim) / enc.scale


def test_same_seeds_same_messages():
    enc = encoding()
    a = site_pieces(enc, [5, 5], seed=3)[2]
    b = site_pieces(enc, [5, 5], seed=3)[2]
    assert all(torch.equal(p, q) for p, q in zip(a, b))


# -- overflow ---------------------------------------------------------------------------------------
def worst_case_sum(enc, records, sites):
    """Every record maps onto +scale*clip at coordinate 0 after rotation; every share pushes coordinate 0 upwards."""
    d, signs = enc.padded_dim, se.rotation_signs(enc.padded_dim, seed=enc.rotation_seed)
    spike = torch.zeros(d, dtype=torch.float64)
    spike[0] = enc.clip
    x = se.unrotate(spike, signs=signs)[: enc.dim]  # a clipped gradient whose rotation is the spike
    assert enc.dim == d and abs(float(x.norm()) - enc.clip) < 1e-12  # no padding dropped: x rotates onto the spike
    return x.expand(records, -1).clone() * (1 - 1e-12), sites


def test_no_overflow_at_the_stated_bounds():
    enc = se.SecureEncoding.plan(dim=64, clip=1.0, scale=32.0, rotation_seed=3, mu_total=100.0, min_sites=2,
                                 max_sites=3, max_records=40)
    m = enc.margin()
    assert m.margin >= 0 and m.half_range == 2 ** (enc.bits - 1) - 1 and m.signal == 40 * math.isqrt(
        enc.sensitivity.l2_squared)
    assert m.signal + m.noise > 2 ** (enc.bits - 2) - 1  # one bit fewer would not do
    with pytest.raises(ConfigError, match=rf"bits={enc.bits - 1} is too small.*need bits >= {enc.bits}"):
        se.SecureEncoding(bits=enc.bits - 1, **{k: getattr(enc, k) for k in (
            "dim", "clip", "scale", "rotation_seed", "mu_total", "min_sites", "max_sites", "max_records")})
    x, sites = worst_case_sum(enc, 40, 3)
    v = se.encode_records(x, encoding=enc, generator=make_generator(0))
    assert int(v[:, 0].min()) >= 31  # ~ scale * clip = 32 on the spike coordinate
    big_noise = torch.zeros(enc.padded_dim, dtype=torch.int64)
    big_noise[0] = m.noise // sites  # the largest noise the bound allows, all on the spike, same sign
    msgs = [se.site_message(v.sum(0) if k == 0 else torch.zeros_like(big_noise), big_noise, encoding=enc)
            for k in range(sites)]
    total = se.secure_sum(msgs, encoding=enc)
    assert int(se.centered(total, bits=enc.bits)[0]) == int(v[:, 0].sum()) + sites * (m.noise // sites)
    se.decode(total, encoding=enc)  # no ModularWrapError


def test_a_wrapped_sum_is_detected():
    enc = se.SecureEncoding.plan(dim=64, clip=1.0, scale=32.0, rotation_seed=3, mu_total=100.0, min_sites=1,
                                 max_sites=1, max_records=4)
    x, _ = worst_case_sum(enc, 1, 1)
    v = se.encode_records(x, encoding=enc, generator=make_generator(0))[0]
    copies = enc.modulus // 2 // int(v[0]) + 1  # far more records than max_records: coordinate 0 passes m/2
    msg = se.site_message(copies * v, torch.zeros_like(v), encoding=enc)
    total = se.secure_sum([msg], encoding=enc)
    assert int(se.centered(total, bits=enc.bits)[0]) < 0  # wrapped to the negative end
    with pytest.raises(se.ModularWrapError, match="wrapped around"):
        se.decode(total, encoding=enc)


def test_skellam_tail_bound_holds_empirically_and_matches_the_gaussian_for_large_variance():
    variance = 50.0
    t = se.noise_bound(variance=variance, d=1, overflow_beta=1e-3)  # P(|Sk| >= t) <= 1e-3
    g = make_generator(9)
    rate = torch.full((200000,), variance / 2, dtype=torch.float64)
    z = torch.poisson(rate, generator=g) - torch.poisson(rate, generator=g)
    assert float((z.abs() >= t).double().mean()) <= 1e-3
    # for large variance the Chernoff exponent approaches the Gaussian -t^2 / (2 V)
    assert se.skellam_log_tail(5e3, 1e6) == pytest.approx(-(5e3**2) / 2e6, rel=2e-3)


# -- noise ------------------------------------------------------------------------------------------
def test_noise_of_the_sum_matches_the_calibration():
    enc = se.SecureEncoding.plan(dim=4000, clip=1.0, scale=16.0, rotation_seed=0, mu_total=900.0, min_sites=4,
                                 max_sites=4, max_records=10)
    assert enc.mu_site == 225.0
    shares = [[se.noise_share(encoding=enc, generator=make_generator(100 * r + k)) for k in range(4)] for r in range(10)]
    draws = torch.stack([sum(round_shares) for round_shares in shares]).double()  # (10, 4096): 10 sums of 4 shares
    assert abs(float(draws.var()) / 900.0 - 1.0) < 0.03  # 40960 samples: the variance's relative std is 0.7 %
    assert abs(float(draws.mean())) < 0.5
    # in float units after decoding: the same noise divided by the scale (the inverse rotation keeps i.i.d. noise i.i.d.)
    zero = torch.zeros(enc.padded_dim, dtype=torch.int64)
    total = se.secure_sum([se.site_message(zero, z, encoding=enc) for z in shares[0]], encoding=enc)
    assert float(se.decode(total, encoding=enc).std()) == pytest.approx(enc.noise_std(4), rel=0.05)  # 30 / 16


def test_sensitivity_feeds_the_skellam_accountant():
    enc = encoding(dim=1500, scale=256.0, max_records=1000)
    sens = enc.sensitivity
    mu = skellam.calibrate_mu(target_epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=100,
                              l2_sensitivity=sens.l2, l1_sensitivity=sens.l1)
    ready = encoding(dim=1500, scale=256.0, max_records=1000, mu_total=mu)
    assert ready.noise_std(ready.min_sites) == pytest.approx(math.sqrt(mu) / 256.0)
    assert 0.5 < math.sqrt(mu) / sens.l2 < 3  # a noise multiplier in the usual range


# -- refusals ---------------------------------------------------------------------------------------
def test_too_few_or_too_many_sites_are_refused():
    enc = encoding()
    _, _, messages, _ = site_pieces(enc, [3, 3, 3, 3])
    with pytest.raises(se.TooFewSitesError, match="min_sites=3"):
        se.secure_sum(messages[:2], encoding=enc)
    with pytest.raises(ConfigError, match="max_sites=4"):
        se.secure_sum(messages + messages[:1], encoding=enc)


@pytest.mark.parametrize("kw, match", [
    ({"max_sites": 2}, "max_sites must be >= min_sites"),
    ({"clip": 0.0}, "clip"),
    ({"mu_total": -1.0}, "mu_total"),
    ({"rotation_seed": -1}, "rotation_seed"),
    ({"max_records": 10**14}, "MAX_BITS|bits must be <= 53"),
])
def test_invalid_encodings_name_the_parameter(kw, match):
    with pytest.raises(ConfigError, match=match):
        encoding(**kw)


def test_unclipped_rows_are_refused():
    enc = encoding()
    x = clipped_rows(2, enc.dim, 1.0, seed=0)
    x[1] *= 1.5 / float(x[1].norm())
    with pytest.raises(ConfigError, match="clipped to norm <= clip"):
        se.encode_records(x, encoding=enc, generator=make_generator(0))
    with pytest.raises(ConfigError, match=r"shape \(B, 100\)"):
        se.encode_records(x[:, :50], encoding=enc, generator=make_generator(0))
