"""Tests of vectorised grids (fast_interpret/vectorize.py).

Every kernel is checked twice: which path ``vectorize.plan`` chose (from its
DEBUG log line on ``fast_interpret.vectorize``), and its result against a
jnp/NumPy reference. Kernels that must keep the grid loop (one per condition
of ``plan``) are checked for the reason and for a correct result. Errors of
vectorised grids must name the same grid step as the loop; chunking is forced
with a small ``vectorize.CHUNK_BYTES``.

Run:  python -m pytest tests/vectorize_test.py -q
"""

import contextlib
import functools
from unittest import mock

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
from fast_interpret import vectorize

try:
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import

LOGGER = "fast_interpret.vectorize"
ZERO = FI(uninitialized_memory="zero")


def _spec(block, index_map):
  return pl.BlockSpec(block, index_map)


def _rows(i):
  return (i, 0)


@contextlib.contextmanager
def _loop_only():
  """Keeps the grid loop for every call traced inside (for comparisons)."""
  with mock.patch.object(vectorize, "plan", lambda *a, **k: None):
    yield


class _Base(chex.TestCase):

  def path(self, f, *args) -> str:
    """The log line of the (one) pallas_call ``f`` traces."""
    with self.assertLogs(LOGGER, "DEBUG") as logs:
      jax.jit(lambda *a: f(*a)).lower(*args)
    return logs.output[-1]

  def assertVectorised(self, f, *args):
    self.assertIn("vectorised", self.path(f, *args))

  def assertLoop(self, f, *args, why: str):
    line = self.path(f, *args)
    self.assertIn("grid loop", line)
    self.assertRegex(line, why)


def _elementwise(shape, block, grid, index_map, fn, dtype=jnp.float32,
                 interpret=None, semantics=None):
  def kernel(x_ref, o_ref):
    o_ref[...] = fn(x_ref[...])

  params = (pltpu.CompilerParams(dimension_semantics=semantics)
            if semantics else None)
  return lambda x: _call(kernel, _sds(shape, dtype), x, grid=grid,
                         in_specs=[_spec(block, index_map)],
                         out_specs=_spec(block, index_map),
                         compiler_params=params, interpret=interpret)


