"""Feature tests: ``pltpu.emit_pipeline`` inside a pallas_call.

A pipeline lowers to DMAs, DMA semaphores, ``run_scoped`` buffers and a
``fori_loop``, all of which fast interpret simulates; these tests run the
shapes kernels use: a matmul over a 3-D pipeline grid that reads
``pl.program_id`` in its body, nested pipelines, ``emit_pipeline_with_allocations``
(``pltpu.BufferedRef`` allocations reused by two pipelines), ragged
``pl.BoundedSlice`` blocks addressed by dynamic ``pl.ds`` from scalar
prefetch, block offsets read from SMEM, a dynamic pipeline grid, triple
buffering, ``no_pipelining``, and a pipeline per step of an outer grid.

Expected values come from plain jnp/NumPy.

Run:  python -m pytest tests/pipeline_test.py -q
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
  from tests.feature_util import setUpModule, sds, data, FI, ANY  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds, data, FI, ANY  # pylint: disable=g-import-not-at-top,unused-import

X16 = data((16, 128))


def _hbm_call(kernel, out_shape, *args, num_scalar_prefetch=0, grid=()):
  """A pallas_call whose array operands all stay in HBM (pl.ANY)."""
  num_arrays = len(args) - num_scalar_prefetch
  return pl.pallas_call(
      kernel, out_shape=out_shape,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalar_prefetch, grid=grid,
          in_specs=[ANY] * num_arrays, out_specs=ANY),
      interpret=FI())(*args)


def _matmul(x, y, bm=128, bk=128, bn=128):
  """The Pallas pipelining guide's matmul: a 3-D pipeline over HBM refs."""
  m, k = x.shape
  _, n = y.shape

  def kernel(x_hbm, y_hbm, o_hbm):
    def body(x_ref, y_ref, o_ref):
      @pl.when(pl.program_id(2) == 0)
      def _():
        o_ref[...] = jnp.zeros_like(o_ref)

      o_ref[...] += jnp.dot(x_ref[...], y_ref[...],
                            preferred_element_type=jnp.float32
                            ).astype(o_ref.dtype)

    pltpu.emit_pipeline(
        body, grid=(m // bm, n // bn, k // bk),
        in_specs=[pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
                  pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
    )(x_hbm, y_hbm, o_hbm)

  return _hbm_call(kernel, sds((m, n), jnp.float32), x, y)


class PipelineTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_2x2x2", jnp.float32, 256, 256, 256),
      ("bf16_1x2x3", jnp.bfloat16, 128, 384, 256),
  )
  def test_matmul_accumulates_over_the_pipeline_k_axis(self, dtype, m, k, n):
    x, y = data((m, k), dtype, seed=1), data((k, n), dtype, seed=2)
    out = self.variant(_matmul)(x, y)
    expected = np.asarray(x, np.float32) @ np.asarray(y, np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nested_pipelines_see_their_own_program_ids(self):
    x = data((512, 256))

    def kernel(x_hbm, o_hbm):
      def outer(x_vmem, o_vmem):
        def inner(xi, oi):
          oi[...] = xi[...] * 2 + pl.program_id(0).astype(jnp.float32)

        pltpu.emit_pipeline(
            inner, grid=(4, 2),
            in_specs=[pl.BlockSpec((64, 128), lambda i, j: (i, j))],
            out_specs=pl.BlockSpec((64, 128), lambda i, j: (i, j)),
        )(x_vmem, o_vmem)

      pltpu.emit_pipeline(
          outer, grid=(2,),
          in_specs=[pl.BlockSpec((256, 256), lambda i: (i, 0))],
          out_specs=pl.BlockSpec((256, 256), lambda i: (i, 0)),
      )(x_hbm, o_hbm)

    out = self.variant(lambda x: _hbm_call(kernel, sds(x.shape), x))(x)
    inner_row_block = ((np.arange(512)[:, None] % 256) // 64).astype(np.float32)
    np.testing.assert_array_equal(out, np.asarray(x) * np.float32(2) + inner_row_block)

  @chex.variants(with_jit=True, without_jit=True)
  def test_allocations_are_reused_by_two_pipelines(self):
    x = data((512, 256))

    def kernel(x_hbm, o_hbm):
      pipeline, make_allocations = pltpu.emit_pipeline_with_allocations(
          lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] + 1),
          grid=(4,),
          in_specs=[pl.BlockSpec((128, 256), lambda i: (i, 0))],
          out_specs=[pl.BlockSpec((128, 256), lambda i: (i, 0))])
      allocations = make_allocations(x_hbm, o_hbm)
      assert all(isinstance(a, pltpu.BufferedRef)
                 for a in jax.tree.leaves(
                     allocations,
                     is_leaf=lambda a: isinstance(a, pltpu.BufferedRef)))

      def scoped(buffers):
        pipeline(x_hbm, o_hbm, allocations=buffers)
        pipeline(o_hbm, o_hbm, allocations=buffers)

      pl.run_scoped(scoped, allocations)

    out = self.variant(lambda x: _hbm_call(kernel, sds(x.shape), x))(x)
    np.testing.assert_allclose(out, np.asarray(x) + 2, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("segments_tile_the_rows", [0, 40, 64, 200], [40, 24, 136, 56]),
      ("one_segment_is_empty", [0, 8, 8, 128], [8, 0, 120, 128]),
  )
  def test_bounded_slice_blocks_from_dynamic_pl_ds(self, starts, sizes):
    x = data((256, 256))

    def kernel(starts_ref, sizes_ref, x_hbm, o_hbm):
      def spec():
        return pl.BlockSpec(
            (pl.BoundedSlice(136), 256),
            lambda i: (pl.ds(starts_ref[i], sizes_ref[i]), 0))

      pltpu.emit_pipeline(
          lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 3),
          grid=(4,), in_specs=[spec()], out_specs=[spec()])(x_hbm, o_hbm)

    call = lambda s, n, x: _hbm_call(kernel, sds(x.shape), s, n, x,
                                     num_scalar_prefetch=2)
    out = self.variant(call)(jnp.asarray(starts, jnp.int32),
                             jnp.asarray(sizes, jnp.int32), x)
    np.testing.assert_array_equal(out, np.asarray(x) * np.float32(3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_offsets_read_from_smem(self):
    x = data((512, 256))

    def kernel(offset_ref, x_hbm, o_hbm):
      offset = offset_ref[0]
      pltpu.emit_pipeline(
          lambda x_ref, o_ref: o_ref.__setitem__(..., -x_ref[...]),
          grid=(2,),
          in_specs=[pl.BlockSpec((64, 256), lambda i: (i + offset, 0))],
          out_specs=[pl.BlockSpec((64, 256), lambda i: (i, 0))],
      )(x_hbm, o_hbm.at[pl.ds(offset * 64, 128)])

    call = lambda o, x: _hbm_call(kernel, sds((512, 256)), o, x,
                                  num_scalar_prefetch=1)
    out = self.variant(call)(jnp.array([3], jnp.int32), x)
    np.testing.assert_array_equal(out[192:320], -np.asarray(x)[192:320])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("triple_buffered_dynamic_grid", dict(pipeline_mode=pl.Buffered(3)),
       {}),
      ("no_pipelining", {}, dict(no_pipelining=True)),
  )
  def test_pipeline_modes(self, spec_kwargs, pipeline_kwargs):
    x = data((512, 256))

    def kernel(steps_ref, x_hbm, o_hbm):
      pltpu.emit_pipeline(
          lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] * 5),
          grid=(steps_ref[0],),
          in_specs=[pl.BlockSpec((64, 256), lambda i: (i, 0), **spec_kwargs)],
          out_specs=[pl.BlockSpec((64, 256), lambda i: (i, 0))],
          **pipeline_kwargs)(x_hbm, o_hbm)

    call = lambda n, x: _hbm_call(kernel, sds(x.shape), n, x,
                                  num_scalar_prefetch=1)
    out = self.variant(call)(jnp.array([8], jnp.int32), x)
    np.testing.assert_array_equal(out, np.asarray(x) * np.float32(5))

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_pipeline_per_step_of_an_outer_grid(self):
    x = data((512, 256))

    def kernel(x_hbm, o_hbm):
      r = pl.program_id(0)

      def body(x_ref, o_ref):
        o_ref[...] = (x_ref[...] + r.astype(jnp.float32) * 100
                      + pl.program_id(0).astype(jnp.float32))

      rows = pl.ds(r * 256, 256)
      pltpu.emit_pipeline(
          body, grid=(2,),
          in_specs=[pl.BlockSpec((128, 256), lambda i: (i, 0))],
          out_specs=[pl.BlockSpec((128, 256), lambda i: (i, 0))],
      )(x_hbm.at[rows], o_hbm.at[rows])

    out = self.variant(
        lambda x: _hbm_call(kernel, sds(x.shape), x, grid=(2,)))(x)
    i = np.arange(512, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(
        out, np.asarray(x) + (i // 256) * 100 + (i % 256) // 128)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("middle", 5, 9, 3), ("empty", 7, 0, 0), ("to_the_end", 10, 6, 2))
  def test_dma_of_dynamic_size(self, start, size, at):
    """What BoundedSlice pipelines lower to: a DMA of ``pl.ds(s, n)`` rows."""
    out = self._dynamic_size_copy(start, size, at)
    expected = np.zeros((16, 128), np.float32)
    expected[at:at + size] = np.asarray(X16)[start:start + size]
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_dma_of_dynamic_size_past_the_end_is_reported(self):
    with self.assertRaisesRegex(Exception, "fast_interpret: out of bounds:"):
      jax.block_until_ready(self._dynamic_size_copy(10, 8, 0))

  def _dynamic_size_copy(self, start, size, at):
    x = X16

    def kernel(s_ref, x_hbm, o_ref, buf, sem):
      buf[...] = jnp.zeros(buf.shape, buf.dtype)
      n = s_ref[1]
      copy = pltpu.make_async_copy(x_hbm.at[pl.ds(s_ref[0], n)],
                                   buf.at[pl.ds(s_ref[2], n)], sem)
      copy.start()
      copy.wait()
      o_ref[...] = buf[...]

    call = lambda s, x: pl.pallas_call(
        kernel, out_shape=sds((16, 128)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, in_specs=[ANY],
            out_specs=pl.BlockSpec(memory_space=pltpu.VMEM),
            scratch_shapes=[pltpu.VMEM((16, 128), jnp.float32),
                            pltpu.SemaphoreType.DMA]),
        interpret=FI())(s, x)
    return self.variant(call)(jnp.array([start, size, at], jnp.int32), x)


if __name__ == "__main__":
  absltest.main()
