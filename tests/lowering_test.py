"""Feature tests: how fast_interpret hooks into Pallas, and what it emits.

Covers: the lowered program of a kernel with a grid, DMAs and semaphores has
no host callback (and JAX's ``pltpu.InterpretParams()`` mode, the positive
control, does); ``FastInterpretParams`` is a ``pltpu.InterpretParams``, works
with ``pltpu.force_tpu_interpret_mode``, ``force_fast_interpret_mode`` and
``set_fast_interpret_mode`` (reset afterwards); unsupported fields raise a
ValueError that points at ``pltpu.InterpretParams``; other ``interpret``
values still run JAX's own modes; a primitive without a rule raises
``fast_interpret.UnsupportedPrimitiveError`` with its name at trace time.

Run:  python -m pytest tests/lowering_test.py -q
"""

import dataclasses
import re


from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds as _sds, FI, VMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, FI, VMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import



def _pure(**kw):
  """FastInterpretParams with every runtime check off.

  Runtime checks (bounds, semaphore balance, ...) report through one host
  callback; with them off the program must hold none.
  """
  if hasattr(FI, "unchecked"):
    return FI.unchecked(**kw)
  fields = {f.name for f in dataclasses.fields(FI)}
  kw.setdefault("out_of_bounds_reads", "uninitialized")
  for name in fields:
    if name.startswith("check_"):
      kw.setdefault(name, False)
  return FI(**kw)



_CALLBACK_MARKERS = ("callback", "xla_python", "host_callback")


X = jnp.asarray(np.random.RandomState(0).standard_normal((32, 128)).astype(
    np.float32))


def _dma_grid_kernel(x_hbm, o_ref, buf, sems, rsem):
  i = pl.program_id(0)
  cp = pltpu.make_async_copy(x_hbm.at[pl.ds(i * 8, 8)], buf, sems.at[i % 2])
  cp.start()
  cp.wait()
  pl.semaphore_signal(rsem, 2)
  pl.semaphore_wait(rsem, 2)
  o_ref[...] = buf[...] + 1.0


def _dma_grid_call(x, interpret=False):
  return pl.pallas_call(
      _dma_grid_kernel, out_shape=_sds((32, 128)), grid=(4,),
      in_specs=[ANY], out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
      scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32),
                      pltpu.SemaphoreType.DMA((2,)),
                      pltpu.SemaphoreType.REGULAR],
      interpret=interpret)(x)


def _partial_write_kernel(o_ref):
  o_ref[0:4, :] = jnp.ones((4, 128), jnp.float32)


def _partial_write_call(interpret=False):
  """Rows 4: are never written: they show the mode's uninitialised fill."""
  return pl.pallas_call(_partial_write_kernel, out_shape=_sds((8, 128)),
                        interpret=interpret)()


def _hbm_read_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * 2.0


def _hbm_read_call(x, interpret=False):
  """Reads an HBM ref directly: fast interpret refuses, interpret=True runs."""
  return pl.pallas_call(_hbm_read_kernel, out_shape=_sds((32, 128)),
                        in_specs=[ANY], out_specs=VMEM,
                        interpret=interpret)(x)


def _has_callback(text: str) -> bool:
  low = text.lower()
  return any(m in low for m in _CALLBACK_MARKERS)


def _is_fast_zero_fill(out) -> bool:
  """True if the unwritten rows are zeros (FastInterpretParams('zero'))."""
  out = np.asarray(out)
  np.testing.assert_array_equal(out[:4], 1.0)
  return bool(np.all(out[4:] == 0.0))


class LoweredProgramTest(chex.TestCase):

  @parameterized.named_parameters(
      ("checks_off", _pure()),
      ("zero_fill", _pure(uninitialized_memory="zero")),
      ("two_cores", _pure(num_cores_or_threads=2)))
  def test_lowered_program_is_pure_xla(self, params):
    lowered = jax.jit(lambda x: _dma_grid_call(x, params)).lower(X)
    text = lowered.as_text()
    for marker in _CALLBACK_MARKERS:
      self.assertNotIn(marker, text.lower())
    custom_calls = re.findall(r"custom_call\s*@([\w.]+)", text)
    self.assertFalse([c for c in custom_calls if "python" in c.lower()],
                     custom_calls)
    # The optimised HLO: only custom-call instructions are checked, since op
    # metadata quotes Python source names.
    compiled = lowered.compile().as_text()
    calls = [line.split("metadata")[0] for line in compiled.splitlines()
             if "custom-call" in line]
    self.assertFalse([c for c in calls if _has_callback(c)], calls)
    # And it computes the right thing.
    out = lowered.compile()(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X) + 1)

  def test_tpu_interpret_mode_is_not_pure_positive_control(self):
    """The check above can fail: JAX's TPU interpret mode uses callbacks."""
    text = jax.jit(lambda x: _dma_grid_call(x, pltpu.InterpretParams())
                   ).lower(X).as_text()
    self.assertTrue(_has_callback(text))

  def test_no_io_effects_on_the_jaxpr(self):
    """Fast mode declares no effects; JAX's TPU interpret mode does."""
    fast = jax.make_jaxpr(lambda x: _dma_grid_call(x, _pure()))(X)
    self.assertEmpty(fast.effects)
    tpu = jax.make_jaxpr(
        lambda x: _dma_grid_call(x, pltpu.InterpretParams()))(X)
    self.assertNotEmpty(tpu.effects)


