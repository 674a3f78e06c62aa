"""Tests of uninitialised values: out-of-bounds reads and unwritten memory.

``out_of_bounds_reads="uninitialized"``: the elements of a ref load, strided
load, scalar- or array-indexed load or DMA source that lie outside their
buffer read as the uninitialised value (NaN / int max / True, or zero); stores and DMA
destinations drop the elements outside the buffer; so do input and output
blocks that a block index map selects outside the array. ``"clamp"`` (the
``fast`` preset) clamps the start instead. References are NumPy, and
``pltpu.InterpretParams(out_of_bounds_reads="uninitialized")`` where it agrees
(it reads a window with a negative start as all uninitialised; we read its
in-range part).

``uninitialized_memory``: outputs, scratch and the padding of partial edge
blocks start as the fill value, for floats, ints and bools, compared with
``pltpu.InterpretParams(uninitialized_memory=...)``.

Run:  python -m pytest tests/uninitialized_test.py -q
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
  from tests.feature_util import setUpModule, sds as _sds, call as _call, FI, VMEM, SMEM, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, FI, VMEM, SMEM, ANY, DMA  # pylint: disable=g-import-not-at-top,unused-import


ROWS, LANES = 16, 128


def _x(dtype=jnp.float32):
  return jnp.arange(ROWS * LANES).reshape(ROWS, LANES).astype(dtype)


def _fill(dtype, fill):
  if fill == "zero":
    return np.zeros((), dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    return np.float32(np.nan)
  return np.iinfo(dtype).max


def _rows(x, rows, fill_value):
  """``x[rows]``, with ``fill_value`` for rows outside ``x``."""
  x = np.asarray(x)
  out = np.full((len(rows),) + x.shape[1:], fill_value, x.dtype)
  for k, r in enumerate(rows):
    if 0 <= r < x.shape[0]:
      out[k] = x[r]
  return out


def _np(x):
  x = jnp.asarray(x)
  return np.asarray(x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x)


def _params(fill="nan"):
  return FI(out_of_bounds_reads="uninitialized", uninitialized_memory=fill)


# Starts of an 8-row window over 16 rows: inside, past the end, far past,
# before the start, far before.
STARTS = (("inside", 3), ("past_end", 9), ("far_past_end", 100),
          ("negative", -3), ("far_negative", -50))
# Rows picked by an integer-array index into 16 rows.
ARRAY_ROWS = (("inside", (1, 15, 0, 7)), ("past_end", (1, 20, 16, 5)),
              ("negative", (-3, 2, -1, 100)))
FILLS = (("nan", "nan"), ("zero", "zero"))
DTYPES_BLOCK = (("f32", jnp.float32), ("bf16", jnp.bfloat16),
                ("i32", jnp.int32))


def _load(s_ref, x_ref, o_ref):
  o_ref[...] = x_ref[pl.ds(s_ref[0], 8), :]


def _load_call(interpret, dtype=jnp.float32):
  return lambda s, x: _call(_load, _sds((8, LANES), dtype), s, x,
                            in_specs=[SMEM, VMEM], out_specs=VMEM,
                            interpret=interpret)


class OutOfBoundsReadTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(start=STARTS, fill=FILLS,
                         dtype=(("f32", jnp.float32), ("i32", jnp.int32)))
  def test_load_window(self, start, fill, dtype):
    (_, s), (_, fill), (_, dtype) = start, fill, dtype
    x = _x(dtype)
    out = self.variant(_load_call(_params(fill), dtype))(
        jnp.array([s], jnp.int32), x)
    expected = _rows(x, range(s, s + 8), _fill(dtype, fill))
    np.testing.assert_array_equal(np.asarray(out), expected)

  @parameterized.named_parameters(("inside", 3), ("past_end", 9),
                                  ("far_past_end", 100))
  def test_load_window_matches_interpret_params(self, s):
    s = jnp.array([s], jnp.int32)
    ours = _load_call(_params())(s, _x())
    theirs = _load_call(pltpu.InterpretParams(
        out_of_bounds_reads="uninitialized"))(s, _x())
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STARTS)
  def test_scalar_row_index(self, s):
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[s_ref[0]][None]

    out = self.variant(lambda s, x: _call(
        kernel, _sds((1, LANES)), s, x, in_specs=[SMEM, VMEM],
        out_specs=VMEM, interpret=_params()))(jnp.array([s], jnp.int32),
                                               _x())
    np.testing.assert_array_equal(np.asarray(out),
                                  _rows(_x(), [s], np.nan))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STARTS)
  def test_strided_load(self, s):
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(s_ref[0], 4, stride=3), :]

    out = self.variant(lambda s, x: _call(
        kernel, _sds((4, LANES)), s, x, in_specs=[SMEM, VMEM],
        out_specs=VMEM, interpret=_params()))(jnp.array([s], jnp.int32),
                                               _x())
    np.testing.assert_array_equal(np.asarray(out),
                                  _rows(_x(), range(s, s + 12, 3), np.nan))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STARTS)
  def test_dma_source(self, s):
    def kernel(s_ref, x_hbm, o_ref, sem):
      pltpu.async_copy(x_hbm.at[pl.ds(s_ref[0], 8)], o_ref, sem).wait()

    out = self.variant(lambda s, x: _call(
        kernel, _sds((8, LANES)), s, x, in_specs=[SMEM, ANY],
        out_specs=VMEM, scratch_shapes=[DMA(())],
        interpret=_params()))(jnp.array([s], jnp.int32), _x())
    np.testing.assert_array_equal(np.asarray(out),
                                  _rows(_x(), range(s, s + 8), np.nan))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STARTS)
  def test_store_drops_outside_rows(self, s):
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)
      o_ref[pl.ds(s_ref[0], 8), :] = x_ref[...]

    x = _x()[:8] + 1.0
    out = self.variant(lambda s, x: _call(
        kernel, _sds((ROWS, LANES)), s, x, in_specs=[SMEM, VMEM],
        out_specs=VMEM, interpret=_params()))(jnp.array([s], jnp.int32), x)
    expected = np.zeros((ROWS, LANES), np.float32)
    for k in range(8):
      if 0 <= s + k < ROWS:
        expected[s + k] = np.asarray(x)[k]
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STARTS)
  def test_dma_destination_drops_outside_rows(self, s):
    def kernel(s_ref, x_ref, o_ref, sem):
      o_ref[...] = jnp.zeros_like(o_ref)
      pltpu.async_copy(x_ref, o_ref.at[pl.ds(s_ref[0], 8)], sem).wait()

    x = _x()[:8] + 1.0
    out = self.variant(lambda s, x: _call(
        kernel, _sds((ROWS, LANES)), s, x, in_specs=[SMEM, VMEM],
        out_specs=VMEM, scratch_shapes=[DMA(())],
        interpret=_params()))(jnp.array([s], jnp.int32), x)
    expected = np.zeros((ROWS, LANES), np.float32)
    for k in range(8):
      if 0 <= s + k < ROWS:
        expected[s + k] = np.asarray(x)[k]
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*ARRAY_ROWS)
  def test_array_index_load(self, rows):
    def kernel(i_ref, x_ref, o_ref):
      o_ref[...] = x_ref[i_ref[...], :]

    out = self.variant(lambda i, x: _call(
        kernel, _sds((4, LANES)), i, x, in_specs=[VMEM, VMEM],
        out_specs=VMEM, interpret=_params()))(jnp.array(rows, jnp.int32),
                                               _x())
    np.testing.assert_array_equal(np.asarray(out), _rows(_x(), rows, np.nan))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*ARRAY_ROWS)
  def test_array_index_store_drops_outside_rows(self, rows):
    def kernel(i_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)
      o_ref[i_ref[...], :] = x_ref[...]

    x = _x()[:4] + 1.0
    out = self.variant(lambda i, x: _call(
        kernel, _sds((ROWS, LANES)), i, x, in_specs=[VMEM, VMEM],
        out_specs=VMEM, interpret=_params()))(jnp.array(rows, jnp.int32), x)
    expected = np.zeros((ROWS, LANES), np.float32)
    for k, r in enumerate(rows):
      if 0 <= r < ROWS:
        expected[r] = np.asarray(x)[k]
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("negative", -4), ("zero", 0), ("three", 3),
                                  ("far_negative", -20))
  def test_window_longer_than_buffer(self, s):
    """A 16-row store and load through an 8-row scratch."""
    def kernel(s_ref, x_ref, o_ref, scratch):
      scratch[...] = jnp.zeros_like(scratch)
      scratch[pl.ds(s_ref[0], 16), :] = x_ref[...]
      o_ref[0:8] = scratch[...]
      o_ref[8:24] = scratch[pl.ds(s_ref[0], 16), :]

    x = _x() + 1.0
    out = self.variant(lambda s, x: _call(
        kernel, _sds((24, LANES)), s, x, in_specs=[SMEM, VMEM],
        out_specs=VMEM, scratch_shapes=[pltpu.VMEM((8, LANES), jnp.float32)],
        interpret=_params()))(jnp.array([s], jnp.int32), x)
    scratch = np.zeros((8, LANES), np.float32)
    for k in range(16):
      if 0 <= s + k < 8:
        scratch[s + k] = np.asarray(x)[k]
    np.testing.assert_array_equal(np.asarray(out[:8]), scratch)
    np.testing.assert_array_equal(np.asarray(out[8:]),
                                  _rows(scratch, range(s, s + 16), np.nan))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("past_end", 9), ("negative", -3))
  def test_clamp_mode_clamps(self, s):
    out = self.variant(_load_call(FI(out_of_bounds_reads="clamp")))(
        jnp.array([s], jnp.int32), _x())
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(jax.lax.dynamic_slice(
            _x(), (jnp.int32(s), 0), (8, LANES))))

  def test_fast_preset_clamps(self):
    self.assertEqual(FI.unchecked().out_of_bounds_reads, "clamp")
    # Neither mode checks bounds.
    for mode in ("clamp", "uninitialized"):
      self.assertFalse(FI.unchecked(out_of_bounds_reads=mode).checks_enabled)


def _block_call(interpret, dtype, out_rows=16):
  """Step i copies input block s[i] to output block s[2 + i] (+1)."""
  def kernel(s_ref, x_ref, o_ref):
    del s_ref
    o_ref[...] = x_ref[...] + 1

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(2,),
      in_specs=[pl.BlockSpec((8, LANES), lambda i, s: (s[i], 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda i, s: (s[2 + i], 0)))
  return lambda s, x: pl.pallas_call(
      kernel, out_shape=_sds((out_rows, LANES), dtype), grid_spec=grid_spec,
      interpret=interpret)(s, x)


class OutOfBoundsBlockTest(chex.TestCase):
  """Block index maps selecting blocks outside the array."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(blocks=(("inside", (1, 0)), ("past_end", (1, 2)),
                                 ("far_past_end", (40, 0)),
                                 ("negative", (-1, 1))),
                         fill=FILLS, dtype=DTYPES_BLOCK)
  def test_input_block_outside_reads_uninitialized(self, blocks, fill, dtype):
    (_, blocks), (_, fill), (_, dtype) = blocks, fill, dtype
    x = _x(dtype)
    s = jnp.array([*blocks, 0, 1], jnp.int32)
    out = self.variant(_block_call(_params(fill), dtype))(s, x)
    rows = np.concatenate(
        [_rows(_np(x), range(8 * b, 8 * b + 8), _fill(jnp.float32, fill)
               if dtype == jnp.bfloat16 else _fill(dtype, fill))
         for b in blocks])
    # The + 1 in the kernel's dtype (bf16 rounding, int wrap-around).
    expected = jnp.asarray(rows).astype(dtype) + jnp.asarray(1, dtype)
    np.testing.assert_array_equal(_np(out), _np(expected))

  @parameterized.named_parameters(("past_end", (1, 2)), ("far", (7, 0)))
  def test_input_block_matches_interpret_params(self, blocks):
    s = jnp.array([*blocks, 0, 1], jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
      ours = _block_call(_params(), dtype)(s, _x(dtype))
      theirs = _block_call(pltpu.InterpretParams(
          out_of_bounds_reads="uninitialized"), dtype)(s, _x(dtype))
      np.testing.assert_array_equal(_np(ours), _np(theirs))

  def test_constant_index_map_matches_interpret_params(self):
    # A ref-free index map (a constant table; such grids may be vectorised)
    # running one block past the input.
    def call(interpret, dtype):
      return pl.pallas_call(
          lambda x_ref, o_ref: o_ref.__setitem__(..., x_ref[...] + 1),
          out_shape=_sds((24, LANES), dtype), grid=(3,),
          in_specs=[pl.BlockSpec((8, LANES), lambda i: (i + 1, 0))],
          out_specs=pl.BlockSpec((8, LANES), lambda i: (i, 0)),
          interpret=interpret)(_x(dtype))

    for dtype in (jnp.float32, jnp.bfloat16, jnp.int32):
      np.testing.assert_array_equal(
          _np(call(_params(), dtype)),
          _np(call(pltpu.InterpretParams(
              out_of_bounds_reads="uninitialized"), dtype)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_output_block_outside_is_dropped(self):
    # Output blocks 1 and 5 of a 2-block output: the second is dropped
    # (JAX's mode raises there), not clamped onto block 1.
    x = _x()
    out = self.variant(_block_call(_params("zero"), jnp.float32))(
        jnp.array([0, 1, 1, 5], jnp.int32), x)
    np.testing.assert_array_equal(np.asarray(out[8:]),
                                  np.asarray(x[:8]) + 1)

  def test_clamp_mode_clamps_block_indices(self):
    out = _block_call(FI(out_of_bounds_reads="clamp"), jnp.float32)(
        jnp.array([0, 5, 0, 1], jnp.int32), _x())
    np.testing.assert_array_equal(np.asarray(out[8:]),
                                  np.asarray(_x()[8:]) + 1)


# ---------------------------------------------------------------------------
# Memory the kernel never wrote.


DTYPES = (("f32", jnp.float32), ("bf16", jnp.bfloat16), ("i32", jnp.int32),
          ("i8", jnp.int8))



class UninitializedMemoryTest(chex.TestCase):
  """Outputs, scratch and edge-block padding, as InterpretParams fills them."""

  def _compare(self, f):
    for fill in ("nan", "zero"):
      ours = _np(f(FI(uninitialized_memory=fill)))
      theirs = _np(f(pltpu.InterpretParams(uninitialized_memory=fill)))
      np.testing.assert_array_equal(ours, theirs, err_msg=fill)

  @parameterized.named_parameters(*DTYPES)
  def test_output_never_written(self, dtype):
    def kernel(o_ref):
      o_ref[0:2] = jnp.ones((2, LANES), dtype)

    self._compare(lambda p: _call(kernel, _sds((8, LANES), dtype),
                                  out_specs=VMEM, interpret=p))

  @parameterized.named_parameters(*DTYPES)
  def test_scratch_never_written(self, dtype):
    def kernel(o_ref, scratch):
      scratch[0:2] = jnp.ones((2, LANES), dtype)
      o_ref[...] = scratch[...]

    self._compare(lambda p: _call(
        kernel, _sds((8, LANES), dtype), out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((8, LANES), dtype)], interpret=p))

  @parameterized.named_parameters(*DTYPES)
  def test_partial_edge_block_padding(self, dtype):
    """The rows of the last input block past the array are the fill."""
    x = jnp.arange(10 * LANES).reshape(10, LANES).astype(dtype)

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...]

    self._compare(lambda p: _call(
        kernel, _sds((3, 4, LANES), dtype), x, grid=(3,),
        in_specs=[pl.BlockSpec((4, LANES), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((None, 4, LANES), lambda i: (i, 0, 0)),
        interpret=p))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("nan", "nan", True), ("zero", "zero",
                                                         False))
  def test_bool_scratch(self, fill, expected):
    def kernel(o_ref, scratch):
      o_ref[...] = jnp.where(scratch[...], 1, 0)

    out = self.variant(lambda: _call(
        kernel, _sds((8, LANES), jnp.int32), out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((8, LANES), jnp.bool_)],
        interpret=FI(uninitialized_memory=fill)))()
    np.testing.assert_array_equal(np.asarray(out), int(expected))


if __name__ == "__main__":
  absltest.main()
