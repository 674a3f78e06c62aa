"""TPU extras: narrow dtypes, einshape, memory-space constraints, and the
primitives that fail at trace time with a reason.

References are NumPy / jnp.

Run:  python -m pytest tests/tpu_extras_test.py -q
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

_DTYPES = [("int4", jnp.int4), ("uint4", jnp.uint4), ("int8", jnp.int8),
           ("uint8", jnp.uint8), ("f8_e5m2", jnp.float8_e5m2),
           ("f8_e4m3fn", jnp.float8_e4m3fn), ("bf16", jnp.bfloat16)]


def _values(dtype):
  return (jnp.arange(32 * 128) % 7).reshape(32, 128).astype(dtype)


def _f32(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32))


class DtypeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_DTYPES)
  def test_blocks_and_scratch(self, dtype):
    def kernel(x_ref, o_ref, s_ref):
      s_ref[...] = x_ref[...]
      o_ref[...] = s_ref[...]

    call = lambda x: pl.pallas_call(
        kernel, out_shape=sds((32, 128), dtype), grid=(2,),
        in_specs=[pl.BlockSpec((16, 128), lambda i: (1 - i, 0))],
        out_specs=pl.BlockSpec((16, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((16, 128), dtype)], interpret=FI())(x)
    x = _values(dtype)
    out = self.variant(call)(x)
    self.assertEqual(out.dtype, jnp.dtype(dtype))
    np.testing.assert_array_equal(_f32(out), np.roll(_f32(x), 16, axis=0))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_DTYPES)
  def test_dma_from_hbm(self, dtype):
    def kernel(x_hbm, o_ref, buf):
      pltpu.sync_copy(x_hbm.at[pl.ds(8, 16)], buf)
      o_ref[...] = buf[...]

    call = lambda x: pl.pallas_call(
        kernel, out_shape=sds((16, 128), dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        scratch_shapes=[pltpu.VMEM((16, 128), dtype)], interpret=FI())(x)
    x = _values(dtype)
    np.testing.assert_array_equal(_f32(self.variant(call)(x)),
                                  _f32(x)[8:24])


class EinshapeAndConstraintTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("transpose", "ab->ba", (8, 128), (128, 8),
       lambda x: x.T),
      ("merge_after_swap", "abc->b(ac)", (2, 8, 128), (8, 256),
       lambda x: np.transpose(x, (1, 0, 2)).reshape(8, 256)),
      ("split", "a(bc)->bac", (8, 256), (2, 8, 128),
       lambda x: np.transpose(x.reshape(8, 2, 128), (1, 0, 2))),
  )
  def test_einshape(self, equation, in_shape, out_shape, reference):
    def kernel(x_ref, o_ref):
      o_ref[...] = pltpu.einshape(equation, x_ref[...], b=2) if (
          "(bc)" in equation) else pltpu.einshape(equation, x_ref[...])

    x = jnp.arange(np.prod(in_shape), dtype=jnp.float32).reshape(in_shape)
    call = lambda x: pl.pallas_call(kernel, out_shape=sds(out_shape),
                                    interpret=FI())(x)
    np.testing.assert_array_equal(self.variant(call)(x),
                                  reference(np.asarray(x)))

  @parameterized.named_parameters(("vmem", pltpu.VMEM), ("smem", pltpu.SMEM),
                                  ("hbm", pltpu.HBM))
  def test_with_memory_space_constraint_on_an_operand(self, space):
    @jax.jit
    def f(x):
      x = pltpu.with_memory_space_constraint(x, space)
      return pl.pallas_call(
          lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] + 1),
          out_shape=sds((8, 128)), interpret=FI())(x)

    x = jnp.ones((8, 128))
    np.testing.assert_array_equal(f(x), x + 1)


class UnsupportedTest(absltest.TestCase):

  def _trace(self, body):
    def kernel(x_ref, o_ref):
      body()
      o_ref[...] = x_ref[...]

    pl.pallas_call(kernel, out_shape=sds((8, 128)),
                   interpret=FI())(jnp.ones((8, 128)))

  def test_get_global_says_why(self):
    def body():
      sem = pl.get_global(pltpu.SemaphoreType.REGULAR)
      pl.semaphore_signal(sem)
      pl.semaphore_wait(sem)

    with self.assertRaisesRegex(
        fast_interpret.UnsupportedPrimitiveError,
        r"unsupported primitive: `get_global` .*only Mosaic GPU"):
      self._trace(body)

  def test_mxu_ops_say_why(self):
    with self.assertRaisesRegex(
        fast_interpret.UnsupportedPrimitiveError,
        r"unsupported primitive: `matmul_push_rhs` .*MXU"):
      self._trace(lambda: pltpu.matmul_push_rhs(
          jnp.ones((256, 256), jnp.bfloat16), 0, 0))


if __name__ == "__main__":
  absltest.main()
