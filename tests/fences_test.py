"""Fusion fences: the values that pass a fence come out bit for bit.

A fence packs pairs of same-shape, same-width values into one integer of
twice the width (``fences._pair``); the references are the inputs
themselves, compared by their bits (NaN payloads and signed zeros included).
An end-to-end case runs a kernel long enough to be fenced, with values of
several dtypes live at every fence, against the same function in jnp.

Run:  python -m pytest tests/fences_test.py -q
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import fast_interpret
from fast_interpret import fences

try:
  from tests.feature_util import setUpModule  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule  # pylint: disable=g-import-not-at-top,unused-import


def _bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(f"uint{x.dtype.itemsize * 8}")


def _random(shape, dtype, seed):
  """Every bit pattern is fair game: NaNs with payloads, -0.0, infs."""
  dtype = np.dtype(dtype)
  rng = np.random.default_rng(seed)
  bits = rng.integers(0, 2 ** (dtype.itemsize * 8), shape,
                      dtype=f"uint{dtype.itemsize * 8}")
  return jnp.asarray(bits.view(dtype))


class PairTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("f32_i32", [np.float32, np.int32]),
      ("three_u32_one_f32", [np.uint32, np.float32, np.uint32, np.float32]),
      ("odd_count", [np.float32, np.int32, np.float32]),
      ("bf16_i16_i8_u8", [ml_dtypes.bfloat16, np.int16, np.int8, np.uint8]),
      ("mixed_shapes", [np.float32, np.int32, np.float16]),
  )
  def test_round_trip_is_bit_exact(self, dtypes):
    shapes = [(8, 128)] * len(dtypes)
    if len(dtypes) == 3 and dtypes[2] == np.float16:
      shapes[1] = (4, 128)
    values = [_random(s, d, seed) for seed, (s, d)
              in enumerate(zip(shapes, dtypes, strict=True))]

    @jax.jit
    def through(*xs):
      packed, unpack = fences._pair(list(xs))
      return unpack(packed)

    out = through(*values)
    for x, y in zip(values, out, strict=True):
      self.assertEqual(x.dtype, y.dtype)
      self.assertEqual(x.shape, y.shape)
      np.testing.assert_array_equal(_bits(x), _bits(y))

  def test_pairs_only_same_shape_and_width(self):
    values = [jnp.zeros((8, 128), jnp.float32), jnp.zeros((8, 128), jnp.int8),
              jnp.zeros((4, 128), jnp.int32), jnp.zeros((8, 128), jnp.int32),
              jnp.zeros((8, 128), jnp.bool_), jnp.zeros((8, 128), jnp.bool_)]
    packed = jax.eval_shape(lambda *xs: fences._pair(list(xs))[0], *values)
    self.assertEqual(
        [(x.shape, np.dtype(x.dtype).name) for x in packed],
        [((8, 128), "uint64"), ((8, 128), "int8"), ((4, 128), "int32"),
         ((8, 128), "bool"), ((8, 128), "bool")])


def _chain(x, i, h):
  """A long elementwise chain over three dtypes (several hundred eqns)."""
  for k in range(40):
    x = jnp.where(i % 3 == k % 3, x * 1.5 - 0.25, x + 1.0)
    i = (i * 5 + 7 + (x > 0).astype(jnp.int32)) & 0xFFFF
    h = (h + i.astype(jnp.float16) * jnp.float16(0.001)).astype(jnp.float16)
  return x, i, h


def _three_outputs(kernel):
  """A pallas_call of ``kernel`` on an f32, an i32 and an f16 (8,128) array."""
  x = jnp.linspace(-1, 1, 1024, dtype=jnp.float32).reshape(8, 128)
  i = jnp.arange(1024, dtype=jnp.int32).reshape(8, 128)
  h = jnp.zeros((8, 128), jnp.float16)
  call = pl.pallas_call(
      kernel,
      out_shape=tuple(jax.ShapeDtypeStruct(a.shape, a.dtype)
                      for a in (x, i, h)),
      interpret=fast_interpret.FastInterpretParams())
  return call, (x, i, h)


class FencedKernelTest(absltest.TestCase):

  def test_mixed_dtypes_through_fences(self):
    def kernel(x_ref, i_ref, h_ref, xo_ref, io_ref, ho_ref):
      xo_ref[...], io_ref[...], ho_ref[...] = _chain(
          x_ref[...], i_ref[...], h_ref[...])

    call, (x, i, h) = _three_outputs(kernel)
    got = jax.jit(call)(x, i, h)
    want = jax.jit(_chain)(x, i, h)
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(_bits(g), _bits(w))
    hlo = jax.jit(call).lower(x, i, h).compile().as_text()
    self.assertIn("conditional(", hlo)  # it was long enough to be fenced
    self.assertIn("u64[8,128]", hlo)

  def test_no_packing_inside_loops(self):
    # Packed pairs cost fewer kernels to compile but run slower where a
    # kernel runs many times.
    def kernel(x_ref, i_ref, h_ref, xo_ref, io_ref, ho_ref):
      def body(_, carry):
        return _chain(*carry)
      xo_ref[...], io_ref[...], ho_ref[...] = jax.lax.fori_loop(
          0, 2, body, (x_ref[...], i_ref[...], h_ref[...]))

    call, (x, i, h) = _three_outputs(kernel)
    got = jax.jit(call)(x, i, h)
    want = jax.jit(_chain)(*jax.jit(_chain)(x, i, h))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(_bits(g), _bits(w))
    hlo = jax.jit(call).lower(x, i, h).as_text()
    self.assertIn("stablehlo.case", hlo)  # fenced
    self.assertNotIn("ui64", hlo)


if __name__ == "__main__":
  absltest.main()
