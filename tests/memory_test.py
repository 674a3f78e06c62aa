"""Feature tests: reading and writing refs under fast_interpret.

Covers ``ref[...]``, integer indices, static slices, ``pl.ds`` with dynamic
starts and strides, ``.at[...]`` chains, ``ref.bitcast`` (TPU packing along
the second-minor dimension), ``ref.reshape``, ``pltpu.bitcast``, masked loads
and stores (``pl.load``/``pl.store`` and ``pltpu.load``/``pltpu.store``),
``ref[...] += x``, ``pl.multiple_of``, ``pl.delay``, dots with
``preferred_element_type`` and the trace-time error for direct HBM access.

Every expected value comes from plain NumPy/jnp or from JAX's own
``interpret=True`` mode, never from fast_interpret itself.

Run:  python -m pytest tests/memory_test.py -q
"""


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
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, VMEM, SMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import

# `pl.load` / `pl.store` (the masked_load / masked_swap primitives with
# `other`) are not re-exported by jax 0.10.2's public `pallas` module.
try:
  # pylint: disable-next=g-import-not-at-top
  from jax._src.pallas import primitives as _pallas_primitives
  _pl_load = getattr(pl, "load", _pallas_primitives.load)
  _pl_store = getattr(pl, "store", _pallas_primitives.store)
except ImportError:  # pragma: no cover
  _pl_load = _pl_store = None

ZERO = FI(uninitialized_memory="zero")


def _np(x):
  x = jnp.asarray(x)
  if x.dtype == jnp.bfloat16:
    return np.asarray(x.astype(jnp.float32))
  return np.asarray(x)


def _bits16(x):
  """uint16 bit patterns of a bf16 array (host)."""
  return np.asarray(lax.bitcast_convert_type(x, jnp.uint16))


# ---------------------------------------------------------------------------
# Kernels for the indexing tests: (kernel, out_shape, inputs, reference).

X = _data((8, 128))
X3 = _data((4, 8, 128), seed=1)


def _k_int_rows(x_ref, o_ref):
  o_ref[0] = x_ref[5]
  o_ref[1] = x_ref[2] * 2.0


def _k_int_3d(x_ref, o_ref):
  o_ref[...] = x_ref[2] + x_ref[0, :, :]


def _k_static_slices(x_ref, o_ref):
  o_ref[...] = x_ref[1:3, 16:32]


def _k_slice_store(x_ref, o_ref):
  o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
  o_ref[2:4, :] = x_ref[0:2, :]
  o_ref[5, 8:16] = x_ref[7, 0:8]


def _k_mixed_3d(x_ref, o_ref):
  o_ref[...] = x_ref[1, 2:6, 64:]


def _ref_slice_store(x):
  o = np.zeros((8, 128), np.float32)
  o[2:4] = x[0:2]
  o[5, 8:16] = x[7, 0:8]
  return o


_INDEX_CASES = [
    ("int_index_rows", _k_int_rows, _sds((2, 128)), X,
     lambda x: np.stack([x[5], x[2] * 2])),
    ("int_index_3d", _k_int_3d, _sds((8, 128)), X3, lambda x: x[2] + x[0]),
    ("static_slices_2d", _k_static_slices, _sds((2, 16)), X,
     lambda x: x[1:3, 16:32]),
    ("slice_and_int_store", _k_slice_store, _sds((8, 128)), X,
     _ref_slice_store),
    ("mixed_int_slice_3d", _k_mixed_3d, _sds((4, 64)), X3,
     lambda x: x[1, 2:6, 64:]),
]


def _k_smem_scalars(x_ref, o_ref):
  for i in range(8):
    o_ref[i] = x_ref[7 - i] * 3 + i


class RefIndexingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32", jnp.float32), ("bf16", jnp.bfloat16), ("int32", jnp.int32),
      ("int8", jnp.int8))
  def test_whole_ref_read_write(self, dtype):
    x = _data((16, 128), dtype)

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...] + jnp.asarray(1, dtype)

    out = self.variant(lambda x: _call(kernel, _sds(x.shape, dtype), x))(x)
    self.assertEqual(out.dtype, dtype)
    np.testing.assert_array_equal(_np(out), _np(x + jnp.asarray(1, dtype)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_INDEX_CASES)
  def test_static_indexing(self, kernel, out_shape, x, reference):
    out = self.variant(lambda x: _call(kernel, out_shape, x))(x)
    np.testing.assert_array_equal(np.asarray(out), reference(np.asarray(x)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_smem_scalar_indices(self):
    x = jnp.arange(8, dtype=jnp.int32) * 5
    out = self.variant(lambda x: _call(
        _k_smem_scalars, _sds((8,), jnp.int32), x, in_specs=[SMEM],
        out_specs=SMEM))(x)
    np.testing.assert_array_equal(
        np.asarray(out), np.asarray(x)[::-1] * 3 + np.arange(8))

  @chex.variants(with_jit=True, without_jit=True)
  def test_repeated_reads_see_stores_between_them(self):
    # The same index computed twice, and the same SMEM element read again:
    # a read after a store must see the store (the interpreter reuses a
    # repeated read only of a buffer not written since).
    def kernel(i_ref, s_ref, o_ref):
      i = i_ref[0]
      first = s_ref[i + 1]
      again = s_ref[i + 1]
      s_ref[i + 1] = first * 10
      after = s_ref[i + 1]
      o_ref[0], o_ref[1], o_ref[2] = first, again, after
      o_ref[3] = s_ref[(i + 1) * 1]

    s = jnp.arange(8, dtype=jnp.int32) + 3
    out = self.variant(lambda i, s: _call(
        kernel, _sds((4,), jnp.int32), i, s, in_specs=[SMEM, SMEM],
        out_specs=SMEM))(jnp.array([2], jnp.int32), s)
    np.testing.assert_array_equal(np.asarray(out), [6, 6, 60, 60])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("start0", 0), ("start3", 3),
                                  ("start6", 6))
  def test_dynamic_ds_read_and_write(self, start):
    """pl.ds with a start read from SMEM (traced under jit)."""

    def kernel(s_ref, x_ref, o_ref, col_ref):
      s = s_ref[0]
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      o_ref[pl.ds(s, 2), :] = x_ref[pl.ds(s, 2), :] * 2.0
      col_ref[...] = x_ref[:, pl.ds(s * 16, 16)]

    def f(s, x):
      return _call(kernel, (_sds((8, 128)), _sds((8, 16))), s, x,
                   in_specs=[SMEM, VMEM], out_specs=(VMEM, VMEM))

    out, col = self.variant(f)(jnp.array([start], jnp.int32), X)
    x = np.asarray(X)
    expected = np.zeros_like(x)
    expected[start:start + 2] = x[start:start + 2] * 2
    np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(np.asarray(col),
                                  x[:, start * 16:start * 16 + 16])

  @chex.variants(with_jit=True, without_jit=True)
  def test_dynamic_ds_from_program_id(self):
    def kernel(x_ref, o_ref):
      i = pl.program_id(0)
      o_ref[pl.ds(i, 1), :] = x_ref[pl.ds(7 - i, 1), :]

    out = self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x, grid=(8,), in_specs=[VMEM],
        out_specs=VMEM))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X)[::-1])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("rows_stride2", lambda r: r[pl.ds(1, 4, stride=2), :],
       lambda x: x[1:9:2], (4, 128)),
      ("rows_stride3", lambda r: r[pl.ds(0, 3, stride=3), :],
       lambda x: x[0:9:3], (3, 128)),
      ("lanes_stride4", lambda r: r[:, pl.ds(2, 8, stride=4)],
       lambda x: x[:, 2:34:4], (8, 8)),
  )
  def test_strided_ds_read(self, read, reference, out_shape):
    def kernel(x_ref, o_ref):
      o_ref[...] = read(x_ref)

    out = self.variant(lambda x: _call(kernel, _sds(out_shape), x))(X)
    np.testing.assert_array_equal(np.asarray(out), reference(np.asarray(X)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_strided_ds_write_keeps_other_rows(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.full(o_ref.shape, -1.0, o_ref.dtype)
      o_ref[pl.ds(1, 4, stride=2), :] = x_ref[...]

    x = X[:4]
    out = self.variant(lambda x: _call(kernel, _sds((8, 128)), x))(x)
    expected = np.full((8, 128), -1.0, np.float32)
    expected[1:9:2] = np.asarray(x)
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_strided_ds_dynamic_start(self):
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(s_ref[0], 3, stride=2), :]

    out = self.variant(lambda s, x: _call(
        kernel, _sds((3, 128)), s, x, in_specs=[SMEM, VMEM]))(
            jnp.array([1], jnp.int32), X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X)[1:7:2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_strided_ds_write_dynamic_start(self):
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      o_ref[pl.ds(s_ref[0], 3, stride=2), :] = x_ref[0:3, :]

    out = self.variant(lambda s, x: _call(
        kernel, _sds((8, 128)), s, x, in_specs=[SMEM, VMEM]))(
            jnp.array([3], jnp.int32), X)
    expected = np.zeros((8, 128), np.float32)
    expected[3:9:2] = np.asarray(X)[0:3]
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_negative_slice_bounds(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[-2:, -4:]

    out = self.variant(lambda x: _call(kernel, _sds((2, 4)), x))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X)[-2:, -4:])

  # A negative static int index (`x_ref[-1]`, `o_ref[-1] = ...`) counts from
  # the end, as in NumPy and interpret=True.
  @chex.variants(with_jit=True, without_jit=True)
  def test_negative_int_index(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      o_ref[0] = x_ref[-1]
      o_ref[-1] = x_ref[-3, :]

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    expected = np.zeros((8, 128), np.float32)
    expected[0] = np.asarray(X)[-1]
    expected[-1] = np.asarray(X)[-3]
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_negative_int_index_reference(self):
    """interpret=True agrees with the NumPy expectation above."""
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      o_ref[0] = x_ref[-1]
      o_ref[-1] = x_ref[-3, :]

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x, interpret=True))(X))
    expected = np.zeros((8, 128), np.float32)
    expected[0] = np.asarray(X)[-1]
    expected[-1] = np.asarray(X)[-3]
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("start0", 0), ("start2", 2))
  def test_at_chains(self, start):
    def kernel(s_ref, x_ref, o_ref, p_ref):
      s = s_ref[0]
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      # Read through two .at levels, the second with a dynamic start.
      p_ref[...] = x_ref.at[1:7].at[pl.ds(s, 2)][...]
      # Write through .at levels, int index in the middle.
      o_ref.at[2:6].at[1][pl.ds(0, 64)] = x_ref.at[0][64:]
      o_ref.at[pl.ds(s, 4)].at[0:1, 0:8][...] = jnp.full((1, 8), 7.0)
      # Accumulate through .at.
      o_ref.at[6:8][...] += 1.0

    def f(s, x):
      return _call(kernel, (_sds((8, 128)), _sds((2, 128))), s, x,
                   in_specs=[SMEM, VMEM], out_specs=(VMEM, VMEM))

    out, part = self.variant(f)(jnp.array([start], jnp.int32), X)
    x = np.asarray(X)
    np.testing.assert_array_equal(np.asarray(part),
                                  x[1:7][start:start + 2])
    expected = np.zeros((8, 128), np.float32)
    expected[3, 0:64] = x[0, 64:]
    expected[start, 0:8] = 7.0
    expected[6:8] += 1.0
    np.testing.assert_array_equal(np.asarray(out), expected)


