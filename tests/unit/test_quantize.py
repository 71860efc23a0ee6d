import numpy as np
import pytest

from hostagent import inputs, quantize


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8, 64])
def test_sum_of_quantized_never_overflows_and_meets_bound(world):
    rng = np.random.default_rng(world)
    block = 100
    xs = [(rng.standard_normal(1003) * 10.0 ** rng.integers(-20, 20)).astype(np.float32) for _ in range(world)]
    xs[0][:5] = np.float32(3.4e38)  # largest float32 magnitudes in one block
    e_max = np.max([quantize.block_exponents(x, block) for x in xs], axis=0)
    qs = [quantize.quantize(x, e_max, world, block) for x in xs]
    total = np.sum([q.astype(np.int64) for q in qs], axis=0)
    assert np.all(np.abs(total) <= 2**31 - 1)
    got = quantize.dequantize(total.astype(np.int32), e_max, world, block)
    ok, _ = inputs.check_sum(got, xs, block)
    assert ok


def test_zero_and_tiny_blocks():
    x = np.zeros(10, dtype=np.float32)
    x[7] = 1e-45  # subnormal
    e = quantize.block_exponents(x, 5)
    assert e[0] == quantize.ZERO_EXP
    q = quantize.quantize(x, e, 2, 5)
    assert quantize.dequantize(q, e, 2, 5)[7] == pytest.approx(1e-45, abs=1e-45)


def test_nan_is_refused():
    with pytest.raises(quantize.QuantizeError):
        quantize.block_exponents(np.array([1.0, np.nan], dtype=np.float32), 2)


def test_disagreeing_exponents_are_detected():
    x = np.array([1000.0], dtype=np.float32)
    with pytest.raises(quantize.QuantizeError):
        quantize.quantize(x, np.array([1], dtype=np.int32), 2, 1)


def test_check_sum_catches_an_error():
    xs = [inputs.make_input(1, r, 50, "int32") for r in range(3)]
    s = np.sum(xs, axis=0).astype(np.int32)
    assert inputs.check_sum(s, xs, 10) == (True, 0.0)
    s[3] += 1
    assert inputs.check_sum(s, xs, 10)[0] is False
    fs = [inputs.make_input(1, r, 50, "float32") for r in range(3)]
    f = np.sum(fs, axis=0, dtype=np.float64).astype(np.float32)
    assert inputs.check_sum(f, fs, 10)[0]
    f[0] += 0.01
    assert not inputs.check_sum(f, fs, 10)[0]


def _reference(x, e_max, world, block):
    """The float64 definition: rint(x * 2^(30 - headroom - e_max)) per block."""
    scale = np.repeat(np.ldexp(1.0, (30 - quantize.headroom_bits(world) - e_max).astype(np.int32)), block)[: x.size]
    return np.rint(x.astype(np.float64) * scale).astype(np.int32), scale


@pytest.mark.parametrize("n", [1, 799, 800, 801, 12345])
@pytest.mark.parametrize("world", [1, 3, 64])
def test_float32_path_equals_the_float64_definition(n, world):
    rng = np.random.default_rng(n * world)
    block = 800
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-40, 38, n)).astype(np.float32)
    x[:: 7] = 0
    x[-1] = np.float32(1e-45)  # subnormal
    e = quantize.block_exponents(x, block)
    want, scale = _reference(x, e, world, block)
    got = quantize.quantize(x, e, world, block)
    assert np.array_equal(got, want)
    # Dequantize: the nearest float32 of q / scale; a subnormal result may be one
    # rounding away (still far inside the error bound).
    q = (want.astype(np.int64) * world // max(1, world)).astype(np.int32)
    exact = (q.astype(np.float64) / scale).astype(np.float32)
    back = quantize.dequantize(q, e, world, block)
    normal = np.abs(exact) >= np.finfo(np.float32).tiny
    assert np.array_equal(back[normal], exact[normal])
    assert np.all(np.abs(back.astype(np.float64) - exact) <= 2.0**-149)


@pytest.mark.parametrize("n,block,cut", [(1, 800, 1), (2401, 800, 1), (2401, 800, 2), (10, 3, 2)])
def test_dequantize_rows_equals_dequantize(n, block, cut):
    rng = np.random.default_rng(n)
    q = rng.integers(-2**29, 2**29, n, dtype=np.int32)
    e = rng.integers(-20, 20, -(-n // block)).astype(np.int32)
    rows = np.zeros((len(e), block + 5), np.int32)[:, :block]  # strided, like the XDP path's rows
    flat = np.zeros(len(e) * block, np.int32)
    flat[:n] = q
    rows[...] = flat.reshape(len(e), block)
    pieces = [rows[:cut], rows[cut:]] if cut < len(e) else [rows]
    got = quantize.dequantize_rows(pieces, e, 4, n)
    assert got.shape == (n,) and np.array_equal(got, quantize.dequantize(q, e, 4, block))
