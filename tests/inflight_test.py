"""Tests of DMA timing: ``dma_execution_mode="eager"`` and ``"on_wait"``.

In ``eager`` mode a copy lands when it starts; in ``on_wait`` mode it lands at
the first wait on its semaphore, so a kernel that reads a DMA destination
before waiting sees the old contents. Each buggy kernel here reads too early;
its expected output is computed in NumPy for both semantics, and checked
against ``pltpu.InterpretParams(dma_execution_mode=...)`` where that is cheap.
Correct kernels (double buffering in a loop, across grid steps, on two
simulated cores, into ``run_scoped`` buffers) must give the same answer in
both modes.

Run:  python -m pytest tests/inflight_test.py -q
"""

import os
from unittest import mock

from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import

MODES = (("eager", "eager"), ("on_wait", "on_wait"))


def _params(mode, **kw):
  return FI(dma_execution_mode=mode, uninitialized_memory="zero", **kw)


# ---------------------------------------------------------------------------
# A read of the destination between start and wait.


def _read_before_wait(x_hbm, o_ref, buf, sem):
  buf[...] = jnp.full(buf.shape, -1.0, buf.dtype)
  cp = pltpu.make_async_copy(x_hbm, buf, sem)
  cp.start()
  o_ref[0] = buf[...]
  cp.wait()
  o_ref[1] = buf[...]


def _read_before_wait_reference(x, mode):
  before = x if mode == "eager" else np.full_like(x, -1.0)
  return np.stack([before, x])


def _loop_read_before_wait(x_hbm, o_ref, buf, sems):
  """Double buffering with the bug: the slot is read before its wait."""
  n = x_hbm.shape[0] // 8

  def copy(i, slot):
    return pltpu.make_async_copy(x_hbm.at[pl.ds(i * 8, 8)], buf.at[slot],
                                 sems.at[slot])

  copy(0, 0).start()
  o_ref[...] = jnp.zeros_like(o_ref)

  @pl.loop(0, n)
  def _(i):
    slot = i % 2

    @pl.when(i + 1 < n)
    def _():
      copy(i + 1, 1 - slot).start()

    o_ref[...] += buf[slot] * (i + 1).astype(jnp.float32)
    copy(i, slot).wait()


def _loop_read_before_wait_reference(x, mode):
  chunks = x.reshape(-1, 8, x.shape[-1]).astype(np.float64)
  out = np.zeros(chunks.shape[1:])
  for i in range(len(chunks)):
    # on_wait: slot i % 2 last landed chunk i - 2 (zero-filled before that).
    seen = chunks[i] if mode == "eager" else (
        chunks[i - 2] if i >= 2 else 0.0)
    out += seen * (i + 1)
  return out


def _grid_read_before_wait(x_hbm, o_ref, buf, sems):
  """Prefetch across grid steps, with the bug: read before the wait."""
  i, n = pl.program_id(0), pl.num_programs(0)

  def copy(j, slot):
    return pltpu.make_async_copy(x_hbm.at[pl.ds(j * 8, 8)], buf.at[slot],
                                 sems.at[slot])

  @pl.when(i == 0)
  def _():
    copy(0, 0).start()

  @pl.when(i + 1 < n)
  def _():
    copy(i + 1, (i + 1) % 2).start()

  o_ref[...] = buf[i % 2]
  copy(i, i % 2).wait()


def _grid_read_before_wait_reference(x, mode):
  chunks = x.reshape(-1, 8, x.shape[-1])
  if mode == "eager":
    return x
  stale = [chunks[i - 2] if i >= 2 else np.zeros_like(chunks[0])
           for i in range(len(chunks))]
  return np.concatenate(stale)


