"""Printing and checking from inside a kernel.

``pl.debug_print`` / ``jax.debug.print`` print on the host at every grid
step; ``checkify.check`` under ``checkify.checkify`` returns checkify's error
value; ``pl.debug_check`` with ``pl.enable_debug_checks()`` raises after the
call. Expected outputs are written out by hand from the inputs.

Run:  python -m pytest tests/debug_rules_test.py -q
"""

import contextlib
import io

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental import checkify
from jax.experimental import pallas as pl
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds, FI  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds, FI  # pylint: disable=g-import-not-at-top,unused-import

X = jnp.arange(16 * 128, dtype=jnp.float32).reshape(16, 128)


def _call(kernel, params=None):
  return pl.pallas_call(
      kernel, out_shape=sds((16, 128)), grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
      interpret=FI() if params is None else params)


def _copy(x_ref, o_ref):
  o_ref[...] = x_ref[...]


class DebugPrintTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("pl_debug_print",
       lambda i, v: pl.debug_print("step {} x0 {}", i, v)),
      ("jax_debug_print",
       lambda i, v: jax.debug.print("step {i} x0 {v}", i=i, v=v)),
  )
  def test_prints_once_per_grid_step_with_the_values(self, emit):
    def kernel(x_ref, o_ref):
      emit(pl.program_id(0), x_ref[0, 0])
      _copy(x_ref, o_ref)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      result = self.variant(_call(kernel))(X)
      jax.block_until_ready(result)
      jax.effects_barrier()
    self.assertEqual(out.getvalue().splitlines(),
                     ["step 0 x0 0.0", "step 1 x0 1024.0"])
    np.testing.assert_array_equal(result, X)


def _checked_kernel(x_ref, o_ref):
  checkify.check(x_ref[0, 0] < 100, "x0 too big: {}", x_ref[0, 0])
  _copy(x_ref, o_ref)


class CheckifyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_failed_check_comes_back_as_checkify_error(self):
    err, out = self.variant(checkify.checkify(_call(_checked_kernel)))(X)
    self.assertIsNotNone(err.get())
    self.assertIn("x0 too big: 1024.0", err.get())
    np.testing.assert_array_equal(out, X)
    with self.assertRaisesRegex(checkify.JaxRuntimeError, "x0 too big"):
      err.throw()

  @chex.variants(with_jit=True, without_jit=True)
  def test_passing_check_gives_no_error(self):
    err, out = self.variant(checkify.checkify(_call(_checked_kernel)))(
        X * 0)
    self.assertIsNone(err.get())
    np.testing.assert_array_equal(out, X * 0)

  def test_checkify_inside_jit_of_a_function_calling_the_kernel(self):
    @jax.jit
    @checkify.checkify
    def f(x):
      return _call(_checked_kernel)(x + 1.0) * 2

    err, out = f(X)
    self.assertIn("x0 too big: 1025.0", err.get())
    np.testing.assert_array_equal(out, (X + 1) * 2)

  def test_check_without_checkify_fails_at_trace_time(self):
    with self.assertRaisesRegex(
        fast_interpret.UnsupportedFeatureError,
        "unsupported feature: checkify.check outside checkify.checkify"):
      _call(_checked_kernel)(X)

  def test_other_interpret_modes_are_left_alone(self):
    # checkify binds the call unchanged, as before fast_interpret was
    # imported; JAX's HLO interpreter then rejects the unfunctionalized check.
    with self.assertRaisesRegex(ValueError, "not functionalized"):
      checkify.checkify(_call(_checked_kernel, params=True))(X)


class DebugCheckTest(chex.TestCase):

  def _kernel(self, x_ref, o_ref):
    pl.debug_check(x_ref[0, 0] < 100, "x0 too big {here}")
    _copy(x_ref, o_ref)

  @chex.variants(with_jit=True, without_jit=True)
  def test_enabled_debug_check_raises_after_the_call(self):
    with pl.enable_debug_checks(True):
      with self.assertRaisesRegex(
          Exception, r"fast_interpret: debug check failed: x0 too big "
          r"\{here\} \(kernel '_kernel', grid step 1\)"):
        jax.block_until_ready(self.variant(_call(self._kernel))(X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_disabled_debug_check_is_dropped(self):
    out = self.variant(_call(self._kernel))(X)
    np.testing.assert_array_equal(out, X)

  def test_debug_check_under_checkify(self):
    def kernel(x_ref, o_ref):
      # checkify formats the message itself: no braces here.
      pl.debug_check(x_ref[0, 0] < 100, "x0 too big")
      _copy(x_ref, o_ref)

    err, _ = checkify.checkify(_call(kernel))(X)
    self.assertIn("x0 too big", err.get())


if __name__ == "__main__":
  absltest.main()
