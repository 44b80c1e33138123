"""Our integer messages through SecAgg+'s own quantize / mask / sum / dequantize arithmetic (flwr 1.42), exactly.

No deployment: the site half and the server half below are the statements of
``secaggplus_mod._collect_masked_vectors`` and ``SecAggPlusWorkflow.unmask_stage`` (checked
against the installed source by ``test_the_replayed_statements_are_flowers``), calling flwr's
own quantize, dequantize, mask generator and modular arithmetic.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.common.secure_aggregation import ndarrays_arithmetic as arith
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from dpfed import secure_encoding as se
from dpfed.errors import ConfigError
from dpfed.flower import secure_codec as codec
from dpfed.privacy import make_generator


def site_upload(arrays, *, num_examples, clipping_range, target_range, mod_range, max_weight, private_seed, pair_seeds,
                nid):
    """secaggplus_mod._collect_masked_vectors, from 'ratio = ...' to the final parameters_mod."""
    ratio = num_examples / max_weight
    q_ratio = round(ratio * target_range)
    dq_ratio = q_ratio / target_range
    parameters = arith.parameters_multiply(arrays, dq_ratio)
    quantized = quantize(parameters, clipping_range, target_range)
    quantized = arith.factor_combine(q_ratio, quantized)
    dims = [a.shape for a in quantized]
    quantized = arith.parameters_addition(quantized, pseudo_rand_gen(private_seed, mod_range, dims))
    for other, seed in pair_seeds.items():
        mask = pseudo_rand_gen(seed, mod_range, dims)
        quantized = (arith.parameters_addition(quantized, mask) if nid > other
                     else arith.parameters_subtraction(quantized, mask))
    return arith.parameters_mod(quantized, mod_range)


def server_unmask(uploads, private_seeds, *, clipping_range, quantization_range, mod_range):
    """collect_masked_vectors_stage's sum and unmask_stage's reconstruction (no dropouts: pairwise masks cancel)."""
    masked = uploads[0]
    for up in uploads[1:]:
        masked = arith.parameters_addition(masked, up)
    masked = arith.parameters_mod(masked, mod_range)
    for seed in private_seeds:
        masked = arith.parameters_subtraction(masked, pseudo_rand_gen(seed, mod_range, arith.get_parameters_shape(masked)))
    recon = arith.parameters_mod(masked, mod_range)
    q_total_ratio, recon = arith.factor_extract(recon)
    inv_dq_total_ratio = quantization_range / q_total_ratio
    aggregated = dequantize(recon, clipping_range, quantization_range)
    offset = -(len(uploads) - 1) * clipping_range
    for vec in aggregated:
        vec += offset
        vec *= inv_dq_total_ratio
    return aggregated


def run_secaggplus(arrays_per_site, *, clipping_range, quantization_range, modulus_range, max_weight, num_examples):
    k = len(arrays_per_site)
    private = [bytes([i + 1]) * 32 for i in range(k)]
    pair = {(i, j): bytes([100 + 10 * i + j]) * 32 for i in range(k) for j in range(k) if i < j}
    uploads = [site_upload(arrays, num_examples=num_examples, clipping_range=clipping_range,
                           target_range=quantization_range, mod_range=modulus_range, max_weight=max_weight,
                           private_seed=private[i], nid=i,
                           pair_seeds={j: pair[min(i, j), max(i, j)] for j in range(k) if j != i})
               for i, arrays in enumerate(arrays_per_site)]
    return server_unmask(uploads, private, clipping_range=clipping_range, quantization_range=quantization_range,
                         mod_range=modulus_range)


def through_secaggplus(messages, params):
    kw = dict(params.workflow_kwargs(), num_examples=codec.SECAGG_NUM_EXAMPLES)
    return run_secaggplus([codec.to_secagg(m, params=params) for m in messages], **kw)


# -- tests -----------------------------------------------------------------------------------------
def test_the_replayed_statements_are_flowers():
    """A tripwire: if flwr changes these lines, the exactness argument (module docstring) must be re-checked."""
    # importlib: the package re-exports a function under the module's name
    secaggplus_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    secaggplus_workflow = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

    site = inspect.getsource(secaggplus_mod._collect_masked_vectors)
    for line in ("ratio = num_examples / state.max_weight", "q_ratio = round(ratio * state.target_range)",
                 "dq_ratio = q_ratio / state.target_range", "parameters = parameters_multiply(parameters, dq_ratio)",
                 "parameters, state.clipping_range, state.target_range",
                 "quantized_parameters = factor_combine(q_ratio, quantized_parameters)",
                 "quantized_parameters = parameters_mod(quantized_parameters, state.mod_range)"):
        assert line in site, line
    server = inspect.getsource(secaggplus_workflow.SecAggPlusWorkflow.unmask_stage)
    for line in ("q_total_ratio, recon_parameters = factor_extract(recon_parameters)",
                 "inv_dq_total_ratio = state.quantization_range / q_total_ratio",
                 "offset = -(len(active_nids) - 1) * state.clipping_range", "vec += offset",
                 "vec *= inv_dq_total_ratio"):
        assert line in server, line


def test_integer_messages_of_three_sites_round_trip_exactly():
    bits = 28
    params = codec.secaggplus_params(bits=bits, max_sites=3)
    assert (params.clipping_range, params.quantization_range, params.modulus_range) == (2.0**27, 2**28, 2**32)
    rng = np.random.default_rng(0)
    extremes = np.array([0, 1, 2**27 - 1, 2**27, 2**27 + 1, 2**28 - 1], dtype=np.int64)
    messages = [np.concatenate([extremes, rng.integers(0, 2**bits, size=4090, dtype=np.int64)]) for _ in range(3)]
    got = codec.from_secagg(through_secaggplus(messages, params), params=params, num_sites=3)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, sum(messages) % 2**bits)


def test_global_numpy_rng_state_does_not_matter():
    params = codec.secaggplus_params(bits=20, max_sites=4)
    messages = [np.random.default_rng(s).integers(0, 2**20, size=512) for s in range(4)]
    results = []
    for seed in (0, 1):
        np.random.seed(seed)  # test-only: SecAgg+'s stochastic rounding draws from the global numpy RNG
        results.append(codec.from_secagg(through_secaggplus(messages, params), params=params, num_sites=4))
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], sum(messages) % 2**20)


def test_secure_encoding_end_to_end_through_secaggplus_equals_the_in_process_sum():
    enc = se.SecureEncoding.plan(dim=300, clip=1.0, scale=64.0, rotation_seed=1, mu_total=500.0, min_sites=2,
                                 max_sites=3, max_records=200)
    params = codec.secaggplus_params(bits=enc.bits, max_sites=enc.max_sites)
    messages = []
    for k in range(3):
        g = make_generator(k)
        x = torch.randn(20, 300, generator=g, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True) * 0.8
        messages.append(se.site_message(se.encode_site_sum(x, encoding=enc, generator=g),
                                        se.noise_share(encoding=enc, generator=make_generator(10 + k)), encoding=enc))
    in_process = se.secure_sum(messages, encoding=enc)
    flower = codec.from_secagg(through_secaggplus([m.numpy() for m in messages], params), params=params, num_sites=3)
    np.testing.assert_array_equal(flower, in_process.numpy())
    assert torch.equal(se.decode(torch.from_numpy(flower), encoding=enc), se.decode(in_process, encoding=enc))


def test_flowers_default_quantization_cannot_carry_the_integers():
    """clipping_range=8, quantization_range=2**22 saturate at +-8 and rescale: the sum is lost."""
    messages = [np.array([0, 5, 1000, 2**20], dtype=np.int64)] * 2
    out = run_secaggplus([[m.astype(np.float64)] for m in messages], clipping_range=8.0, quantization_range=2**22,
                         modulus_range=2**32, max_weight=1.0, num_examples=1)[0]
    assert out[2] == pytest.approx(8.0, abs=1e-5) and out[3] == pytest.approx(8.0, abs=1e-5)  # 1000 and 2**20 saturated


def test_a_wrong_site_count_is_refused():
    params = codec.secaggplus_params(bits=16, max_sites=4)
    messages = [np.random.default_rng(s).integers(0, 2**16, size=256) for s in range(3)]
    aggregated = through_secaggplus(messages, params)
    with pytest.raises(ConfigError, match="not integral"):
        codec.from_secagg(aggregated, params=params, num_sites=2)
    with pytest.raises(ConfigError, match=r"num_sites must be an integer in \[1, 4\]"):
        codec.from_secagg(aggregated, params=params, num_sites=5)


@pytest.mark.parametrize("kw, match", [
    ({"bits": 32, "max_sites": 1}, "bits must be <= 31"),
    ({"bits": 30, "max_sites": 4}, r"max_sites \* 2\*\*bits must be < modulus_range.*at most bits=29"),
    ({"bits": 20, "max_sites": 2, "modulus_range": 3 * 2**20}, "power of two"),
    ({"bits": 20, "max_sites": 2, "modulus_range": 2**33}, "power of two <= 2\\*\\*32"),
])
def test_parameters_secaggplus_cannot_carry_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        codec.secaggplus_params(**kw)


def test_messages_outside_the_range_are_refused():
    params = codec.secaggplus_params(bits=8, max_sites=2)
    with pytest.raises(ConfigError, match=r"\[0, 2\*\*8\)"):
        codec.to_secagg(np.array([256]), params=params)
    np.testing.assert_array_equal(codec.to_secagg(np.array([0, 127, 128, 255]), params=params)[0],
                                  [0.0, 127.0, -128.0, -1.0])


def test_flowers_mask_generator_folds_the_shared_secret_to_32_bits():
    """A finding, pinned: pseudo_rand_gen XORs the 32-byte secret down to a 32-bit RandomState seed, so two secrets
    with the same fold give the same mask. Each SecAgg+ mask has at most 2**32 values: a server that can search 2**32
    seeds may strip a site's one unknown pairwise mask (two sites) and read its message. That is the case the
    colluding-server epsilon (accounting.skellam.colluding_server_epsilon) is for."""
    a = bytes(range(32))
    b = bytes([a[0] ^ 0xFF, *a[1:4], a[4] ^ 0xFF, *a[5:]])  # flip the same bits in two 4-byte words: same XOR fold
    assert a != b
    np.testing.assert_array_equal(pseudo_rand_gen(a, 2**32, [(64,)])[0], pseudo_rand_gen(b, 2**32, [(64,)])[0])
