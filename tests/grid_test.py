"""Feature tests: the pallas_call driver (grids, BlockSpecs, memory spaces).

Covers static grids (1-D/2-D/3-D and ``grid=()``), dynamic grid bounds
(a traced int32 under jit), ``pl.program_id`` / ``pl.num_programs``, named
grids, BlockSpecs (Blocked, ``pl.Squeezed()``/``None`` dims, ``pl.Element``
with padding, blocks that do not divide the array under both
``uninitialized_memory`` fills), memory spaces (``pl.ANY``/``pltpu.HBM`` with
DMAs, ``pltpu.VMEM``, ``pltpu.SMEM``), ``pipeline_mode=pl.Buffered(n)``,
``pltpu.PrefetchScalarGridSpec``, scratch that persists across grid steps
(VMEM, SMEM, DMA and REGULAR semaphores), ``input_output_aliases``, revisited
accumulator outputs (matmul k-loop), megacore splitting, and ``jax.vmap`` /
``jax.grad`` (through a ``custom_vjp``) of fast-interpreted kernels.

Expected values come from plain NumPy/jnp or from JAX's ``interpret=True``.

Run:  python -m pytest tests/grid_test.py -q
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret

try:
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY, DMA, REGULAR  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY, DMA, REGULAR  # pylint: disable=g-import-not-at-top,unused-import

ZERO = FI(uninitialized_memory="zero")
NAN = FI(uninitialized_memory="nan")


def _pid_code(ndim):
  """Kernel-side encoding of the grid position: sum pid[d] * 10**d."""
  code = jnp.int32(0)
  for d in range(ndim):
    code = code + pl.program_id(d) * (10 ** d)
  return code


class StaticGridTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("grid_1d", (4,), (32, 128), (8, 128), lambda i: (i, 0)),
      ("grid_1d_minor", (4,), (8, 512), (8, 128), lambda j: (0, j)),
      ("grid_2d", (2, 4), (16, 128), (8, 32), lambda i, j: (i, j)),
      ("grid_2d_transposed", (4, 2), (16, 128), (8, 32),
       lambda j, i: (i, j)),
      ("grid_3d", (2, 2, 2), (2, 16, 256), (1, 8, 128),
       lambda i, j, k: (i, j, k)),
  )
  def test_blocks_and_program_ids(self, grid, shape, block, index_map):
    nd = len(grid)
    x = _data(shape)

    def kernel(x_ref, o_ref, p_ref):
      o_ref[...] = x_ref[...] * 2.0 + 1.0
      p_ref[...] = jnp.full(p_ref.shape, _pid_code(nd), jnp.int32)

    f = lambda x, interpret=None: _call(
        kernel, (_sds(shape), _sds(shape, jnp.int32)), x, grid=grid,
        in_specs=[pl.BlockSpec(block, index_map)],
        out_specs=(pl.BlockSpec(block, index_map),
                   pl.BlockSpec(block, index_map)), interpret=interpret)
    out, pids = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2 + 1)
    # Which grid point wrote each element, computed on the host.
    expected = np.zeros(shape, np.int64)
    for point in np.ndindex(*grid):
      idx = index_map(*point)
      sl = tuple(slice(i * b, (i + 1) * b) for i, b in zip(idx, block))
      expected[sl] = sum(p * 10 ** d for d, p in enumerate(point))
    np.testing.assert_array_equal(np.asarray(pids), expected)
    # The same kernel under JAX's own interpreter.
    ref_out, ref_pids = f(x, interpret=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(pids), np.asarray(ref_pids))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("grid_2d", (3, 5)), ("grid_3d", (2, 3, 4)))
  def test_num_programs(self, grid):
    def kernel(o_ref):
      for d in range(len(grid)):
        o_ref[d] = pl.num_programs(d)
      o_ref[len(grid)] = _pid_code(len(grid))

    # Written at every step; the last step leaves its program ids.
    out = self.variant(lambda: _call(
        kernel, _sds((len(grid) + 1,), jnp.int32), grid=grid,
        out_specs=SMEM))()
    last = sum((g - 1) * 10 ** d for d, g in enumerate(grid))
    np.testing.assert_array_equal(np.asarray(out), [*grid, last])

  @chex.variants(with_jit=True, without_jit=True)
  def test_grid_order_is_row_major(self):
    """Each step appends its program ids to an SMEM log in grid order."""
    def kernel(o_ref, n_ref):
      @pl.when((pl.program_id(0) == 0) & (pl.program_id(1) == 0))
      def _():
        n_ref[0] = 0
      o_ref[n_ref[0]] = pl.program_id(0) * 10 + pl.program_id(1)
      n_ref[0] += 1

    out = self.variant(lambda: _call(
        kernel, _sds((6,), jnp.int32), grid=(2, 3), out_specs=SMEM,
        scratch_shapes=[pltpu.SMEM((1,), jnp.int32)]))()
    np.testing.assert_array_equal(np.asarray(out), [0, 1, 2, 10, 11, 12])

  @chex.variants(with_jit=True, without_jit=True)
  def test_empty_grid(self):
    x = _data((8, 128))

    def kernel(x_ref, o_ref, n_ref):
      o_ref[...] = jnp.exp(x_ref[...])
      n_ref[0] = 7

    f = lambda x, interpret=None: _call(
        kernel, (_sds((8, 128)), _sds((1,), jnp.int32)), x, grid=(),
        out_specs=(VMEM, SMEM), interpret=interpret)
    out, n = self.variant(f)(x)
    np.testing.assert_allclose(np.asarray(out), np.exp(np.asarray(x)),
                               rtol=1e-6)
    self.assertEqual(int(n[0]), 7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_explicit_grid_spec_and_blocked_dims(self):
    x = _data((16, 256))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...].T

    spec = pl.GridSpec(
        grid=(2, 2),
        in_specs=[pl.BlockSpec((pl.Blocked(8), pl.Blocked(128)),
                               lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((128, 8), lambda i, j: (j, i)))
    out = self.variant(lambda x: _call(kernel, _sds((256, 16)), x,
                                       grid_spec=spec))(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x).T)


class DynamicGridTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("n0", 0), ("n1", 1), ("n3", 3),
                                  ("n4_full", 4))
  def test_dynamic_grid_bound(self, n):
    x = _data((32, 128))

    @functools.partial(jax.jit, static_argnames="interpret")
    def f(n, x, interpret):
      def kernel(x_ref, o_ref, p_ref):
        o_ref[...] = x_ref[...] + 1.0
        p_ref[...] = jnp.full(p_ref.shape,
                              pl.program_id(0) + 100 * pl.num_programs(0),
                              jnp.int32)

      return _call(kernel, (_sds((32, 128)), _sds((32, 128), jnp.int32)), x,
                   grid=(n,),
                   in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                   out_specs=(pl.BlockSpec((8, 128), lambda i: (i, 0)),) * 2,
                   interpret=interpret)

    n_arr = jnp.int32(n)
    out, pids = self.variant(functools.partial(f, interpret=ZERO))(n_arr, x)
    rows = 8 * n
    expected = np.zeros((32, 128), np.float32)
    expected[:rows] = np.asarray(x)[:rows] + 1
    np.testing.assert_array_equal(np.asarray(out), expected)
    expected_pids = np.zeros((32, 128), np.int64)
    expected_pids[:rows] = (np.repeat(np.arange(n), 8)[:, None] + 100 * n)
    np.testing.assert_array_equal(np.asarray(pids), expected_pids)
    # The written region agrees with JAX's own interpreter.
    ref_out, ref_pids = f(n_arr, x, interpret=True)
    np.testing.assert_array_equal(np.asarray(out)[:rows],
                                  np.asarray(ref_out)[:rows])
    np.testing.assert_array_equal(np.asarray(pids)[:rows],
                                  np.asarray(ref_pids)[:rows])

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_compiled_program_for_all_bounds(self):
    """A 2-D grid with one dynamic axis, reused for several bounds."""
    traces = []

    @jax.jit
    def f(m, x):
      traces.append(1)

      def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(1) == 0)
        def _():
          o_ref[...] = jnp.zeros_like(o_ref)
        o_ref[...] += x_ref[...] * pl.num_programs(1).astype(jnp.float32)

      return _call(kernel, _sds((16, 128)), x, grid=(2, m),
                   in_specs=[pl.BlockSpec((8, 128), lambda i, k: (i, 0))],
                   out_specs=pl.BlockSpec((8, 128), lambda i, k: (i, 0)),
                   interpret=ZERO)

    x = _data((16, 128))
    g = self.variant(f)
    for m in (1, 2, 5):
      out = g(jnp.int32(m), x)
      np.testing.assert_allclose(np.asarray(out), np.asarray(x) * m * m,
                                 rtol=1e-6)
    self.assertLen(traces, 1)


class NamedGridTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("grid_arg", False), ("grid_spec", True))
  def test_named_grid_axis_index(self, use_grid_spec):
    # interpret=True does not support named grids (axis_index fails): the
    # reference is NumPy.
    x = _data((16, 128))
    grid = (("rows", 2), ("cols", 4))

    def kernel(x_ref, o_ref):
      r = lax.axis_index("rows")
      c = lax.axis_index("cols")
      o_ref[...] = (x_ref[...] + (r * 10 + c).astype(jnp.float32)
                    + 1000.0 * (pl.program_id(1) - c).astype(jnp.float32))

    in_spec = pl.BlockSpec((8, 32), lambda r, c: (r, c))
    out_spec = pl.BlockSpec((8, 32), lambda r, c: (r, c))
    if use_grid_spec:
      kw = dict(grid_spec=pl.GridSpec(grid=grid, in_specs=[in_spec],
                                      out_specs=out_spec))
    else:
      kw = dict(grid=grid, in_specs=[in_spec], out_specs=out_spec)
    out = self.variant(lambda x: _call(kernel, _sds((16, 128)), x, **kw))(x)
    code = (np.arange(2)[:, None] * 10 + np.arange(4)[None, :]).astype(
        np.float32)
    expected = np.asarray(x) + np.kron(code, np.ones((8, 32), np.float32))
    np.testing.assert_array_equal(np.asarray(out), expected)


class BlockSpecTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("squeezed", pl.Squeezed()), ("none", None))
  def test_squeezed_leading_dim(self, sq):
    x = _data((4, 8, 128))

    def kernel(x_ref, o_ref):
      assert x_ref.shape == (8, 128), x_ref.shape
      o_ref[...] = x_ref[...] * (pl.program_id(0) + 1).astype(jnp.float32)

    f = lambda x, interpret=None: _call(
        kernel, _sds((4, 8, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((sq, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((sq, 8, 128), lambda i: (3 - i, 0, 0)),
        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    expected = (np.asarray(x) * np.arange(1, 5, dtype=np.float32)[:, None,
                                                                  None])[::-1]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_squeezed_middle_dim_and_reduction(self):
    x = _data((8, 4, 128))

    def kernel(x_ref, o_ref):
      assert x_ref.shape == (8, 128), x_ref.shape
      o_ref[...] = jnp.sum(x_ref[...], axis=0, keepdims=True)

    out = self.variant(lambda x: _call(
        kernel, _sds((4, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((8, None, 128), lambda j: (0, j, 0))],
        out_specs=pl.BlockSpec((1, 128), lambda j: (j, 0))))(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x).sum(0),
                               rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_element_block_with_padding(self, fill):
    """A 3-row stencil over an Element dim padded by one row each side."""
    x = _data((4, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[0:1, :] + x_ref[1:2, :] + x_ref[2:3, :]

    f = lambda x, interpret: _call(
        kernel, _sds((4, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((pl.Element(3, (1, 1)), 128),
                               lambda i: (i, 0))],
        out_specs=pl.BlockSpec((1, 128), lambda i: (i, 0)),
        interpret=interpret)
    out = np.asarray(self.variant(functools.partial(
        f, interpret=FI(uninitialized_memory=fill)))(x))
    padded = np.pad(np.asarray(x), ((1, 1), (0, 0)))
    expected = padded[0:4] + padded[1:5] + padded[2:6]
    # Interior rows never touch padding.
    np.testing.assert_allclose(out[1:3], expected[1:3], rtol=1e-6)
    if fill == "zero":
      np.testing.assert_allclose(out, expected, rtol=1e-6)
    else:
      self.assertTrue(np.all(np.isnan(out[0])))
      self.assertTrue(np.all(np.isnan(out[3])))
      ref = np.asarray(f(x, interpret=True))
      np.testing.assert_allclose(out[1:3], ref[1:3], rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_element_offsets_in_index_map(self):
    """Element dims take element offsets (overlapping windows)."""
    x = _data((16, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...]

    out = self.variant(lambda x: _call(
        kernel, _sds((7, 4, 128)), x, grid=(7,),
        in_specs=[pl.BlockSpec((pl.Element(4), 128), lambda i: (2 * i, 0))],
        out_specs=pl.BlockSpec((None, 4, 128), lambda i: (i, 0, 0))))(x)
    h = np.asarray(x)
    expected = np.stack([h[2 * i:2 * i + 4] for i in range(7)])
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_non_dividing_blocks_copy(self, fill):
    """Out-of-range writes are dropped; the in-array region is exact."""
    x = _data((10, 200))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2.0

    f = lambda x, interpret: _call(
        kernel, _sds((10, 200)), x, grid=(3, 2),
        in_specs=[pl.BlockSpec((4, 128), lambda i, j: (i, j))],
        out_specs=pl.BlockSpec((4, 128), lambda i, j: (i, j)),
        interpret=interpret)
    out = np.asarray(self.variant(functools.partial(
        f, interpret=FI(uninitialized_memory=fill)))(x))
    self.assertEqual(out.shape, (10, 200))
    np.testing.assert_array_equal(out, np.asarray(x) * 2)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_non_dividing_block_reads_uninitialized(self, fill):
    """A reduction over the last (partial) block sees the fill value."""
    x = _data((10, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.sum(x_ref[...], axis=0, keepdims=True)

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((3, 128)), x, grid=(3,),
        in_specs=[pl.BlockSpec((4, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((1, 128), lambda i: (i, 0)),
        interpret=FI(uninitialized_memory=fill)))(x))
    h = np.asarray(x, np.float64)
    np.testing.assert_allclose(out[:2], [h[0:4].sum(0), h[4:8].sum(0)],
                               rtol=1e-5, atol=1e-5)
    if fill == "zero":
      np.testing.assert_allclose(out[2], h[8:10].sum(0), rtol=1e-5,
                                 atol=1e-5)
    else:
      self.assertTrue(np.all(np.isnan(out[2])))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_non_dividing_int_block(self, fill):
    x = jnp.arange(6, dtype=jnp.int32) + 1

    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.full(o_ref.shape, jnp.max(x_ref[...]), jnp.int32)

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((2, 128), jnp.int32), x, grid=(2,),
        in_specs=[pl.BlockSpec((4,), lambda i: (i,))],
        out_specs=pl.BlockSpec((1, 128), lambda i: (i, 0)),
        interpret=FI(uninitialized_memory=fill)))(x))
    self.assertTrue(np.all(out[0] == 4))
    if fill == "zero":
      self.assertTrue(np.all(out[1] == 6))
    else:
      self.assertTrue(np.all(out[1] == np.iinfo(np.int32).max))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_output_block_beyond_array_drops_writes(self, fill):
    def kernel(o_ref):
      o_ref[...] = jnp.full(o_ref.shape, pl.program_id(0) + 1, jnp.int32)

    out = np.asarray(self.variant(lambda: _call(
        kernel, _sds((5, 128), jnp.int32), grid=(2,),
        out_specs=pl.BlockSpec((4, 128), lambda i: (i, 0)),
        interpret=FI(uninitialized_memory=fill)))())
    self.assertEqual(out.shape, (5, 128))
    np.testing.assert_array_equal(out[:4], 1)
    np.testing.assert_array_equal(out[4], 2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("buffered1", 1), ("buffered2", 2),
                                  ("buffered3", 3))
  def test_pipeline_mode_buffered(self, n):
    x = _data((32, 128))
    y = _data((32, 128), seed=1)

    def kernel(x_ref, y_ref, o_ref):
      o_ref[...] = x_ref[...] * y_ref[...]

    spec = pl.BlockSpec((8, 128), lambda i: (i, 0),
                        pipeline_mode=pl.Buffered(n))
    f = lambda x, y, interpret=None: _call(
        kernel, _sds((32, 128)), x, y, grid=(4,),
        in_specs=[spec, pl.BlockSpec((8, 128), lambda i: (3 - i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        interpret=interpret)
    out = np.asarray(self.variant(f)(x, y))
    yr = np.asarray(y).reshape(4, 8, 128)[::-1].reshape(32, 128)
    np.testing.assert_array_equal(out, np.asarray(x) * yr)
    np.testing.assert_array_equal(out, np.asarray(f(x, y, interpret=True)))


class MemorySpaceTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("pl_any", pl.ANY), ("pltpu_hbm",
                                                       pltpu.HBM))
  def test_hbm_input_with_dma_in_grid(self, space):
    x = _data((32, 128))

    def kernel(x_hbm, o_ref, buf, sem):
      i = pl.program_id(0)
      pltpu.make_async_copy(x_hbm.at[pl.ds((3 - i) * 8, 8)], buf, sem).start()
      pltpu.make_async_copy(x_hbm.at[pl.ds(0, 8)], buf, sem).wait()
      o_ref[...] = buf[...] + 1.0

    out = self.variant(lambda x: _call(
        kernel, _sds((32, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec(memory_space=space)],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), DMA]))(x)
    expected = np.asarray(x).reshape(4, 8, 128)[::-1].reshape(32, 128) + 1
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hbm_output_written_by_dma(self):
    x = _data((32, 128))

    def kernel(x_ref, o_hbm, sem):
      i = pl.program_id(0)
      pltpu.async_copy(x_ref, o_hbm.at[pl.ds((3 - i) * 8, 8)], sem).wait()

    f = lambda x, interpret=None: _call(
        kernel, _sds((32, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec(memory_space=pltpu.HBM if interpret is None
                               else pl.ANY),
        scratch_shapes=[DMA], interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    expected = np.asarray(x).reshape(4, 8, 128)[::-1].reshape(32, 128)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_whole_array_vmem_in_grid(self):
    """A VMEM memory-space spec gives the whole array at every step."""
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      assert x_ref.shape == (32, 128)
      i = pl.program_id(0)
      o_ref[...] = x_ref[pl.ds(i * 8, 8), :] + jnp.sum(x_ref[0:1, 0:1])

    out = self.variant(lambda x: _call(
        kernel, _sds((32, 128)), x, grid=(4,), in_specs=[VMEM],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0))))(x)
    h = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(out), h + h[0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_smem_tables_in_grid(self):
    table = jnp.array([5, -1, 2, 7], jnp.int32)

    def kernel(t_ref, o_ref, s_ref):
      i = pl.program_id(0)
      o_ref[...] = jnp.full(o_ref.shape, t_ref[i] * 2, jnp.int32)
      s_ref[i] = t_ref[3 - i] + i

    out, s = self.variant(lambda t: _call(
        kernel, (_sds((4, 128), jnp.int32), _sds((4,), jnp.int32)), t,
        grid=(4,), in_specs=[SMEM],
        out_specs=(pl.BlockSpec((1, 128), lambda i: (i, 0)), SMEM)))(table)
    t = np.asarray(table)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.repeat(t[:, None] * 2, 128, 1))
    np.testing.assert_array_equal(np.asarray(s), t[::-1] + np.arange(4))

  @chex.variants(with_jit=True, without_jit=True)
  def test_blocked_smem_spec(self):
    x = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)

    def kernel(x_ref, o_ref):
      for j in range(8):
        o_ref[0, j] = x_ref[0, 7 - j] * 10

    out = self.variant(lambda x: _call(
        kernel, _sds((4, 8), jnp.int32), x, grid=(4,),
        in_specs=[pl.BlockSpec((1, 8), lambda i: (i, 0),
                               memory_space=pltpu.SMEM)],
        out_specs=pl.BlockSpec((1, 8), lambda i: (i, 0),
                               memory_space=pltpu.SMEM)))(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x)[:, ::-1] * 10)


class ScalarPrefetchTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("perm_a", [2, 0, 3, 1]),
                                  ("perm_b", [3, 3, 0, 1]))
  def test_prefetch_in_index_maps_and_kernel(self, perm):
    x = _data((4, 8, 128))
    idx = jnp.array(perm, jnp.int32)
    scale = jnp.array([1, 2, 3, 4], jnp.int32)

    def kernel(idx_ref, scale_ref, x_ref, o_ref):
      i = pl.program_id(0)
      o_ref[...] = (x_ref[...] * scale_ref[i].astype(jnp.float32)
                    + idx_ref[i].astype(jnp.float32))

    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(4,),
        in_specs=[pl.BlockSpec((None, 8, 128),
                               lambda i, idx, sc: (idx[i], 0, 0))],
        out_specs=pl.BlockSpec((None, 8, 128), lambda i, idx, sc: (i, 0, 0)))
    f = lambda idx, scale, x, interpret=None: _call(
        kernel, _sds((4, 8, 128)), idx, scale, x, grid_spec=gs,
        interpret=interpret)
    out = np.asarray(self.variant(f)(idx, scale, x))
    p = np.asarray(idx)
    expected = (np.asarray(x)[p] * np.arange(1, 5)[:, None, None]
                + p[:, None, None]).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out,
                                  np.asarray(f(idx, scale, x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_prefetch_in_output_index_map_with_scratch(self):
    """Scatter blocks to prefetched destinations; count steps in scratch."""
    x = _data((4, 8, 128))
    dst = jnp.array([1, 3, 0, 2], jnp.int32)

    def kernel(dst_ref, x_ref, o_ref, n_ref, cnt_ref):
      i = pl.program_id(0)

      @pl.when(i == 0)
      def _():
        cnt_ref[0] = 0

      cnt_ref[0] += dst_ref[i]
      o_ref[...] = x_ref[...]
      n_ref[0] = cnt_ref[0]

    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(4,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i, d: (i, 0, 0))],
        out_specs=[pl.BlockSpec((None, 8, 128), lambda i, d: (d[i], 0, 0)),
                   pl.BlockSpec(memory_space=pltpu.SMEM)],
        scratch_shapes=[pltpu.SMEM((1,), jnp.int32)])
    out, n = self.variant(lambda d, x: _call(
        kernel, (_sds((4, 8, 128)), _sds((1,), jnp.int32)), d, x,
        grid_spec=gs))(dst, x)
    expected = np.empty((4, 8, 128), np.float32)
    expected[np.asarray(dst)] = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(out), expected)
    self.assertEqual(int(n[0]), 6)


class ScratchTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmem_scratch_accumulator(self):
    x = _data((4, 8, 128))

    def kernel(x_ref, o_ref, acc_ref):
      @pl.when(pl.program_id(0) == 0)
      def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

      acc_ref[...] += x_ref[...]

      @pl.when(pl.program_id(0) == pl.num_programs(0) - 1)
      def _():
        o_ref[...] = acc_ref[...]

    f = lambda x, interpret=None: _call(
        kernel, _sds((8, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)],
        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    np.testing.assert_allclose(out, np.asarray(x, np.float64).sum(0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_mixed_scratch_persists(self):
    """VMEM, SMEM, a DMA semaphore array and a REGULAR semaphore array."""
    x = _data((32, 128))

    def kernel(x_hbm, o_ref, c_ref, buf, cnt, dsems, rsems):
      i = pl.program_id(0)

      @pl.when(i == 0)
      def _():
        cnt[0] = 0
        buf[...] = jnp.zeros_like(buf)

      cp = pltpu.make_async_copy(x_hbm.at[pl.ds(i * 8, 8)], buf.at[i % 2],
                                 dsems.at[i % 2])
      cp.start()
      cp.wait()
      pl.semaphore_signal(rsems.at[i % 3], i + 1)
      cnt[0] += 1
      # buf[1 - i % 2] still holds the previous step's chunk.
      o_ref[...] = buf[i % 2] - buf[1 - i % 2]
      c_ref[0] = cnt[0]
      for k in range(3):
        c_ref[1 + k] = pl.semaphore_read(rsems.at[k])

      # A kernel must leave its semaphores at zero.
      @pl.when(i == pl.num_programs(0) - 1)
      def _():
        for k in range(3):
          pl.semaphore_wait(rsems.at[k], pl.semaphore_read(rsems.at[k]))

    out, c = self.variant(lambda x: _call(
        kernel, (_sds((32, 128)), _sds((4,), jnp.int32)), x, grid=(4,),
        in_specs=[ANY],
        out_specs=(pl.BlockSpec((8, 128), lambda i: (i, 0)), SMEM),
        scratch_shapes=[pltpu.VMEM((2, 8, 128), jnp.float32),
                        pltpu.SMEM((1,), jnp.int32), DMA((2,)),
                        REGULAR((3,))]))(x)
    h = np.asarray(x).reshape(4, 8, 128)
    prev = np.concatenate([np.zeros((1, 8, 128), np.float32), h[:-1]])
    np.testing.assert_array_equal(np.asarray(out),
                                  (h - prev).reshape(32, 128))
    # rsems: 0 <- steps 0 and 3 (1 + 4), 1 <- step 1 (2), 2 <- step 2 (3).
    np.testing.assert_array_equal(np.asarray(c), [4, 5, 2, 3])


class AliasAndRevisitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_aliased_blocked_input_updated_in_place(self):
    x = _data((32, 128))
    y = _data((32, 128), seed=1)

    def kernel(x_ref, y_ref, o_ref):
      o_ref[...] = x_ref[...] + y_ref[...] * 2.0

    # Only blocks 1 and 2 of the aliased output are visited: 0 and 3 must
    # keep the input's values.
    f = lambda x, y, interpret=None: _call(
        kernel, _sds((32, 128)), x, y, grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i + 1, 0))] * 2,
        out_specs=pl.BlockSpec((8, 128), lambda i: (i + 1, 0)),
        input_output_aliases={1: 0}, interpret=interpret)
    out = np.asarray(self.variant(f)(x, y))
    expected = np.asarray(y).copy()
    expected[8:24] = np.asarray(x)[8:24] + np.asarray(y)[8:24] * 2
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, y, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_aliased_hbm_read_and_written_in_place(self):
    """Read rows of the aliased HBM buffer, write them back elsewhere."""
    x = _data((16, 128))

    def kernel(x_hbm, o_hbm, buf, sem):
      pltpu.sync_copy(x_hbm.at[pl.ds(0, 4)], buf)
      buf[...] = buf[...] * 10.0
      # Writes through the output alias; x_hbm and o_hbm are one buffer.
      pltpu.async_copy(buf, o_hbm.at[pl.ds(8, 4)], sem).wait()
      pltpu.sync_copy(o_hbm.at[pl.ds(8, 4)], buf)
      buf[...] += 1.0
      pltpu.sync_copy(buf, x_hbm.at[pl.ds(12, 4)])

    f = lambda x, interpret=None: _call(
        kernel, _sds((16, 128)), x, in_specs=[ANY], out_specs=ANY,
        scratch_shapes=[pltpu.VMEM((4, 128), jnp.float32), DMA],
        input_output_aliases={0: 0}, interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    h = np.asarray(x)
    expected = h.copy()
    expected[8:12] = h[0:4] * 10
    expected[12:16] = h[0:4] * 10 + 1
    # NumPy reference only: interpret=True keeps the aliased input and output
    # refs apart inside the kernel, so it drops the write through x_hbm that
    # a TPU (one shared HBM buffer) keeps.
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aliased_blocked_input_with_hbm_output_dma(self):
    """Blocks read through VMEM, written back in place by DMA to the alias."""
    x = _data((32, 128))

    def kernel(x_ref, o_hbm, buf, sem):
      i = pl.program_id(0)
      buf[...] = x_ref[...] * -2.0
      pltpu.async_copy(buf, o_hbm.at[pl.ds(i * 16, 8)], sem).wait()

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((32, 128)), x, grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (2 * i, 0))],
        out_specs=ANY,
        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32), DMA],
        input_output_aliases={0: 0}))(x))
    expected = np.asarray(x).copy()
    expected[0:8] *= -2
    expected[16:24] *= -2
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_m16_k256_n256", (16, 256, 256), (8, 128, 128), jnp.float32),
      ("bf16_m32_k384_n128", (32, 384, 128), (16, 128, 128), jnp.bfloat16),
  )
  def test_matmul_k_loop_revisits_output(self, mkn, blocks, dtype):
    m, k, n = mkn
    bm, bk, bn = blocks
    a = _data((m, k), dtype, seed=3)
    b = _data((k, n), dtype, seed=4)

    def kernel(a_ref, b_ref, o_ref):
      @pl.when(pl.program_id(2) == 0)
      def _():
        o_ref[...] = jnp.zeros_like(o_ref)

      o_ref[...] += jnp.dot(a_ref[...], b_ref[...],
                            preferred_element_type=jnp.float32)

    out = self.variant(lambda a, b: _call(
        kernel, _sds((m, n)), a, b, grid=(m // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"))))(a, b)
    ha = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    hb = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(out), ha @ hb, rtol=1e-4,
                               atol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_revisited_output_keeps_buffer_between_steps(self):
    """Without init, the output block keeps the previous step's contents."""
    x = _data((4, 8, 128))

    def kernel(x_ref, o_ref):
      i = pl.program_id(0)

      @pl.when(i == 0)
      def _():
        o_ref[...] = x_ref[...]

      @pl.when(i > 0)
      def _():
        o_ref[...] = o_ref[...] * 0.5 + x_ref[...]

    f = lambda x, interpret=None: _call(
        kernel, _sds((8, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    h = np.asarray(x)
    expected = h[0]
    for i in range(1, 4):
      expected = expected * np.float32(0.5) + h[i]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(f(x, interpret=True)),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_megacore_split_with_accumulator(self):
    """num_cores_or_threads=2 splits the parallel axis; same result."""
    x = _data((4, 3, 8, 128))

    def kernel(x_ref, o_ref):
      @pl.when(pl.program_id(1) == 0)
      def _():
        o_ref[...] = jnp.zeros_like(o_ref)
      o_ref[...] += x_ref[...]

    out = self.variant(lambda x: _call(
        kernel, _sds((4, 8, 128)), x, grid=(4, 3),
        in_specs=[pl.BlockSpec((None, None, 8, 128),
                               lambda i, j: (i, j, 0, 0))],
        out_specs=pl.BlockSpec((None, 8, 128), lambda i, j: (i, 0, 0)),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        interpret=FI(num_cores_or_threads=2)))(x)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(x, np.float64).sum(1), rtol=1e-5,
                               atol=1e-5)


# ---------------------------------------------------------------------------
# Transformations of code that contains fast-interpreted kernels.


def _square_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] * x_ref[...]


def _square_bwd_kernel(x_ref, g_ref, o_ref):
  o_ref[...] = 2.0 * x_ref[...] * g_ref[...]


def _blocked(kernel, n_in, x_shape):
  spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
  return pl.pallas_call(kernel, out_shape=_sds(x_shape),
                        grid=(x_shape[0] // 8,), in_specs=[spec] * n_in,
                        out_specs=spec, interpret=FI())


@jax.custom_vjp
def _square(x):
  return _blocked(_square_kernel, 1, x.shape)(x)


def _square_fwd(x):
  return _square(x), x


def _square_bwd(x, g):
  return (_blocked(_square_bwd_kernel, 2, x.shape)(x, g),)


_square.defvjp(_square_fwd, _square_bwd)


class TransformationsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_grad_through_custom_vjp_kernels(self):
    x = _data((16, 128))
    w = _data((16, 128), seed=1)

    def loss(x, w):
      return jnp.sum(_square(x) * w)

    val, grad = self.variant(jax.value_and_grad(loss))(x, w)
    hx, hw = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(float(val), np.sum(hx * hx * hw), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grad), 2 * hx * hw, rtol=1e-5,
                               atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_second_kernel_sees_first_kernels_output_under_grad(self):
    x = _data((16, 128))
    grad = self.variant(jax.grad(lambda x: jnp.sum(_square(_square(x)))))(x)
    h = np.asarray(x, np.float64)
    np.testing.assert_allclose(np.asarray(grad), 4 * h ** 3, rtol=1e-4,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("batch2", 2), ("batch3", 3))
  def test_vmap_of_pallas_call(self, batch):
    x = _data((batch, 16, 128))
    y = _data((16, 128), seed=1)

    def kernel(x_ref, y_ref, o_ref):
      o_ref[...] = (x_ref[...] * y_ref[...]
                    + (pl.program_id(0) + 10 * pl.num_programs(0)).astype(
                        jnp.float32))

    def one(x, y, interpret=None):
      spec = pl.BlockSpec((8, 128), lambda i: (i, 0))
      return _call(kernel, _sds((16, 128)), x, y, grid=(2,),
                   in_specs=[spec, spec], out_specs=spec,
                   interpret=interpret)

    out = np.asarray(self.variant(jax.vmap(one, in_axes=(0, None)))(x, y))
    pid = np.repeat(np.arange(2, dtype=np.float32), 8)[:, None] + 20
    expected = np.asarray(x) * np.asarray(y)[None] + pid[None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    ref = jax.vmap(functools.partial(one, interpret=True),
                   in_axes=(0, None))(x, y)
    np.testing.assert_array_equal(out, np.asarray(ref))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_kernel_with_scratch_accumulator(self):
    x = _data((3, 4, 8, 128))

    def one(x):
      def kernel(x_ref, o_ref, acc_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
          acc_ref[...] = jnp.zeros_like(acc_ref)
        acc_ref[...] += x_ref[...]
        o_ref[...] = acc_ref[...]

      return _call(kernel, _sds((8, 128)), x, grid=(4,),
                   in_specs=[pl.BlockSpec((None, 8, 128),
                                          lambda i: (i, 0, 0))],
                   out_specs=pl.BlockSpec((8, 128), lambda i: (0, 0)),
                   scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)])

    out = self.variant(jax.vmap(one))(x)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(x, np.float64).sum(1), rtol=1e-5,
                               atol=1e-5)


  # Under jax.vmap an operand with memory_space=pl.ANY gets a block mapping
  # (Squeezed(), 8, 128) over the vmapped grid dim: the kernel must see the
  # per-example (8, 128) slice (as interpret=True does, see
  # test_vmap_of_kernel_with_hbm_operands_reference).
  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_kernel_with_hbm_input_and_dma(self):
    x = _data((2, 8, 128))
    out = np.asarray(self.variant(jax.vmap(_hbm_in_kernel_call))(x))
    np.testing.assert_array_equal(out, np.asarray(x)[:, 2:6])

  # The same for an HBM output written by DMA under vmap.
  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_kernel_with_hbm_output_and_dma(self):
    x = _data((2, 8, 128))
    out = np.asarray(self.variant(jax.vmap(_hbm_out_kernel_call))(x))
    h = np.asarray(x)
    np.testing.assert_array_equal(out, np.concatenate([h[:, :4], h], 1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_kernel_with_hbm_operands_reference(self):
    """The two kernels above under interpret=True: the expectations hold."""
    x = _data((2, 8, 128))
    h = np.asarray(x)
    out = self.variant(jax.vmap(functools.partial(
        _hbm_in_kernel_call, interpret=True)))(x)
    np.testing.assert_array_equal(np.asarray(out), h[:, 2:6])
    out = self.variant(jax.vmap(functools.partial(
        _hbm_out_kernel_call, interpret=True)))(x)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.concatenate([h[:, :4], h], 1))


def _hbm_in_kernel(x_hbm, o_ref, sem):
  pltpu.async_copy(x_hbm.at[pl.ds(2, 4)], o_ref, sem).wait()


def _hbm_in_kernel_call(x, interpret=None):
  return _call(_hbm_in_kernel, _sds((4, 128)), x, in_specs=[ANY],
               scratch_shapes=[DMA], interpret=interpret)


def _hbm_out_kernel(x_ref, o_hbm, sem):
  pltpu.async_copy(x_ref, o_hbm.at[pl.ds(4, 8)], sem).wait()
  pltpu.async_copy(x_ref.at[pl.ds(0, 4)], o_hbm.at[pl.ds(0, 4)], sem).wait()


def _hbm_out_kernel_call(x, interpret=None):
  return _call(_hbm_out_kernel, _sds((12, 128)), x, out_specs=ANY,
               scratch_shapes=[DMA], interpret=interpret)

if __name__ == "__main__":
  absltest.main()
