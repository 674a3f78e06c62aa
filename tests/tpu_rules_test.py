"""The simulated TPU PRNG: determinism, seed dependence, and statistics.

The bits are not the hardware's, so nothing is compared bit for bit with a
TPU; the tests check what a kernel author may rely on.
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

_GRID = 4


def _sampler_call(sample):
  def kernel(seed_ref, o_ref):
    pltpu.prng_seed(seed_ref[0], pl.program_id(0))
    o_ref[...] = sample((8, 128))

  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((8 * _GRID, 128), jnp.float32),
      grid=(_GRID,), in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)],
      out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
      interpret=fast_interpret.FastInterpretParams())


def _seed(value):
  return jnp.array([value], jnp.int32)


class PrngTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_seed_same_bits_other_seed_other_bits(self):
    call = self.variant(_sampler_call(
        lambda s: pltpu.stateful_uniform(s, jnp.float32)))
    a, b, c = call(_seed(1)), call(_seed(1)), call(_seed(2))
    np.testing.assert_array_equal(a, b)
    self.assertGreater(float(jnp.mean(a != c)), 0.99)
    # Each grid step seeds with its program id: the blocks differ.
    self.assertGreater(float(jnp.mean(a[:8] != a[8:16])), 0.99)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("uniform", lambda s: pltpu.stateful_uniform(s, jnp.float32), 0.5,
       1 / 12),
      ("normal", lambda s: pltpu.stateful_normal(s, jnp.float32), 0.0, 1.0),
  )
  def test_moments(self, sample, mean, variance):
    x = np.asarray(self.variant(_sampler_call(sample))(_seed(7)), np.float64)
    n = x.size
    # Five standard errors: a correct sampler fails this about once in 3e6.
    self.assertLess(abs(x.mean() - mean), 5 * np.sqrt(variance / n))
    self.assertLess(abs(x.var() - variance), 5 * variance * np.sqrt(2 / n))

  def test_uniform_is_in_range_and_fills_the_histogram(self):
    x = np.asarray(_sampler_call(
        lambda s: pltpu.stateful_uniform(s, jnp.float32))(_seed(3)))
    self.assertTrue(((x >= 0) & (x < 1)).all())
    counts, _ = np.histogram(x, bins=16, range=(0, 1))
    expected = x.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    self.assertLess(chi2, 50.0)  # 15 dof: p < 1e-5 beyond 50.

  def test_successive_draws_differ(self):
    def kernel(o_ref):
      pltpu.prng_seed(5)
      o_ref[0] = pltpu.prng_random_bits((8, 128))
      o_ref[1] = pltpu.prng_random_bits((8, 128))

    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((2, 8, 128), jnp.int32),
        interpret=fast_interpret.FastInterpretParams())()
    self.assertGreater(float(jnp.mean(out[0] != out[1])), 0.99)


if __name__ == "__main__":
  absltest.main()