class BitcastReshapeTest(chex.TestCase):
  """TPU bitcasts: narrow types pack along the second-minor dimension."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_to_int32", jnp.float32, jnp.int32),
      ("int32_to_f32", jnp.int32, jnp.float32),
      ("f32_to_uint32", jnp.float32, jnp.uint32),
  )
  def test_ref_bitcast_same_width(self, src, dst):
    x = _data((8, 128), src)

    def read_kernel(x_ref, o_ref):
      o_ref[...] = x_ref.bitcast(dst)[...]

    def write_kernel(x_ref, o_ref):
      o_ref.bitcast(src)[...] = x_ref[...]

    read = self.variant(lambda x: _call(read_kernel, _sds(x.shape, dst), x))
    write = self.variant(lambda x: _call(write_kernel, _sds(x.shape, dst), x))
    expected = np.asarray(x).view(np.dtype(dst))
    np.testing.assert_array_equal(np.asarray(read(x)), expected)
    np.testing.assert_array_equal(np.asarray(write(x)), expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_bitcast_bf16_pairs_to_uint32(self):
    """(16, 128) bf16 -> (8, 128) uint32: rows 2i (low half) and 2i+1."""
    x = _data((16, 128), jnp.bfloat16)

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref.bitcast(jnp.uint32)[...]

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128), jnp.uint32), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    bits = _bits16(x).astype(np.uint32)
    np.testing.assert_array_equal(out, bits[0::2] | (bits[1::2] << 16))
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_bitcast_uint32_to_bf16_read(self):
    u = jnp.asarray(np.random.RandomState(3).randint(
        0, 2**31, size=(8, 128)).astype(np.uint32))

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref.bitcast(jnp.bfloat16)[...]

    f = lambda u, interpret=None: _call(
        kernel, _sds((16, 128), jnp.bfloat16), u, interpret=interpret)
    out = _bits16(self.variant(f)(u))
    host = np.asarray(u)
    expected = np.empty((16, 128), np.uint16)
    expected[0::2] = host & 0xFFFF
    expected[1::2] = host >> 16
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, _bits16(f(u, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_bitcast_store_uint32_into_bf16_ref(self):
    # interpret=True does not support stores through a bitcast ref; the
    # reference is the TPU packing rule written out in NumPy.
    u = jnp.asarray(np.random.RandomState(4).randint(
        0, 2**31, size=(8, 128)).astype(np.uint32))

    def kernel(u_ref, o_ref):
      o_ref.bitcast(jnp.uint32)[...] = u_ref[...]

    out = _bits16(self.variant(lambda u: _call(
        kernel, _sds((16, 128), jnp.bfloat16), u))(u))
    host = np.asarray(u)
    np.testing.assert_array_equal(out[0::2], (host & 0xFFFF).astype(np.uint16))
    np.testing.assert_array_equal(out[1::2], (host >> 16).astype(np.uint16))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_bitcast_int8_quads_to_int32(self):
    x = _data((32, 128), jnp.int8)

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref.bitcast(jnp.int32)[...]

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128), jnp.int32), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    b = np.asarray(x).view(np.uint8).astype(np.uint32)
    expected = (b[0::4] | (b[1::4] << 8) | (b[2::4] << 16)
                | (b[3::4] << 24)).view(np.int32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_bitcast_after_slice(self):
    """A bitcast view of a row-slice of the ref (transform chain)."""
    x = _data((32, 128), jnp.bfloat16)

    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref.at[8:24].bitcast(jnp.uint32)[2:6]

    f = lambda x, interpret=None: _call(kernel, _sds((4, 128), jnp.uint32), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    bits = _bits16(x)[8:24].astype(np.uint32)
    np.testing.assert_array_equal(out, (bits[0::2] | (bits[1::2] << 16))[2:6])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("split_leading", (8, 128), (4, 2, 128), lambda v: v[1],
       lambda x: x.reshape(4, 2, 128)[1], (2, 128)),
      ("merge_leading", (2, 8, 128), (16, 128), lambda v: v[...],
       lambda x: x.reshape(16, 128), (16, 128)),
  )
  def test_ref_reshape_read(self, in_shape, shape, read, reference,
                            out_shape):
    x = _data(in_shape)

    def kernel(x_ref, o_ref):
      o_ref[...] = read(x_ref.reshape(*shape))

    f = lambda x, interpret=None: _call(kernel, _sds(out_shape), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(x))
    np.testing.assert_array_equal(out, reference(np.asarray(x)))
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_ref_reshape_write(self):
    x = _data((2, 8, 128))

    def kernel(x_ref, o_ref):
      o_ref.reshape(2, 8, 128)[...] = x_ref[...] * 2.0

    out = self.variant(lambda x: _call(kernel, _sds((16, 128)), x))(x)
    np.testing.assert_array_equal(np.asarray(out),
                                  np.asarray(x).reshape(16, 128) * 2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32_to_int32", (8, 128), jnp.float32, jnp.int32, (8, 128)),
      ("bf16_to_uint32", (16, 128), jnp.bfloat16, jnp.uint32, (8, 128)),
      ("uint32_to_bf16", (8, 128), jnp.uint32, jnp.bfloat16, (16, 128)),
  )
  def test_pltpu_bitcast_value(self, in_shape, src, dst, out_shape):
    if src == jnp.uint32:
      x = jnp.asarray(np.random.RandomState(5).randint(
          0, 2**31, size=in_shape).astype(np.uint32))
    else:
      x = _data(in_shape, src)

    def kernel(x_ref, o_ref):
      o_ref[...] = pltpu.bitcast(x_ref[...], dst)

    f = lambda x, interpret=None: _call(kernel, _sds(out_shape, dst), x,
                                        interpret=interpret)
    out = self.variant(f)(x)
    as_bits = lambda a: (_bits16(a) if a.dtype == jnp.bfloat16
                         else np.asarray(a).view(np.uint32))
    host = as_bits(x)
    if src == jnp.bfloat16:
      host = host.astype(np.uint32)
      expected = host[0::2] | (host[1::2] << 16)
    elif dst == jnp.bfloat16:
      expected = np.empty(out_shape, np.uint16)
      expected[0::2] = host & 0xFFFF
      expected[1::2] = host >> 16
    else:
      expected = host
    np.testing.assert_array_equal(as_bits(out), expected)
    np.testing.assert_array_equal(as_bits(out),
                                  as_bits(f(x, interpret=True)))


class MaskedAccessTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("other_minus1", -1.0), ("other_42", 42.0))
  def test_pl_load_store_with_mask_and_other(self, other):
    if _pl_load is None:
      self.skipTest("pl.load is not available")

    def kernel(x_ref, o_ref):
      lane = lax.broadcasted_iota(jnp.int32, (8, 128), 1)
      v = _pl_load(x_ref, (slice(None), slice(None)), mask=lane < 5,
                   other=other)
      o_ref[...] = jnp.full(o_ref.shape, 9.0, o_ref.dtype)
      _pl_store(o_ref, (slice(None), slice(None)), v, mask=lane % 2 == 0)

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    x = np.asarray(X)
    lane = np.arange(128)[None, :]
    loaded = np.where(lane < 5, x, other)
    expected = np.where(lane % 2 == 0, loaded, 9.0)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(X, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_pl_load_store_sliced_with_mask(self):
    if _pl_load is None:
      self.skipTest("pl.load is not available")

    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      row = lax.broadcasted_iota(jnp.int32, (4, 128), 0)
      v = _pl_load(x_ref, (pl.ds(2, 4), slice(None)), mask=row != 1,
                   other=0.5)
      _pl_store(o_ref, (pl.ds(4, 4), slice(None)), v, mask=row < 3)

    out = np.asarray(self.variant(lambda x: _call(kernel, _sds((8, 128)),
                                                  x))(X))
    x = np.asarray(X)
    expected = np.zeros((8, 128), np.float32)
    v = x[2:6].copy()
    v[1] = 0.5
    expected[4:7] = v[:3]
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pl_load_mask_without_other_keeps_unmasked_lanes(self):
    """Masked-off lanes are undefined; the unmasked ones must be exact."""
    if _pl_load is None:
      self.skipTest("pl.load is not available")

    def kernel(x_ref, o_ref):
      lane = lax.broadcasted_iota(jnp.int32, (8, 128), 1)
      o_ref[...] = _pl_load(x_ref, (slice(None), slice(None)),
                            mask=lane < 64)

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x, interpret=ZERO))(X))
    np.testing.assert_array_equal(out[:, :64], np.asarray(X)[:, :64])

  @chex.variants(with_jit=True, without_jit=True)
  def test_pltpu_load_store_with_masks(self):
    def kernel(x_ref, o_ref):
      lane = lax.broadcasted_iota(jnp.int32, (8, 128), 1)
      row = lax.broadcasted_iota(jnp.int32, (8, 128), 0)
      o_ref[...] = jnp.full(o_ref.shape, -3.0, o_ref.dtype)
      v = pltpu.load(x_ref, mask=lane < 100)
      pltpu.store(o_ref, v * 2.0, mask=(lane < 10) & (row >= 2))

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    lane = np.arange(128)[None, :]
    row = np.arange(8)[:, None]
    expected = np.where((lane < 10) & (row >= 2), np.asarray(X) * 2, -3.0)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(X, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_pltpu_load_store_on_sliced_view(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
      lane = lax.broadcasted_iota(jnp.int32, (2, 128), 1)
      v = pltpu.load(x_ref.at[3:5])
      pltpu.store(o_ref.at[pl.ds(6, 2)], v, mask=lane >= 120)

    out = np.asarray(self.variant(lambda x: _call(kernel, _sds((8, 128)),
                                                  x))(X))
    expected = np.zeros((8, 128), np.float32)
    expected[6:8, 120:] = np.asarray(X)[3:5, 120:]
    np.testing.assert_array_equal(out, expected)


class AccumulateAndHintsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("f32", jnp.float32), ("int32", jnp.int32))
  def test_addupdate(self, dtype):
    x = _data((8, 128), dtype)

    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[...]
      o_ref[...] += x_ref[...]
      o_ref[2:4, :] += jnp.ones((2, 128), dtype)
      o_ref[pl.ds(s_ref[0], 1), :] += x_ref[0:1, :]
      o_ref[7] += jnp.full((128,), 5, dtype)

    f = lambda s, x: _call(kernel, _sds((8, 128), dtype), s, x,
                           in_specs=[SMEM, VMEM])
    out = np.asarray(self.variant(f)(jnp.array([5], jnp.int32), x))
    h = np.asarray(x)
    expected = 2 * h
    expected[2:4] += 1
    expected[5] += h[0]
    expected[7] += 5
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_addupdate_smem_scalar(self):
    def kernel(x_ref, o_ref):
      o_ref[0] = 0
      for i in range(4):
        o_ref[0] += x_ref[i]

    out = self.variant(lambda x: _call(kernel, _sds((1,), jnp.int32), x,
                                       in_specs=[SMEM], out_specs=SMEM))(
                                           jnp.array([1, 2, 3, 4], jnp.int32))
    self.assertEqual(int(out[0]), 10)

  @chex.variants(with_jit=True, without_jit=True)
  def test_multiple_of_and_delay(self):
    def kernel(s_ref, x_ref, o_ref):
      start = pl.multiple_of(s_ref[0] * 8, 8)
      pl.delay(100)
      o_ref[...] = x_ref[pl.ds(start, 8), :]
      o_ref[:, pl.ds(pl.multiple_of(start * 4, 32), 32)] = jnp.zeros(
          (8, 32), jnp.float32)

    x = _data((32, 128))
    out = np.asarray(self.variant(lambda s, x: _call(
        kernel, _sds((8, 128)), s, x, in_specs=[SMEM, VMEM]))(
            jnp.array([2], jnp.int32), x))
    expected = np.asarray(x)[16:24].copy()
    expected[:, 64:96] = 0
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("bf16_to_f32", jnp.bfloat16, jnp.float32),
      ("f32_to_f32", jnp.float32, jnp.float32),
      ("int8_to_int32", jnp.int8, jnp.int32),
      ("bf16_default", jnp.bfloat16, None),
  )
  def test_dot_preferred_element_type(self, in_dtype, acc_dtype):
    a = _data((8, 64), in_dtype, seed=10)
    b = _data((64, 128), in_dtype, seed=11)
    out_dtype = acc_dtype or in_dtype

    def kernel(a_ref, b_ref, o_ref, t_ref):
      o_ref[...] = jnp.dot(a_ref[...], b_ref[...],
                           preferred_element_type=acc_dtype)
      # Contract the last dims of both (a @ b.T style) with dot_general.
      t_ref[...] = lax.dot_general(
          a_ref[...], a_ref[...], (((1,), (1,)), ((), ())),
          preferred_element_type=acc_dtype)

    out, gram = self.variant(lambda a, b: _call(
        kernel, (_sds((8, 128), out_dtype), _sds((8, 8), out_dtype)),
        a, b))(a, b)
    self.assertEqual(out.dtype, out_dtype)
    self.assertEqual(gram.dtype, out_dtype)
    ha, hb = _np(a).astype(np.float64), _np(b).astype(np.float64)
    if jnp.issubdtype(in_dtype, jnp.integer):
      np.testing.assert_array_equal(np.asarray(out),
                                    (ha @ hb).astype(np.int64))
      np.testing.assert_array_equal(np.asarray(gram),
                                    (ha @ ha.T).astype(np.int64))
    else:
      tol = 2e-2 if out_dtype == jnp.bfloat16 else 1e-4
      np.testing.assert_allclose(_np(out), ha @ hb, rtol=tol, atol=tol * 8)
      np.testing.assert_allclose(_np(gram), ha @ ha.T, rtol=tol,
                                 atol=tol * 8)

  @chex.variants(with_jit=True, without_jit=True)
  def test_batched_einsum(self):
    q = _data((2, 8, 32), seed=12)
    k = _data((2, 16, 32), seed=13)

    def kernel(q_ref, k_ref, o_ref):
      o_ref[...] = jnp.einsum("bqd,bkd->bqk", q_ref[...], k_ref[...],
                              preferred_element_type=jnp.float32)

    out = self.variant(lambda q, k: _call(kernel, _sds((2, 8, 16)), q, k))(
        q, k)
    np.testing.assert_allclose(
        np.asarray(out), np.einsum("bqd,bkd->bqk", np.asarray(q, np.float64),
                                   np.asarray(k, np.float64)),
        rtol=1e-4, atol=1e-4)


class HbmAccessErrorTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("load", "load"), ("store", "store"),
                                  ("accumulate", "accumulate"))
  def test_direct_hbm_access_raises(self, what):
    def kernel(x_ref, o_ref):
      if what == "load":
        o_ref[...] = x_ref[...]
      elif what == "store":
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        x_ref[...] = o_ref[...]
      else:
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        x_ref[...] += o_ref[...]

    f = self.variant(lambda x: _call(kernel, _sds((8, 128)), x,
                                     in_specs=[ANY], out_specs=VMEM))
    with self.assertRaisesRegex(Exception,
                                "fast_interpret: unsupported feature"):
      jax.block_until_ready(f(X))

  def test_direct_hbm_read_raises_at_trace_time(self):
    """The error comes while lowering, before anything runs."""
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[...]

    f = jax.jit(lambda x: _call(kernel, _sds((8, 128)), x,
                                in_specs=[pl.BlockSpec(memory_space=pltpu.HBM)],
                                out_specs=VMEM))
    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "fast_interpret: unsupported feature"):
      f.lower(X)


if __name__ == "__main__":
  absltest.main()