class VectorisedTest(_Base):
  """Kernels that run vectorised, against jnp references."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_1d", (64, 128), (8, 128), (8,), _rows, jnp.float32),
      ("bf16_1d", (64, 128), (16, 128), (4,), _rows, jnp.bfloat16),
      ("int32_1d", (32, 256), (8, 256), (4,), _rows, jnp.int32),
      ("f32_2d", (32, 256), (8, 128), (4, 2), lambda i, j: (i, j),
       jnp.float32),
      ("f32_2d_transposed", (32, 256), (8, 128), (2, 4),
       lambda j, i: (i, j), jnp.float32),
      ("f32_reversed", (64, 128), (8, 128), (8,), lambda i: (7 - i, 0),
       jnp.float32),
      ("f16_3d", (4, 16, 256), (1, 8, 128), (4, 2, 2),
       lambda i, j, k: (i, j, k), jnp.float16),
  )
  def test_elementwise(self, shape, block, grid, index_map, dtype):
    x = _data(shape, dtype)
    fn = lambda v: v * 3 + 1
    f = _elementwise(shape, block, grid, index_map, fn, dtype)
    self.assertVectorised(f, x)
    # XLA may fuse v * 3 + 1 into an FMA in one program and not the other.
    rtol = 1e-6 if dtype == jnp.float32 else 0 if dtype == jnp.int32 else 1e-2
    np.testing.assert_allclose(
        np.asarray(self.variant(f)(x), np.float32),
        np.asarray(fn(x), np.float32), rtol=rtol, atol=rtol)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("zero_fill", "zero"), ("nan_fill", "nan"))
  def test_edge_blocks_are_padded(self, fill):
    x = _data((20, 200))
    f = _elementwise((20, 200), (8, 128), (3, 2), lambda i, j: (i, j),
                     jnp.exp, interpret=FI(uninitialized_memory=fill))
    self.assertVectorised(f, x)
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               np.exp(np.asarray(x)), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("parallel", ("parallel", "arbitrary")),
                                  ("arbitrary", ("arbitrary", "arbitrary")))
  def test_consecutive_revisits_keep_the_last_step(self, semantics):
    """Like benchmarks' add_one: each block stored by 4 steps in a row."""
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + pl.program_id(1).astype(jnp.float32)

    spec = _spec((8, 128), lambda i, j: (i, 0))
    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4, 4),
                        in_specs=[spec], out_specs=spec,
                        compiler_params=pltpu.CompilerParams(
                            dimension_semantics=semantics))
    self.assertVectorised(f, x)
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) + 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_program_ids_multiple_outputs_and_squeezed_dims(self):
    x = _data((4, 8, 128))

    def kernel(x_ref, o_ref, p_ref):
      o_ref[...] = x_ref[...] * 2
      p_ref[...] = jnp.full(p_ref.shape, pl.program_id(0) * 10
                            + pl.num_programs(0), jnp.int32)

    spec = _spec((None, 8, 128), lambda i: (i, 0, 0))
    f = lambda x: _call(kernel, (_sds((4, 8, 128)),
                                 _sds((4, 8, 128), jnp.int32)), x, grid=(4,),
                        in_specs=[spec], out_specs=(spec, spec))
    self.assertVectorised(f, x)
    out, pids = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)
    expected = np.broadcast_to((np.arange(4) * 10 + 4)[:, None, None],
                               (4, 8, 128))
    np.testing.assert_array_equal(np.asarray(pids), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_shared_by_all_steps(self):
    """A bias block with a constant index map is read once, not gathered."""
    x, b = _data((32, 128)), _data((8, 128), seed=1)

    def kernel(x_ref, b_ref, o_ref):
      o_ref[...] = x_ref[...] + b_ref[...]

    f = lambda x, b: _call(kernel, _sds((32, 128)), x, b, grid=(4,),
                           in_specs=[_spec((8, 128), _rows),
                                     _spec((8, 128), lambda i: (0, 0))],
                           out_specs=_spec((8, 128), _rows))
    self.assertVectorised(f, x, b)
    expected = np.asarray(x) + np.tile(np.asarray(b), (4, 1))
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x, b)), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_control_flow_in_the_body(self):
    """pl.when, lax.cond and fori_loop batch; the store stays top-level."""
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      v = x_ref[...]
      v = lax.cond(pl.program_id(0) % 2 == 0, lambda v: v * 2,
                   lambda v: v - 1, v)
      v = lax.fori_loop(0, 3, lambda _, v: v + 1, v)
      o_ref[...] = v

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((8, 128), _rows))
    self.assertVectorised(f, x)
    xs = np.asarray(x).reshape(4, 8, 128)
    expected = np.stack([xs[i] * 2 if i % 2 == 0 else xs[i] - 1
                         for i in range(4)]) + 3
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               expected.reshape(32, 128), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_small_matmul_blocks(self):
    a, b = _data((64, 32)), _data((32, 128), seed=1)

    def kernel(a_ref, b_ref, o_ref):
      o_ref[...] = jnp.dot(a_ref[...], b_ref[...],
                           preferred_element_type=jnp.float32)

    f = lambda a, b: _call(kernel, _sds((64, 128)), a, b, grid=(8,),
                           in_specs=[_spec((8, 32), _rows),
                                     _spec((32, 128), lambda i: (0, 0))],
                           out_specs=_spec((8, 128), _rows))
    self.assertVectorised(f, a, b)
    np.testing.assert_allclose(np.asarray(self.variant(f)(a, b)),
                               np.asarray(a) @ np.asarray(b), rtol=1e-5,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_element_indexed_input(self):
    """A pl.Element input window is read per step with dynamic slices."""
    x = _data((40, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[0:8, :] + x_ref[8:16, :]

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((pl.Element(16), 128),
                                        lambda i: (i * 8, 0))],
                        out_specs=_spec((8, 128), _rows))
    self.assertVectorised(f, x)
    xs = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  xs[:32] + xs[8:40])

  @chex.variants(with_jit=True, without_jit=True)
  def test_scalar_prefetch_read_in_the_body(self):
    s, x = jnp.array([2.0, -1.0], jnp.float32), _data((32, 128))

    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[...] * s_ref[0] + s_ref[1]

    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(4,),
        in_specs=[_spec((8, 128), lambda i, s: (i, 0))],
        out_specs=_spec((8, 128), lambda i, s: (i, 0)))
    f = lambda s, x: _call(kernel, _sds((32, 128)), s, x, grid_spec=gs)
    self.assertVectorised(f, s, x)
    np.testing.assert_array_equal(np.asarray(self.variant(f)(s, x)),
                                  np.asarray(x) * 2 - 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aliased_input_read_before_its_block_is_written(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2

    spec = _spec((8, 128), _rows)
    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[spec], out_specs=spec,
                        input_output_aliases={0: 0})
    self.assertVectorised(f, x)
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) * 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_blocks_left_unwritten_keep_the_aliased_input(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + 1

    spec = _spec((8, 128), lambda i: (2 * i, 0))
    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(2,),
                        in_specs=[spec], out_specs=spec,
                        input_output_aliases={0: 0})
    self.assertVectorised(f, x)
    expected = np.asarray(x).copy()
    expected[0:8] += 1
    expected[16:24] += 1
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_grid_order(self):
    x = _data((64, 128))
    f = _elementwise((64, 128), (8, 128), (8,), _rows, jnp.sin,
                     interpret=FI(random_seed=3), semantics=("parallel",))
    self.assertVectorised(f, x)
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               np.sin(np.asarray(x)), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_vmap_of_the_pallas_call(self):
    x = _data((3, 32, 128))
    f = _elementwise((32, 128), (8, 128), (4,), _rows, lambda v: v * v)
    self.assertVectorised(jax.vmap(f), x)
    np.testing.assert_allclose(np.asarray(self.variant(jax.vmap(f))(x)),
                               np.asarray(x) ** 2, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_outputs_with_different_write_backs(self):
    """One output written back every step, one every other step."""
    x = _data((32, 256))

    def kernel(x_ref, o_ref, s_ref):
      o_ref[...] = x_ref[...] + 1
      s_ref[...] = x_ref[...] * pl.program_id(1).astype(jnp.float32)

    f = lambda x: _call(kernel, (_sds((32, 256)), _sds((32, 128))), x,
                        grid=(4, 2),
                        in_specs=[_spec((8, 128), lambda i, j: (i, j))],
                        out_specs=(_spec((8, 128), lambda i, j: (i, j)),
                                   _spec((8, 128), lambda i, j: (i, 0))))
    self.assertVectorised(f, x)
    out, s = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) + 1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(x)[:, 128:])

  @chex.variants(with_jit=True, without_jit=True)
  def test_unwritten_output_blocks_keep_the_fill(self):
    x = _data((32, 128))
    f = _elementwise((32, 128), (8, 128), (2,), lambda i: (2 * i + 1, 0),
                     lambda v: v + 1, interpret=ZERO)
    self.assertVectorised(f, x)
    expected = np.zeros((32, 128), np.float32)
    expected[8:16] = np.asarray(x)[8:16] + 1
    expected[24:32] = np.asarray(x)[24:32] + 1
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_out_of_bounds_reads_fill_when_unchecked(self):
    x = _data((16, 128))
    f = lambda x: _call(
        _oob_kernel((1,)), _sds((16, 128)), x, grid=(2, 1),
        in_specs=[_spec((8, 128), lambda i, j: (i, 0))],
        out_specs=_spec((8, 128), lambda i, j: (i, 0)),
        interpret=FI(out_of_bounds_reads="uninitialized",
                     uninitialized_memory="nan"))
    self.assertVectorised(f, x)
    out = np.asarray(self.variant(f)(x))
    xs = np.asarray(x)
    np.testing.assert_array_equal(out[:8], xs[:8] + 1)
    np.testing.assert_array_equal(out[8:12], xs[12:16] + 1)
    self.assertTrue(np.isnan(out[12:]).all())

  def test_no_callback_when_checks_are_off(self):
    x = _data((32, 128))
    f = _elementwise((32, 128), (8, 128), (4,), _rows, jnp.abs,
                     interpret=FI(out_of_bounds_reads="clamp",
                                  check_semaphores=False,
                                  check_output_revisits=False))
    self.assertVectorised(f, x)
    self.assertNotIn("callback", jax.jit(f).lower(x).as_text())
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)),
                                  np.abs(np.asarray(x)))

  def test_add_one_program_is_as_small_as_xla(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + 1

    spec = _spec((8, 128), lambda i, j: (i, 0))
    f = jax.jit(lambda x: _call(kernel, _sds((32, 128)), x, grid=(4, 64),
                                in_specs=[spec], out_specs=spec))
    text = f.lower(x).compile().as_text()
    instructions = [l for l in text.splitlines() if " = " in l]
    self.assertLess(len(instructions), 12, text)
    self.assertNotIn("callback", f.lower(x).as_text())
    np.testing.assert_array_equal(np.asarray(f(x)), np.asarray(x) + 1)


class FallbackTest(_Base):
  """Each condition of ``vectorize.plan``: the loop is kept, results hold."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_accumulator_output(self):
    a, b = _data((16, 64)), _data((64, 128), seed=1)

    def kernel(a_ref, b_ref, o_ref):
      @pl.when(pl.program_id(1) == 0)
      def _():
        o_ref[...] = jnp.zeros_like(o_ref)

      o_ref[...] += jnp.dot(a_ref[...], b_ref[...],
                            preferred_element_type=jnp.float32)

    f = lambda a, b: _call(kernel, _sds((16, 128)), a, b, grid=(2, 4),
                           in_specs=[_spec((8, 16), lambda i, k: (i, k)),
                                     _spec((16, 128), lambda i, k: (k, 0))],
                           out_specs=_spec((8, 128), lambda i, k: (i, 0)))
    self.assertLoop(f, a, b, why="output .* is used by cond")
    np.testing.assert_allclose(np.asarray(self.variant(f)(a, b)),
                               np.asarray(a) @ np.asarray(b), rtol=1e-5,
                               atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_read_in_the_body(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...]
      o_ref[...] = o_ref[...] * 2

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((8, 128), _rows))
    self.assertLoop(f, x, why="output .* is used by get")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) * 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_partial_store(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[0:4, :] = x_ref[0:4, :]
      o_ref[4:8, :] = x_ref[4:8, :] + 1

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((8, 128), _rows))
    self.assertLoop(f, x, why="stored in part")
    expected = np.asarray(x).reshape(4, 8, 128).copy()
    expected[:, 4:] += 1
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  expected.reshape(32, 128))

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_not_stored(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref, p_ref):
      o_ref[...] = x_ref[...]
      del p_ref

    spec = _spec((8, 128), _rows)
    f = lambda x: _call(kernel, (_sds((32, 128)), _sds((32, 128))), x,
                        grid=(4,), in_specs=[spec], out_specs=(spec, spec),
                        interpret=ZERO)[0]
    self.assertLoop(f, x, why="not stored at every step")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x))

  @chex.variants(with_jit=True, without_jit=True)
  def test_scratch(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref, s_ref):
      s_ref[...] = x_ref[...] + 1
      o_ref[...] = s_ref[...]

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((8, 128), _rows),
                        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)])
    self.assertLoop(f, x, why="scratch")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) + 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hbm_operand_and_dma(self):
    x = _data((32, 128))

    def kernel(x_hbm, o_ref, buf, sem):
      i = pl.program_id(0)
      copy = pltpu.make_async_copy(x_hbm.at[pl.ds(i * 8, 8)], buf, sem)
      copy.start()
      copy.wait()
      o_ref[...] = buf[...] - 1

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[ANY], out_specs=_spec((8, 128), _rows),
                        scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32),
                                        DMA])
    self.assertLoop(f, x, why="scratch")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) - 1)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hbm_operand_without_scratch(self):
    x = _data((32, 128))

    def kernel(x_hbm, o_ref):
      del x_hbm
      o_ref[...] = jnp.ones_like(o_ref)

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[ANY], out_specs=_spec((8, 128), _rows))
    self.assertLoop(f, x, why="not blocked")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.ones((32, 128)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_non_consecutive_revisit(self):
    x = _data((16, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)

    spec = _spec((8, 128), lambda i: (i % 2, 0))
    f = lambda x: _call(kernel, _sds((16, 128)), x, grid=(4,),
                        in_specs=[spec], out_specs=spec,
                        interpret=FI(check_output_revisits=False))
    self.assertLoop(f, x, why="written back twice")
    expected = np.asarray(x).copy()
    expected[0:8] += 2
    expected[8:16] += 3
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_several_cores(self):
    x = _data((32, 128))
    f = _elementwise((32, 128), (8, 128), (4,), _rows, lambda v: v + 2,
                     interpret=FI(num_cores_or_threads=2),
                     semantics=("parallel",))
    self.assertLoop(f, x, why="2 simulated cores")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) + 2)

  @chex.variants(with_jit=True, without_jit=True)
  def test_prng(self):
    def kernel(o_ref):
      pltpu.prng_seed(pl.program_id(0))
      o_ref[...] = pltpu.prng_random_bits(o_ref.shape)

    f = lambda: _call(kernel, _sds((16, 128), jnp.int32), grid=(2,),
                      out_specs=_spec((8, 128), _rows))
    self.assertLoop(f, why="uses prng_seed")
    self.assertEqual(self.variant(f)().shape, (16, 128))

  def test_debug_print(self):
    x = _data((16, 128))

    def kernel(x_ref, o_ref):
      pl.debug_print("step {}", pl.program_id(0))
      o_ref[...] = x_ref[...]

    f = lambda x: _call(kernel, _sds((16, 128)), x, grid=(2,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((8, 128), _rows))
    self.assertLoop(f, x, why="uses debug")

  @chex.variants(with_jit=True, without_jit=True)
  def test_element_indexed_output(self):
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 4

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), _rows)],
                        out_specs=_spec((pl.Element(8), 128),
                                        lambda i: (i * 8, 0)))
    self.assertLoop(f, x, why="pl.Element")
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.asarray(x) * 4)

  @chex.variants(with_jit=True, without_jit=True)
  def test_aliased_input_read_after_its_block_is_written(self):
    """Step i writes block i, reading block 3 - i: late steps see results."""
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * 2 + 1

    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4,),
                        in_specs=[_spec((8, 128), lambda i: (3 - i, 0))],
                        out_specs=_spec((8, 128), _rows),
                        input_output_aliases={0: 0})
    self.assertLoop(f, x, why="aliased output wrote")
    blocks = list(np.asarray(x).reshape(4, 8, 128))
    for i in range(4):
      blocks[i] = blocks[3 - i] * 2 + 1
    np.testing.assert_array_equal(np.asarray(self.variant(f)(x)),
                                  np.concatenate(blocks))

  @chex.variants(with_jit=True, without_jit=True)
  def test_big_dot(self):
    a, b = _data((256, 256)), _data((256, 256), seed=1)

    def kernel(a_ref, b_ref, o_ref):
      o_ref[...] = jnp.dot(a_ref[...], b_ref[...],
                           preferred_element_type=jnp.float32)

    f = lambda a, b: _call(kernel, _sds((256, 256)), a, b, grid=(2, 2),
                           in_specs=[_spec((128, 256), lambda i, j: (i, 0)),
                                     _spec((256, 128), lambda i, j: (0, j))],
                           out_specs=_spec((128, 128), lambda i, j: (i, j)))
    self.assertLoop(f, a, b, why="multiply-adds")
    np.testing.assert_allclose(np.asarray(self.variant(f)(a, b)),
                               np.asarray(a) @ np.asarray(b), rtol=1e-4,
                               atol=1e-3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_map_reads_scalar_prefetch(self):
    idx, x = jnp.array([3, 2, 1, 0], jnp.int32), _data((32, 128))

    def kernel(idx_ref, x_ref, o_ref):
      del idx_ref
      o_ref[...] = x_ref[...] + 1

    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(4,),
        in_specs=[_spec((8, 128), lambda i, idx: (idx[i], 0))],
        out_specs=_spec((8, 128), lambda i, idx: (i, 0)))
    f = lambda idx, x: _call(kernel, _sds((32, 128)), idx, x, grid_spec=gs)
    self.assertLoop(f, idx, x, why="not a table known while tracing")
    expected = np.asarray(x).reshape(4, 8, 128)[::-1].reshape(32, 128) + 1
    np.testing.assert_array_equal(np.asarray(self.variant(f)(idx, x)),
                                  expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_kernel_writes_scalar_prefetch(self):
    s, x = jnp.zeros((1,), jnp.int32), _data((32, 128))

    def kernel(s_ref, x_ref, o_ref):
      s_ref[0] += 1
      o_ref[...] = x_ref[...] + s_ref[0].astype(jnp.float32)

    gs = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(4,),
        in_specs=[_spec((8, 128), lambda i, s: (i, 0))],
        out_specs=_spec((8, 128), lambda i, s: (i, 0)))
    f = lambda s, x: _call(kernel, _sds((32, 128)), s, x, grid_spec=gs)
    self.assertLoop(f, s, x, why="writes a buffer other than its blocks")
    expected = (np.asarray(x).reshape(4, 8, 128)
                + np.arange(1, 5, dtype=np.float32)[:, None, None]
                ).reshape(32, 128)
    np.testing.assert_array_equal(np.asarray(self.variant(f)(s, x)),
                                  expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_single_step(self):
    x = _data((8, 128))
    f = _elementwise((8, 128), (8, 128), (), lambda: (0, 0), jnp.tanh)
    self.assertLoop(f, x, why="single grid step")
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               np.tanh(np.asarray(x)), rtol=1e-6)

  def test_dynamic_grid(self):
    x = _data((32, 128))

    def f(n, x):
      return _elementwise((32, 128), (8, 128), (n,), _rows,
                          lambda v: v + 1, interpret=ZERO)(x)

    self.assertLoop(f, jnp.int32(4), x, why="not a table")
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(jnp.int32(4), x)),
                                  np.asarray(x) + 1)


_OOB_LOAD = r"out of bounds: load of .* \(kernel '\w+', grid step {}\)"


def _oob_kernel(bad_steps):
  """Loads past its block at the steps in ``bad_steps``, else in bounds."""
  def kernel(x_ref, o_ref):
    step = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    bad = functools.reduce(jnp.logical_or, [step == s for s in bad_steps])
    start = jnp.where(bad, 4, 0)
    o_ref[...] = x_ref[pl.ds(start, 8), :] + 1
  return kernel


class ErrorTest(_Base):
  """Runtime checks in vectorised grids report what the loop reports."""

  def _run(self, bad_steps, grid):
    shape = (grid[0] * 8, 128)
    x = _data(shape)
    spec = _spec((8, 128), lambda i, j: (i, 0))
    f = lambda x: _call(_oob_kernel(bad_steps), _sds(shape), x,
                        grid=grid, in_specs=[spec], out_specs=spec)
    return f, x

  @parameterized.named_parameters(
      ("one_step", (2,), (4, 1), 2),
      ("earliest_of_two", (3, 1), (4, 1), 1),
      ("step_without_write_back", (5,), (2, 4), 5),
      ("earlier_step_without_write_back", (7, 4), (2, 4), 4),
      ("write_back_step_before_others", (3, 6), (2, 4), 3),
  )
  def test_same_step_as_the_loop(self, bad_steps, grid, step):
    f, x = self._run(bad_steps, grid)
    self.assertVectorised(f, x)
    with self.assertRaisesRegex(Exception, _OOB_LOAD.format(step)) as vec:
      jax.block_until_ready(jax.jit(f)(x))
    with _loop_only(), self.assertRaisesRegex(
        Exception, _OOB_LOAD.format(step)) as loop:
      jax.block_until_ready(jax.jit(f)(x))
    self.assertEqual(
        str(vec.exception).split("fast_interpret:")[-1],
        str(loop.exception).split("fast_interpret:")[-1])

  def test_no_error_when_in_bounds(self):
    f, x = self._run((99,), (2, 4))
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)),
                                  np.asarray(x) + 1)


class ChunkTest(_Base):
  """Small chunks: several vmaps, or a scan over chunks and the rest."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("two_chunks", 4096 * 4, (8,), _rows),
      ("scan_and_rest", 4096 * 3, (16,), _rows),
      ("scan_reversed", 4096 * 4, (16,), lambda i: (15 - i, 0)),
  )
  def test_chunks(self, chunk_bytes, grid, index_map):
    n = grid[0] * 8
    x = _data((n, 128))
    f = _elementwise((n, 128), (8, 128), grid, index_map, jnp.cos)
    with mock.patch.object(vectorize, "CHUNK_BYTES", chunk_bytes):
      self.assertVectorised(f, x)
      out = self.variant(f)(x)
    np.testing.assert_allclose(np.asarray(out), np.cos(np.asarray(x)),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("bf16_blocks", jnp.bfloat16),
                                  ("int8_blocks", jnp.int8))
  def test_scan_of_narrow_dtypes(self, dtype):
    x = _data((64, 128), dtype)
    f = _elementwise((64, 128), (8, 128), (8,), lambda i: (7 - i, 0),
                     lambda v: v * 2, dtype)
    with mock.patch.object(vectorize, "CHUNK_BYTES", 1024):
      self.assertVectorised(f, x)
      out = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(x * 2, np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_scan_of_element_indexed_input(self):
    x = _data((72, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[0:8, :] - x_ref[8:16, :]

    f = lambda x: _call(kernel, _sds((64, 128)), x, grid=(8,),
                        in_specs=[_spec((pl.Element(16), 128),
                                        lambda i: (i * 8, 0))],
                        out_specs=_spec((8, 128), _rows))
    with mock.patch.object(vectorize, "CHUNK_BYTES", 8192):
      self.assertVectorised(f, x)
      out = self.variant(f)(x)
    xs = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(out), xs[:64] - xs[8:72])

  @chex.variants(with_jit=True, without_jit=True)
  def test_scan_with_different_write_backs(self):
    """Write flags known only inside the scan: unflagged rows are dropped."""
    x = _data((32, 256))

    def kernel(x_ref, o_ref, s_ref):
      o_ref[...] = x_ref[...] - 1
      s_ref[...] = x_ref[...] * pl.program_id(1).astype(jnp.float32)

    f = lambda x: _call(kernel, (_sds((32, 256)), _sds((32, 128))), x,
                        grid=(4, 2),
                        in_specs=[_spec((8, 128), lambda i, j: (i, j))],
                        out_specs=(_spec((8, 128), lambda i, j: (i, j)),
                                   _spec((8, 128), lambda i, j: (i, 0))))
    with mock.patch.object(vectorize, "CHUNK_BYTES", 4096):
      self.assertVectorised(f, x)
      out, s = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) - 1)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(x)[:, 128:])

  @chex.variants(with_jit=True, without_jit=True)
  def test_scan_with_partial_write_backs(self):
    """Consecutive revisits inside the scan: only last writes count."""
    x = _data((32, 128))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] * pl.program_id(1).astype(jnp.float32)

    spec = _spec((8, 128), lambda i, j: (i, 0))
    f = lambda x: _call(kernel, _sds((32, 128)), x, grid=(4, 3),
                        in_specs=[spec], out_specs=spec)
    with mock.patch.object(vectorize, "CHUNK_BYTES", 4096):
      self.assertVectorised(f, x)
      out = self.variant(f)(x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x) * 2)

  @parameterized.named_parameters(("early", (1,), 1), ("late", (6, 7), 6))
  def test_errors_in_the_chunk_scan(self, bad_steps, step):
    x = _data((32, 128))
    spec = _spec((8, 128), lambda i, j: (i, 0))
    f = lambda x: _call(_oob_kernel(bad_steps), _sds((32, 128)), x,
                        grid=(4, 2), in_specs=[spec], out_specs=spec)
    with mock.patch.object(vectorize, "CHUNK_BYTES", 4096):
      self.assertVectorised(f, x)
      with self.assertRaisesRegex(Exception, _OOB_LOAD.format(step)):
        jax.block_until_ready(jax.jit(f)(x))


if __name__ == "__main__":
  absltest.main()