class ParamsTest(chex.TestCase):

  def test_is_a_tpu_interpret_params(self):
    self.assertTrue(issubclass(FI, pltpu.InterpretParams))
    self.assertIsInstance(FI(), pltpu.InterpretParams)
    self.assertEqual(FI().uninitialized_memory, "nan")
    self.assertEqual(FI().dma_execution_mode, "eager")
    self.assertEqual(FI(uninitialized_memory="zero").uninitialized_memory,
                     "zero")
    self.assertEqual(FI(), FI())
    hash(FI())  # Used as a static pallas_call parameter.

  @parameterized.named_parameters(
      ("detect_races", dict(detect_races=True)),
      ("skip_floating_point_ops", dict(skip_floating_point_ops=True)),
      ("grid_point_recorder",
       dict(grid_point_recorder=lambda *a: None)),
  )
  def test_unsupported_fields_raise(self, kwargs):
    with self.assertRaisesRegex(ValueError, r"pltpu\.InterpretParams"):
      FI(**kwargs)

  def test_bad_uninitialized_memory_raises(self):
    with self.assertRaisesRegex(ValueError, "uninitialized_memory"):
      FI(uninitialized_memory="garbage")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero", "zero"), ("nan", "nan"))
  def test_params_passed_per_call(self, fill):
    out = np.asarray(self.variant(lambda: _partial_write_call(
        FI(uninitialized_memory=fill)))())
    np.testing.assert_array_equal(out[:4], 1.0)
    if fill == "zero":
      np.testing.assert_array_equal(out[4:], 0.0)
    else:
      self.assertTrue(np.all(np.isnan(out[4:])))


class ModeSwitchTest(chex.TestCase):

  def _check_jax_mode_after(self):
    """After leaving a fast mode, interpret=True is JAX's interpreter again."""
    out = jax.jit(lambda x: _hbm_read_call(x, True))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X) * 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pltpu_force_tpu_interpret_mode_accepts_fast_params(self):
    with pltpu.force_tpu_interpret_mode(_pure(uninitialized_memory="zero")):
      out = self.variant(lambda: _partial_write_call(interpret=False))()
      self.assertTrue(_is_fast_zero_fill(out))
      text = jax.jit(_dma_grid_call).lower(X).as_text()
      self.assertFalse(_has_callback(text))
    self._check_jax_mode_after()

  @chex.variants(with_jit=True, without_jit=True)
  def test_force_fast_interpret_mode(self):
    with fast_interpret.force_fast_interpret_mode(
        FI(uninitialized_memory="zero")) as params:
      self.assertIsInstance(params, FI)
      out = self.variant(lambda: _partial_write_call(interpret=False))()
      self.assertTrue(_is_fast_zero_fill(out))
      # Calls that pass their own interpret= value are overridden too.
      out = self.variant(lambda: _partial_write_call(interpret=True))()
      self.assertTrue(_is_fast_zero_fill(out))
      # A fast-interpret-only error proves which mode ran.
      with self.assertRaisesRegex(Exception,
                                  "fast_interpret: unsupported feature"):
        jax.block_until_ready(self.variant(
            lambda x: _hbm_read_call(x, True))(X))
      out = self.variant(_dma_grid_call)(X)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(X) + 1)
    self._check_jax_mode_after()

  def test_force_fast_interpret_mode_default_params(self):
    with fast_interpret.force_fast_interpret_mode() as params:
      self.assertEqual(params, FI())
      out = np.asarray(_partial_write_call())
      self.assertTrue(np.all(np.isnan(out[4:])))
      out = jax.jit(_dma_grid_call)(X)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(X) + 1)

  def test_force_fast_interpret_mode_pure_params(self):
    with fast_interpret.force_fast_interpret_mode(_pure()):
      text = jax.jit(_dma_grid_call).lower(X).as_text()
      self.assertFalse(_has_callback(text))

  def test_force_fast_interpret_mode_rejects_other_params(self):
    # interpret=True is not an InterpretParams: JAX's own context manager is
    # the way to force it.
    with self.assertRaises(TypeError):
      with fast_interpret.force_fast_interpret_mode(True):
        pass
    with self.assertRaises(TypeError):
      fast_interpret.set_fast_interpret_mode(True)
    self._check_jax_mode_after()

  def test_force_fast_interpret_mode_restores_after_error(self):
    with self.assertRaisesRegex(RuntimeError, "boom"):
      with fast_interpret.force_fast_interpret_mode(
          FI(uninitialized_memory="zero")):
        raise RuntimeError("boom")
    self._check_jax_mode_after()

  @chex.variants(with_jit=True, without_jit=True)
  def test_set_fast_interpret_mode_and_reset(self):
    self.addCleanup(fast_interpret.set_fast_interpret_mode, None)
    fast_interpret.set_fast_interpret_mode(_pure(uninitialized_memory="zero"))
    out = self.variant(lambda: _partial_write_call(interpret=False))()
    self.assertTrue(_is_fast_zero_fill(out))
    text = jax.jit(_dma_grid_call).lower(X).as_text()
    self.assertFalse(_has_callback(text))
    fast_interpret.set_fast_interpret_mode(None)
    self._check_jax_mode_after()
    # Back to each call's own interpret= value.
    out = self.variant(lambda: _partial_write_call(
        interpret=FI(uninitialized_memory="nan")))()
    self.assertTrue(np.all(np.isnan(np.asarray(out)[4:])))


class OtherModesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_interpret_true_runs_jax_hlo_interpreter(self):
    # Reading an HBM ref directly is refused by fast interpret but allowed by
    # JAX's HLO interpreter: this runs only if JAX's mode handled the call.
    out = self.variant(lambda x: _hbm_read_call(x, True))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X) * 2)
    out = self.variant(lambda x: _dma_grid_call(x, True))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X) + 1)

  def test_tpu_interpret_params_runs_jax_tpu_interpreter(self):
    try:
      out = _dma_grid_call(X, pltpu.InterpretParams())
      np.testing.assert_array_equal(np.asarray(out), np.asarray(X) + 1)
      text = jax.jit(lambda x: _dma_grid_call(x, pltpu.InterpretParams())
                     ).lower(X).as_text()
      self.assertTrue(_has_callback(text))
    finally:
      pltpu.reset_tpu_interpret_mode_state()

  def test_fast_and_jax_modes_side_by_side(self):
    """One jitted function with a fast and an interpret=True kernel."""
    @jax.jit
    def f(x):
      return _dma_grid_call(x, FI()), _dma_grid_call(x, True)

    a, b = f(X)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(X) + 1)


# A primitive that takes a ref and has no fast_interpret rule.
_no_rule_p = jex_core.Primitive("fast_interpret_test_no_rule")
_no_rule_p.def_abstract_eval(
    lambda ref: jax.core.ShapedArray(ref.shape, ref.dtype))


def _no_rule_kernel(x_ref, o_ref):
  o_ref[...] = _no_rule_p.bind(x_ref)


def _matmul_pop_kernel(o_ref):
  # Explicit MXU accumulators are not modelled.
  o_ref[...] = pltpu.matmul_pop(0, o_ref.shape, jnp.float32, 0)


class UnsupportedPrimitiveTest(chex.TestCase):

  @parameterized.named_parameters(
      ("custom_ref_primitive", "fast_interpret_test_no_rule",
       lambda x: pl.pallas_call(_no_rule_kernel, out_shape=_sds((32, 128)),
                                interpret=FI())(x)),
      ("pltpu_matmul_pop", "matmul_pop",
       lambda x: pl.pallas_call(_matmul_pop_kernel,
                                out_shape=_sds((8, 128)), interpret=FI())()),
  )
  def test_raises_at_trace_time_with_name(self, name, fn):
    with self.assertRaises(fast_interpret.UnsupportedPrimitiveError) as cm:
      jax.jit(fn).lower(X)  # Lowering traces the kernel; nothing runs.
    self.assertIn(f"`{name}`", str(cm.exception))
    self.assertRegex(str(cm.exception),
                     r"^fast_interpret: unsupported primitive")
    self.assertEqual(cm.exception.primitive.name, name)
    self.assertIsInstance(cm.exception, fast_interpret.FastInterpretError)
    self.assertIsInstance(cm.exception, NotImplementedError)

  @chex.variants(with_jit=True, without_jit=True)
  def test_raises_when_called(self):
    def fn(x):
      return pl.pallas_call(_no_rule_kernel, out_shape=_sds((32, 128)),
                            interpret=FI())(x)

    with self.assertRaisesRegex(fast_interpret.UnsupportedPrimitiveError,
                                "fast_interpret_test_no_rule"):
      self.variant(fn)(X)

  def test_remote_dma_is_an_unsupported_feature(self):
    def kernel(x_hbm, o_hbm, send, recv):
      pltpu.make_async_remote_copy(
          x_hbm, o_hbm, send, recv, device_id=0,
          device_id_type=pl.DeviceIdType.LOGICAL).start()

    fn = lambda x: pl.pallas_call(
        kernel, out_shape=_sds((32, 128)), in_specs=[ANY], out_specs=ANY,
        scratch_shapes=[pltpu.SemaphoreType.DMA] * 2, interpret=FI())(x)
    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "fast_interpret: unsupported feature.*remote"):
      jax.jit(fn).lower(X)


if __name__ == "__main__":
  absltest.main()
