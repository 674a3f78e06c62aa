"""TPU vector ops: stochastic_round, pack_elementwise, unpack_elementwise,
and gathers with indices known while tracing (take_along_axis butterflies).

References are NumPy: the neighbours of a value come from enumerating every
code of the target dtype (ml_dtypes); packed words are built with NumPy
shifts and masks.

Run:  python -m pytest tests/vector_rules_test.py -q
"""

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds, FI  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds, FI  # pylint: disable=g-import-not-at-top,unused-import

_SAMPLES = 64  # draws per value


def _codes(dtype) -> np.ndarray:
  """Every finite value of ``dtype``, sorted, as float64."""
  width = jnp.dtype(dtype).itemsize * 8
  codes = np.arange(2 ** width, dtype=f"uint{width}").view(jnp.dtype(dtype))
  with np.errstate(invalid="ignore"):  # NaN codes
    values = codes.astype(np.float64)
  return np.unique(values[np.isfinite(values)])


def _round_call(target):
  def kernel(x_ref, bits_ref, o_ref):
    o_ref[...] = pltpu.stochastic_round(x_ref[...], bits_ref[...],
                                        target_dtype=target)

  def call(x, bits):
    return pl.pallas_call(kernel, out_shape=sds(x.shape, target),
                          interpret=FI())(x, bits)
  return call


class StochasticRoundTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("bf16", jnp.bfloat16, 100.0),
      ("f8_e5m2", jnp.float8_e5m2, 100.0),
      ("f8_e4m3fn", jnp.float8_e4m3fn, 100.0),
      ("f8_e4m3b11fnuz", jnp.float8_e4m3b11fnuz, 10.0),
  )
  def test_neighbours_only_and_unbiased(self, target, scale):
    r = np.random.RandomState(0)
    values = (r.standard_normal((8, 128)) * scale / 3).astype(np.float32)
    values[0, :4] = [0.0, 1.0, -2.0, 0.5]  # representable: kept as is
    x = np.tile(values, (_SAMPLES, 1))
    bits = r.randint(0, 2 ** 32, size=x.shape, dtype=np.uint64).astype(
        np.uint32)
    out = np.asarray(self.variant(_round_call(target))(x, bits), np.float64)
    out = out.reshape(_SAMPLES, 8, 128)

    codes = _codes(target)
    v = values.astype(np.float64)
    hi = codes[np.clip(np.searchsorted(codes, v, side="left"), 0,
                       len(codes) - 1)]
    lo = codes[np.clip(np.searchsorted(codes, v, side="right") - 1, 0,
                       len(codes) - 1)]
    self.assertTrue(((out == lo) | (out == hi)).all(),
                    "a result is not one of the two neighbours")
    np.testing.assert_array_equal(out[:, 0, :4],
                                  np.tile(v[0, :4], (_SAMPLES, 1)))
    # Total bias over all values, in standard errors of the sample means.
    p = np.where(hi > lo, (v - lo) / np.where(hi > lo, hi - lo, 1), 0)
    variance = p * (1 - p) * (hi - lo) ** 2 / _SAMPLES
    z = (out.mean(0) - v).sum() / np.sqrt(variance.sum())
    self.assertLess(abs(z), 5.0)
    # Both directions occur: this is not round-to-nearest.
    self.assertGreater(float(((out != out[0]).any(0)).mean()), 0.5)

  def test_rejects_other_source_dtypes(self):
    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "stochastic_round from bfloat16"):
      _round_call(jnp.float8_e5m2)(jnp.ones((8, 128), jnp.bfloat16),
                                   jnp.zeros((8, 128), jnp.uint32))


def _pack_reference(xs, packed_dtype):
  """NumPy: xs[k]'s low bits (f32: as bf16) at bit offset k * width."""
  packed_bits = jnp.dtype(packed_dtype).itemsize * 8 if packed_dtype not in (
      jnp.int4, jnp.uint4) else 4
  width = xs[0].dtype.itemsize * 8
  word = np.zeros(xs[0].shape, np.uint64)
  for k, x in enumerate(xs):
    if x.dtype == np.float32:
      field = np.asarray(x.astype(jnp.bfloat16)).view(np.uint16)
    else:
      field = x.view(f"uint{width}") & ((1 << packed_bits) - 1)
    word |= field.astype(np.uint64) << np.uint64(k * packed_bits)
  return word.astype(f"uint{width}"), packed_bits


class PackTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_to_bf16", np.float32, jnp.bfloat16, 2),
      ("i32_to_i8", np.int32, jnp.int8, 4),
      ("i32_to_u8", np.int32, jnp.uint8, 4),
      ("i16_to_i8", np.int16, jnp.int8, 2),
      ("i32_to_i4", np.int32, jnp.int4, 8),
      ("i8_to_i4", np.int8, jnp.int4, 2),
  )
  def test_pack_then_unpack(self, dtype, packed_dtype, factor):
    r = np.random.RandomState(1)
    if dtype == np.float32:
      xs = [r.standard_normal((8, 128)).astype(dtype) for _ in range(factor)]
    else:
      info = np.iinfo(dtype)
      xs = [r.randint(info.min, info.max, size=(8, 128)).astype(dtype)
            for _ in range(factor)]
    width = np.dtype(dtype).itemsize * 8

    def kernel(*refs):
      in_refs, (word_ref, *unpacked_refs) = refs[:factor], refs[factor:]
      word = pltpu.pack_elementwise([r[...] for r in in_refs],
                                    packed_dtype=packed_dtype)
      word_ref[...] = word
      for k, ref in enumerate(unpacked_refs):
        ref[...] = pltpu.unpack_elementwise(
            word, index=k, packed_dtype=packed_dtype, unpacked_dtype=dtype)

    out_shape = [sds((8, 128), f"uint{width}")] + [sds((8, 128), dtype)] * factor
    call = lambda *xs: pl.pallas_call(kernel, out_shape=out_shape,
                                      interpret=FI())(*xs)
    word, *unpacked = self.variant(call)(*xs)
    expected_word, packed_bits = _pack_reference(xs, packed_dtype)
    np.testing.assert_array_equal(np.asarray(word), expected_word)
    for k, (x, u) in enumerate(zip(xs, unpacked, strict=True)):
      if dtype == np.float32:
        expected = np.asarray(x.astype(jnp.bfloat16)).astype(np.float32)
      else:
        field = (expected_word.astype(np.int64) >> (k * packed_bits)) & (
            (1 << packed_bits) - 1)
        signed = jnp.issubdtype(packed_dtype, jnp.signedinteger)
        if signed:
          field = np.where(field >= 1 << (packed_bits - 1),
                           field - (1 << packed_bits), field)
        expected = field.astype(dtype)
      np.testing.assert_array_equal(np.asarray(u), expected, err_msg=f"{k=}")


def _take_call(index_fn, axis):
  """A kernel that permutes x with take_along_axis(x, index_fn(iota))."""
  def kernel(x_ref, o_ref):
    x = x_ref[...]
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    o_ref[...] = jnp.take_along_axis(x, index_fn(iota), axis=axis)

  def call(x):
    return pl.pallas_call(kernel, out_shape=sds(x.shape, x.dtype),
                          interpret=FI())(x)
  return call


class StaticGatherTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("lane_xor_1", lambda i: i ^ 1, 1, True),
      ("lane_xor_64", lambda i: i ^ 64, 1, True),
      ("lane_xor_5", lambda i: i ^ 5, 1, True),
      ("sublane_xor_4", lambda i: i ^ 4, 0, True),
      ("lane_negative_index", lambda i: (i ^ 2) - 128, 1, True),
      ("lane_roll", lambda i: (i + 3) % 128, 1, False),
      ("lane_reverse", lambda i: 127 - i, 1, True),  # i ^ 127
  )
  def test_matches_jnp(self, index_fn, axis, is_xor):
    x = jnp.asarray(np.random.RandomState(0).standard_normal((8, 128)),
                    jnp.float32)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
    want = jnp.take_along_axis(x, index_fn(iota), axis=axis)
    got = self.variant(_take_call(index_fn, axis))(x)
    np.testing.assert_array_equal(got, want)
    text = jax.jit(_take_call(index_fn, axis)).lower(x).as_text()
    # A butterfly is a reverse; any other permutation keeps its gather.
    self.assertEqual("gather" not in text, is_xor)


if __name__ == "__main__":
  absltest.main()