class ReadBeforeWaitTest(chex.TestCase):
  """A read between start and wait: new data if eager, old if on_wait."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_straight_line(self, mode):
    x = _data((8, 128), seed=1)
    f = lambda x, interpret: _call(
        _read_before_wait, _sds((2, 8, 128)), x, in_specs=[ANY],
        out_specs=VMEM, scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32),
                                        DMA(())], interpret=interpret)
    out = np.asarray(self.variant(lambda x: f(x, _params(mode)))(x))
    expected = _read_before_wait_reference(np.asarray(x), mode)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(
        x, pltpu.InterpretParams(dma_execution_mode=mode))))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_in_loop(self, mode):
    x = _data((32, 128), seed=2)
    f = lambda x, interpret: _call(
        _loop_read_before_wait, _sds((8, 128)), x, in_specs=[ANY],
        out_specs=VMEM, scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32),
                                        DMA((2,))], interpret=interpret)
    out = np.asarray(self.variant(lambda x: f(x, _params(mode)))(x))
    expected = _loop_read_before_wait_reference(np.asarray(x), mode)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)
    tpu = pltpu.InterpretParams(dma_execution_mode=mode,
                                uninitialized_memory="zero")
    np.testing.assert_allclose(out, np.asarray(f(x, tpu)), rtol=1e-6,
                               atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_across_grid_steps(self, mode):
    x = _data((32, 128), seed=3)
    f = lambda x, interpret: _call(
        _grid_read_before_wait, _sds((32, 128)), x, grid=(4,),
        in_specs=[ANY], out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA((2,))],
        interpret=interpret)
    out = np.asarray(self.variant(lambda x: f(x, _params(mode)))(x))
    expected = _grid_read_before_wait_reference(np.asarray(x), mode)
    np.testing.assert_array_equal(out, expected)
    tpu = pltpu.InterpretParams(dma_execution_mode=mode,
                                uninitialized_memory="zero")
    np.testing.assert_array_equal(out, np.asarray(f(x, tpu)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_run_scoped_destination(self, mode):
    x = _data((8, 128), seed=4)

    def kernel(x_hbm, o_ref):
      def body(buf, sem):
        _read_before_wait(x_hbm, o_ref, buf, sem)
      pl.run_scoped(body, pltpu.VMEM((8, 128), jnp.float32), DMA(()))

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((2, 8, 128)), x, in_specs=[ANY], out_specs=VMEM,
        interpret=_params(mode)))(x))
    np.testing.assert_array_equal(
        out, _read_before_wait_reference(np.asarray(x), mode))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_wait_in_cond_lands_copy_started_in_other_cond(self, mode):
    x = _data((8, 128), seed=5)

    def kernel(flag_ref, x_hbm, o_ref, buf, sem):
      buf[...] = jnp.zeros(buf.shape, buf.dtype)
      cp = pltpu.make_async_copy(x_hbm, buf, sem)

      @pl.when(flag_ref[0] > 0)
      def _():
        cp.start()

      o_ref[0] = buf[...]

      @pl.when(flag_ref[0] > 0)
      def _():
        cp.wait()

      o_ref[1] = buf[...]

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((2, 8, 128)), jnp.array([1], jnp.int32), x,
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM), ANY],
        out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), DMA(())],
        interpret=_params(mode)))(x))
    h = np.asarray(x)
    before = h if mode == "eager" else np.zeros_like(h)
    np.testing.assert_array_equal(out, np.stack([before, h]))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_hbm_destination_read_back_before_wait(self, mode):
    """VMEM -> HBM, then HBM -> VMEM before the first copy was waited."""
    x = _data((8, 128), seed=6)

    def kernel(x_ref, o_hbm, buf, sems):
      out_copy = pltpu.make_async_copy(x_ref, o_hbm, sems.at[0])
      out_copy.start()
      pltpu.async_copy(o_hbm, buf, sems.at[1]).wait()
      out_copy.wait()
      pltpu.sync_copy(buf, o_hbm.at[...])  # What was read back.

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x, in_specs=[VMEM], out_specs=ANY,
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), DMA((2,))],
        interpret=_params(mode)))(x))
    # on_wait: the output HBM buffer still holds its zero fill.
    expected = np.asarray(x) if mode == "eager" else np.zeros((8, 128))
    np.testing.assert_array_equal(out, expected)


  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_wait_lands_only_copies_on_its_own_semaphore_array(self, mode):
    """Two semaphore arrays (one buffer when checked): a wait on one lands
    its own copy, not the copy in flight on the other."""
    x = _data((16, 128), seed=8)

    def kernel(x_hbm, o_ref, buf, sem_a, sems_b):
      buf[...] = jnp.zeros(buf.shape, buf.dtype)
      first = pltpu.make_async_copy(x_hbm.at[pl.ds(0, 8)], buf.at[0], sem_a)
      second = pltpu.make_async_copy(x_hbm.at[pl.ds(8, 8)], buf.at[1],
                                     sems_b.at[1])
      first.start()
      second.start()
      second.wait()
      o_ref[0] = buf[0]  # Its copy not waited for yet.
      o_ref[1] = buf[1]
      first.wait()
      o_ref[2] = buf[0]

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((3, 8, 128)), x, in_specs=[ANY], out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA(()),
                        DMA((2,))],
        interpret=_params(mode)))(x))
    h = np.asarray(x)
    stale = h[:8] if mode == "eager" else np.zeros_like(h[:8])
    np.testing.assert_array_equal(out, np.stack([stale, h[8:], h[:8]]))


class CorrectKernelsTest(chex.TestCase):
  """Kernels that wait before reading give the same answer in both modes."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_double_buffering_in_loop(self, mode):
    x = _data((64, 128), seed=7)

    def kernel(x_hbm, o_ref, buf, sems):
      def copy(i, slot):
        return pltpu.make_async_copy(x_hbm.at[pl.ds(i * 8, 8)],
                                     buf.at[slot], sems.at[slot])

      copy(0, 0).start()
      o_ref[...] = jnp.zeros_like(o_ref)

      def body(i, carry):
        slot = i % 2

        @pl.when(i + 1 < 8)
        def _():
          copy(i + 1, 1 - slot).start()

        copy(i, slot).wait()
        o_ref[...] += buf[slot] * (i + 1).astype(jnp.float32)
        return carry

      jax.lax.fori_loop(0, 8, body, 0)

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x, in_specs=[ANY], out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA((2,))],
        interpret=_params(mode)))(x))
    h = np.asarray(x, np.float64).reshape(8, 8, 128)
    expected = (h * np.arange(1, 9)[:, None, None]).sum(0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*MODES)
  def test_megacore_prefetch_across_grid_steps(self, mode):
    """Two simulated cores, each prefetching its own next block."""
    x = _data((64, 128), seed=8)

    def kernel(x_hbm, o_ref, buf, sems):
      c, j = pl.program_id(0), pl.program_id(1)
      n = pl.num_programs(1)

      def copy(jj, slot):
        return pltpu.make_async_copy(
            x_hbm.at[pl.ds((c * n + jj) * 8, 8)], buf.at[slot], sems.at[slot])

      @pl.when(j == 0)
      def _():
        copy(0, 0).start()

      @pl.when(j + 1 < n)
      def _():
        copy(j + 1, (j + 1) % 2).start()

      copy(j, j % 2).wait()
      o_ref[...] = buf[j % 2] * 2.0

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((64, 128)), x, grid=(2, 4), in_specs=[ANY],
        out_specs=pl.BlockSpec((8, 128), lambda c, j: (c * 4 + j, 0)),
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA((2,))],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        interpret=_params(mode, num_cores_or_threads=2)))(x))
    np.testing.assert_array_equal(out, np.asarray(x) * 2.0)

  @parameterized.named_parameters(*MODES)
  def test_wait_without_start_still_reported(self, mode):
    def kernel(x_hbm, o_ref, sem):
      pltpu.make_async_copy(x_hbm, o_ref, sem).wait()

    with self.assertRaisesRegex(Exception, "fast_interpret: semaphore:"):
      jax.block_until_ready(_call(
          kernel, _sds((8, 128)), _data((8, 128)), in_specs=[ANY],
          out_specs=VMEM, scratch_shapes=[DMA(())],
          interpret=_params(mode)))

  def test_eager_allocates_nothing(self):
    """eager mode adds no buffers: the lowered program is the same size."""
    x = _data((32, 128), seed=9)

    def lowered(params):
      return jax.jit(lambda x: _call(
          _grid_read_before_wait, _sds((32, 128)), x, grid=(4,),
          in_specs=[ANY], out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
          scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA((2,))],
          interpret=params)).lower(x).as_text()

    eager = lowered(FI.unchecked(dma_execution_mode="eager"))
    on_wait = lowered(FI.unchecked(dma_execution_mode="on_wait"))
    # The loop carries two more (2, 8, 128) arrays in on_wait mode: the
    # scratch's shadow and its tags.
    self.assertNotIn("tensor<2x8x128xi32>", eager)
    self.assertIn("tensor<2x8x128xi32>", on_wait)


class DialTest(parameterized.TestCase):

  def test_default_is_eager(self):
    with mock.patch.dict(os.environ):
      os.environ.pop("FAST_INTERPRET_DMA_EXECUTION_MODE", None)
      self.assertEqual(FI().dma_execution_mode, "eager")

  def test_flag(self):
    with flagsaver.as_parsed(fast_interpret_dma_execution_mode="on_wait"):
      self.assertEqual(FI().dma_execution_mode, "on_wait")
      self.assertEqual(FI(dma_execution_mode="eager").dma_execution_mode,
                       "eager")

  def test_env(self):
    with mock.patch.dict(os.environ,
                         {"FAST_INTERPRET_DMA_EXECUTION_MODE": "on_wait"}):
      self.assertEqual(FI().dma_execution_mode, "on_wait")

  def test_invalid_value_raises(self):
    with self.assertRaisesRegex(ValueError, "dma_execution_mode"):
      FI(dma_execution_mode="later")


if __name__ == "__main__":
  absltest.main()
