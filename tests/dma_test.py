"""Feature tests: local DMAs and semaphores under fast_interpret.

Covers ``pltpu.make_async_copy`` / ``async_copy`` / ``sync_copy`` between
HBM and VMEM (both ways), VMEM and VMEM and HBM and HBM, with ``.at[...]``
slices on either side; ``.start()`` / ``.wait()`` split apart; double
buffering over an in-kernel loop and across grid steps; REGULAR semaphores
(``pl.semaphore_signal`` / ``semaphore_wait`` / ``semaphore_read``, read back
and checked against the expected count) and DMA semaphore counts (nonzero
after ``start``, zero after ``wait``).

Expected values come from plain NumPy or from JAX's ``interpret=True`` mode.

Run:  python -m pytest tests/dma_test.py -q
"""


from absl.testing import absltest
from absl.testing import parameterized
import chex
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY, HBM, DMA, REGULAR  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY, HBM, DMA, REGULAR  # pylint: disable=g-import-not-at-top,unused-import



X = _data((16, 128))


def _np(x):
  x = jnp.asarray(x)
  return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)


# ---------------------------------------------------------------------------
# Copy kernels: (kernel, in_spec, out_spec, scratch, out_shape, reference).


def _hbm_to_vmem_whole(x_hbm, o_ref, buf, sem):
  cp = pltpu.make_async_copy(x_hbm, buf, sem)
  cp.start()
  cp.wait()
  o_ref[...] = buf[...] + 1.0


def _hbm_to_vmem_sliced(x_hbm, o_ref, buf, sem):
  cp = pltpu.make_async_copy(x_hbm.at[pl.ds(4, 8), pl.ds(0, 64)],
                             buf.at[pl.ds(0, 8), pl.ds(64, 64)], sem)
  buf[...] = jnp.zeros(buf.shape, buf.dtype)
  cp.start()
  cp.wait()
  o_ref[...] = buf[...]


def _vmem_to_hbm_sliced(x_ref, o_hbm, sem):
  # Four copies that together tile the output, rows permuted.
  for k in range(4):
    pltpu.make_async_copy(x_ref.at[pl.ds(4 * k, 4)],
                          o_hbm.at[pl.ds(4 * (3 - k), 4)], sem).start()
  for k in range(4):
    pltpu.make_async_copy(x_ref.at[pl.ds(4 * k, 4)],
                          o_hbm.at[pl.ds(4 * (3 - k), 4)], sem).wait()


def _vmem_to_vmem(x_ref, o_ref, buf, sem):
  pltpu.async_copy(x_ref.at[8:16], buf.at[0:8], sem).wait()
  pltpu.async_copy(x_ref.at[0:8], buf.at[8:16], sem).wait()
  pltpu.sync_copy(buf, o_ref)


def _hbm_to_hbm(x_hbm, o_hbm, sem):
  pltpu.async_copy(x_hbm.at[0:8], o_hbm.at[8:16], sem).wait()
  pltpu.async_copy(x_hbm.at[8:16], o_hbm.at[0:8], sem).wait()


def _sync_copy_both_ways(x_hbm, o_hbm, buf):
  pltpu.sync_copy(x_hbm.at[pl.ds(2, 8)], buf)
  buf[...] = buf[...] * -1.0
  pltpu.sync_copy(buf, o_hbm.at[pl.ds(0, 8)])
  pltpu.sync_copy(x_hbm.at[pl.ds(0, 8)], o_hbm.at[pl.ds(8, 8)])


def _ref_hbm_to_vmem_sliced(x):
  o = np.zeros((8, 128), np.float32)
  o[:, 64:] = x[4:12, 0:64]
  return o


def _ref_sync_copy(x):
  return np.concatenate([-x[2:10], x[0:8]])


_COPY_CASES = [
    ("hbm_to_vmem_whole", _hbm_to_vmem_whole, ANY, VMEM,
     [pltpu.VMEM((16, 128), jnp.float32), DMA], (16, 128), lambda x: x + 1),
    ("hbm_to_vmem_pltpu_hbm_space", _hbm_to_vmem_whole, HBM, VMEM,
     [pltpu.VMEM((16, 128), jnp.float32), DMA], (16, 128), lambda x: x + 1),
    ("hbm_to_vmem_sliced_both_sides", _hbm_to_vmem_sliced, ANY, VMEM,
     [pltpu.VMEM((8, 128), jnp.float32), DMA], (8, 128),
     _ref_hbm_to_vmem_sliced),
    ("vmem_to_hbm_sliced_dst", _vmem_to_hbm_sliced, VMEM, ANY, [DMA],
     (16, 128), lambda x: x.reshape(4, 4, 128)[::-1].reshape(16, 128)),
    ("vmem_to_vmem", _vmem_to_vmem, VMEM, VMEM,
     [pltpu.VMEM((16, 128), jnp.float32), DMA], (16, 128),
     lambda x: np.concatenate([x[8:], x[:8]])),
    ("hbm_to_hbm", _hbm_to_hbm, ANY, ANY, [DMA], (16, 128),
     lambda x: np.concatenate([x[8:], x[:8]])),
    ("sync_copy_both_ways", _sync_copy_both_ways, ANY, ANY,
     [pltpu.VMEM((8, 128), jnp.float32)], (16, 128), _ref_sync_copy),
]


class DmaCopyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_COPY_CASES)
  def test_copy(self, kernel, in_spec, out_spec, scratch, out_shape,
                reference):
    f = lambda x, interpret=None: _call(
        kernel, _sds(out_shape), x, in_specs=[in_spec], out_specs=out_spec,
        scratch_shapes=scratch, interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    np.testing.assert_array_equal(out, reference(np.asarray(X)))
    if in_spec is not HBM:
      np.testing.assert_array_equal(out, np.asarray(f(X, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("bf16", jnp.bfloat16), ("int8", jnp.int8),
                                  ("int32", jnp.int32))
  def test_copy_narrow_dtypes(self, dtype):
    x = _data((32, 128), dtype, seed=3)

    def kernel(x_hbm, o_hbm, buf, sem):
      pltpu.async_copy(x_hbm.at[pl.ds(16, 16)], buf, sem).wait()
      pltpu.async_copy(buf, o_hbm.at[pl.ds(0, 16)], sem).wait()
      pltpu.sync_copy(x_hbm.at[pl.ds(0, 16)], o_hbm.at[pl.ds(16, 16)])

    out = self.variant(lambda x: _call(
        kernel, _sds((32, 128), dtype), x, in_specs=[ANY], out_specs=ANY,
        scratch_shapes=[pltpu.VMEM((16, 128), dtype), DMA]))(x)
    self.assertEqual(out.dtype, dtype)
    h = _np(x)
    np.testing.assert_array_equal(_np(out), np.concatenate([h[16:], h[:16]]))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("start0", 0), ("start5", 5))
  def test_dynamic_slice_offsets(self, start):
    def kernel(s_ref, x_hbm, o_ref, sem):
      s = s_ref[0]
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      pltpu.async_copy(x_hbm.at[pl.ds(s, 4)], o_ref.at[pl.ds(8 - s // 2, 4)],
                       sem).wait()

    f = lambda s, x, interpret=None: _call(
        kernel, _sds((12, 128)), s, x, in_specs=[SMEM, ANY], out_specs=VMEM,
        scratch_shapes=[DMA], interpret=interpret)
    s = jnp.array([start], jnp.int32)
    out = np.asarray(self.variant(f)(s, X))
    expected = np.zeros((12, 128), np.float32)
    d = 8 - start // 2
    expected[d:d + 4] = np.asarray(X)[start:start + 4]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(s, X, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_start_all_then_wait_all(self):
    """Several DMAs in flight at once on a semaphore array."""

    def kernel(x_hbm, o_ref, buf, sems):
      copies = [pltpu.make_async_copy(x_hbm.at[pl.ds(4 * k, 4)],
                                      buf.at[k], sems.at[k])
                for k in range(4)]
      for c in copies:
        c.start()
      for c in reversed(copies):
        c.wait()
      o_ref[...] = buf[0] + buf[1] + buf[2] + buf[3]

    out = self.variant(lambda x: _call(
        kernel, _sds((4, 128)), x, in_specs=[ANY], out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((4, 4, 128), jnp.float32),
                        DMA((4,))]))(X)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(X).reshape(4, 4, 128).sum(0),
                               rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_wait_covers_two_copies(self):
    """Waits count bytes: one (8, 128) wait balances two (4, 128) copies."""

    def kernel(x_hbm, o_ref, c_ref, sem):
      pltpu.make_async_copy(x_hbm.at[8:12], o_ref.at[0:4], sem).start()
      pltpu.make_async_copy(x_hbm.at[0:4], o_ref.at[4:8], sem).start()
      pltpu.make_async_copy(x_hbm.at[0:8], o_ref, sem).wait()
      c_ref[0] = pl.semaphore_read(sem)

    f = lambda x, interpret=None: _call(
        kernel, (_sds((8, 128)), _sds((1,), jnp.int32)), x, in_specs=[ANY],
        out_specs=(VMEM, SMEM), scratch_shapes=[DMA], interpret=interpret)
    out, c = self.variant(f)(X)
    h = np.asarray(X)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.concatenate([h[8:12], h[0:4]]))
    self.assertEqual(int(c[0]), 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sync_copy_add(self):
    """sync_copy(add=True) accumulates into the destination."""
    def kernel(x_hbm, o_ref):
      o_ref[...] = jnp.ones(o_ref.shape, o_ref.dtype)
      pltpu.sync_copy(x_hbm.at[0:8], o_ref, add=True)
      pltpu.sync_copy(x_hbm.at[8:16], o_ref, add=True)

    out = self.variant(lambda x: _call(kernel, _sds((8, 128)), x,
                                       in_specs=[ANY], out_specs=VMEM))(X)
    x = np.asarray(X)
    np.testing.assert_allclose(np.asarray(out), 1 + x[:8] + x[8:],
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("chunks4", 4), ("chunks8", 8))
  def test_double_buffering_in_loop(self, n_chunks):
    """Start chunk i+1 into the other slot before waiting on chunk i."""
    rows = 64 // n_chunks
    x = _data((64, 128), seed=4)

    def kernel(x_hbm, o_ref, buf, sems):
      def copy(i, slot):
        return pltpu.make_async_copy(x_hbm.at[pl.ds(i * rows, rows)],
                                     buf.at[slot], sems.at[slot])

      copy(0, 0).start()
      o_ref[...] = jnp.zeros_like(o_ref)

      @pl.loop(0, n_chunks)
      def _(i):
        slot = i % 2

        @pl.when(i + 1 < n_chunks)
        def _():
          copy(i + 1, 1 - slot).start()

        copy(i, slot).wait()
        o_ref[...] += buf[slot] * (i + 1).astype(jnp.float32)

    f = lambda x, interpret=None: _call(
        kernel, _sds((rows, 128)), x, in_specs=[ANY], out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((2, rows, 128), jnp.float32), DMA((2,))],
        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    h = np.asarray(x, np.float64).reshape(n_chunks, rows, 128)
    expected = (h * np.arange(1, n_chunks + 1)[:, None, None]).sum(0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out, np.asarray(f(x, interpret=True)),
                               rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_double_buffering_across_grid_steps(self):
    """Prefetch the next grid step's chunk; scratch semaphores persist."""
    x = _data((32, 128), seed=5)

    def kernel(x_hbm, o_ref, buf, sems):
      i = pl.program_id(0)
      n = pl.num_programs(0)

      def copy(j, slot):
        return pltpu.make_async_copy(x_hbm.at[pl.ds(j * 8, 8)],
                                     buf.at[slot], sems.at[slot])

      @pl.when(i == 0)
      def _():
        copy(0, 0).start()

      @pl.when(i + 1 < n)
      def _():
        copy(i + 1, (i + 1) % 2).start()

      copy(i, i % 2).wait()
      o_ref[...] = buf[i % 2] + i.astype(jnp.float32)

    f = lambda x, interpret=None: _call(
        kernel, _sds((32, 128)), x, grid=(4,), in_specs=[ANY],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32), DMA((2,))],
        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    expected = np.asarray(x) + np.repeat(np.arange(4, dtype=np.float32),
                                         8)[:, None]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))


class SemaphoreTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_regular_semaphore_signal_wait_read(self):
    def kernel(o_ref, sems):
      o_ref[0] = pl.semaphore_read(sems.at[1])
      pl.semaphore_signal(sems.at[1], 3)
      pl.semaphore_signal(sems.at[1])
      o_ref[1] = pl.semaphore_read(sems.at[1])
      pl.semaphore_wait(sems.at[1], 2)
      o_ref[2] = pl.semaphore_read(sems.at[1])
      o_ref[3] = pl.semaphore_read(sems.at[0])
      pl.semaphore_signal(sems.at[0], 7)
      pl.semaphore_wait(sems.at[0], 7)
      pl.semaphore_wait(sems.at[1], 2)
      o_ref[4] = pl.semaphore_read(sems.at[0]) + pl.semaphore_read(sems.at[1])

    f = lambda interpret=None: _call(
        kernel, _sds((5,), jnp.int32), out_specs=SMEM,
        scratch_shapes=[REGULAR((2,))], interpret=interpret)
    out = np.asarray(self.variant(f)())
    np.testing.assert_array_equal(out, [0, 4, 2, 0, 0])
    np.testing.assert_array_equal(out, np.asarray(f(interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("inc2", 2), ("inc5", 5))
  def test_semaphore_dynamic_index_and_increment(self, inc):
    def kernel(v_ref, o_ref, sems):
      @pl.loop(0, 4)
      def _(i):
        pl.semaphore_signal(sems.at[i % 3], v_ref[0] + i)

      for k in range(3):
        o_ref[k] = pl.semaphore_read(sems.at[k])
        # A kernel must leave its semaphores at zero.
        pl.semaphore_wait(sems.at[k], o_ref[k])

    f = lambda v: _call(kernel, _sds((3,), jnp.int32), v, in_specs=[SMEM],
                        out_specs=SMEM, scratch_shapes=[REGULAR((3,))])
    out = np.asarray(self.variant(f)(jnp.array([inc], jnp.int32)))
    expected = np.zeros(3, np.int64)
    for i in range(4):
      expected[i % 3] += inc + i
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_semaphore_wait_without_decrement(self):
    def kernel(o_ref, sem):
      pl.semaphore_signal(sem, 4)
      pl.semaphore_wait(sem, 4, decrement=False)
      o_ref[0] = pl.semaphore_read(sem)
      pl.semaphore_wait(sem, 4)
      o_ref[1] = pl.semaphore_read(sem)

    out = self.variant(lambda: _call(kernel, _sds((2,), jnp.int32),
                                     out_specs=SMEM,
                                     scratch_shapes=[REGULAR]))()
    np.testing.assert_array_equal(np.asarray(out), [4, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_regular_semaphore_persists_across_grid_steps(self):
    def kernel(o_ref, sem):
      pl.semaphore_signal(sem, pl.program_id(0) + 1)
      o_ref[0, 0] = pl.semaphore_read(sem)

      @pl.when(pl.program_id(0) == pl.num_programs(0) - 1)
      def _():
        pl.semaphore_wait(sem, pl.semaphore_read(sem))

    out = self.variant(lambda: _call(
        kernel, _sds((4, 1), jnp.int32), grid=(4,),
        out_specs=pl.BlockSpec((1, 1), lambda i: (i, 0),
                               memory_space=pltpu.SMEM),
        scratch_shapes=[REGULAR]))()
    np.testing.assert_array_equal(np.asarray(out)[:, 0], [1, 3, 6, 10])

  @chex.variants(with_jit=True, without_jit=True)
  def test_dma_semaphore_count_nonzero_after_start_zero_after_wait(self):
    def kernel(x_hbm, o_ref, c_ref, buf, sem):
      cp1 = pltpu.make_async_copy(x_hbm.at[0:8], buf.at[0:8], sem)
      cp2 = pltpu.make_async_copy(x_hbm.at[8:16], buf.at[8:16], sem)
      c_ref[0] = pl.semaphore_read(sem)
      cp1.start()
      c_ref[1] = pl.semaphore_read(sem)
      cp2.start()
      c_ref[2] = pl.semaphore_read(sem)
      cp1.wait()
      c_ref[3] = pl.semaphore_read(sem)
      cp2.wait()
      c_ref[4] = pl.semaphore_read(sem)
      o_ref[...] = buf[...]

    out, c = self.variant(lambda x: _call(
        kernel, (_sds((16, 128)), _sds((5,), jnp.int32)), x, in_specs=[ANY],
        out_specs=(VMEM, SMEM),
        scratch_shapes=[pltpu.VMEM((16, 128), jnp.float32), DMA]))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X))
    c = np.asarray(c)
    self.assertEqual(c[0], 0)
    self.assertGreater(c[1], 0)  # In flight (or done, not yet waited).
    self.assertGreater(c[2], c[1])  # Two copies signalled.
    self.assertGreater(c[3], 0)  # One still un-waited.
    self.assertEqual(c[4], 0)  # Balanced after both waits.
    self.assertEqual(c[2], 2 * c[1])  # Same-size copies count the same.

  @chex.variants(with_jit=True, without_jit=True)
  def test_dma_semaphore_zero_after_wait_each_grid_step(self):
    def kernel(x_hbm, o_ref, buf, sem):
      i = pl.program_id(0)
      cp = pltpu.make_async_copy(x_hbm.at[pl.ds(i * 4, 4)], buf, sem)
      cp.start()
      started = pl.semaphore_read(sem)
      cp.wait()
      o_ref[...] = buf[...]
      o_ref[0:1, 0:2] = jnp.stack(
          [jnp.minimum(started, 1), pl.semaphore_read(sem)]).astype(
              jnp.float32)[None, :]

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((16, 128)), x, grid=(4,), in_specs=[ANY],
        out_specs=pl.BlockSpec((4, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((4, 128), jnp.float32), DMA]))(X))
    expected = np.asarray(X).copy()
    expected[0::4, 0] = 1.0
    expected[0::4, 1] = 0.0
    np.testing.assert_array_equal(out, expected)


if __name__ == "__main__":
  absltest.main()
