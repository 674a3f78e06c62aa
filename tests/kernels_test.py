"""Acceptance tests: matmul and megablox (gmm / tgmm) Pallas TPU kernels.

Each test runs a kernel from `jax.experimental.pallas.ops.tpu` under the mode
chosen by $FAST_INTERPRET_TEST_MODE (default "fast" = fast_interpret; "hlo" =
JAX's interpret=True; "tpu" = JAX's TPU interpret mode) and compares it with
an independent NumPy / plain-jnp reference written here.

Larger shapes are decorated with @slow and only run when
FAST_INTERPRET_SLOW_TESTS=1.

Run:  python -m pytest tests/kernels_test.py -q
      FAST_INTERPRET_TEST_MODE=hlo python -m pytest tests/kernels_test.py -q
"""

import importlib

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.experimental.pallas.ops.tpu import matmul as matmul_lib
from jax.experimental.pallas.ops.tpu.megablox import ops as megablox_ops
import jax.numpy as jnp
import numpy as np

# megablox/__init__.py re-exports the `gmm` function under the submodule's
# name, so fetch the backend module (gmm and tgmm kernels) explicitly.
gmm_lib = importlib.import_module(
    "jax.experimental.pallas.ops.tpu.megablox.gmm")

try:
  from tests import test_util  # pylint: disable=g-import-not-at-top
except ImportError:
  import test_util  # pylint: disable=g-import-not-at-top

slow = test_util.slow


# ---------------------------------------------------------------------------
# matmul (ops/tpu/matmul.py)


def matmul_reference(x, y):
  """x @ y on the host: exact in int64 for integers, float64 otherwise."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return np.asarray(x, np.int64) @ np.asarray(y, np.int64)
  return test_util.to_f64(x) @ test_util.to_f64(y)


_MATMUL_CASES = [
    # name, (m, k, n), block_shape, block_k, dtype, out_dtype
    ("f32_256x256x256_grid8", (256, 256, 256), (128, 128), 128,
     jnp.float32, None),
    ("f32_512x256x512_grid32", (512, 256, 512), (128, 128), 128,
     jnp.float32, None),
    ("f32_rect_256x384x128_grid12", (256, 384, 128), (64, 128), 128,
     jnp.float32, None),
    ("bf16_256x256x256_grid8", (256, 256, 256), (128, 128), 128,
     jnp.bfloat16, None),
    ("bf16_512x256x512_grid32", (512, 256, 512), (128, 128), 128,
     jnp.bfloat16, None),
    ("bf16_in_f32_out_256x512x256_grid16", (256, 512, 256), (128, 128), 128,
     jnp.bfloat16, jnp.float32),
    ("int8_in_int32_out_256x256x256_grid8", (256, 256, 256), (128, 128), 128,
     jnp.int8, jnp.int32),
]

_MATMUL_SLOW_CASES = [
    ("f32_1024x1024x1024_grid512", (1024, 1024, 1024), (128, 128), 128,
     jnp.float32, None),
    ("bf16_1024x1024x1024_grid512", (1024, 1024, 1024), (128, 128), 128,
     jnp.bfloat16, None),
    ("bf16_1024x2048x512_blocks256_grid64", (1024, 2048, 512), (256, 256), 256,
     jnp.bfloat16, None),
]


def _named(cases):
  return [dict(zip(
      ("testcase_name", "shape", "block_shape", "block_k", "dtype",
       "out_dtype"), c)) for c in cases]


class MatmulTest(test_util.KernelTestCase):

  def _check(self, shape, block_shape, block_k, dtype, out_dtype):
    m, k, n = shape
    r = test_util.rng(0)
    if jnp.dtype(dtype) == jnp.int8:
      x = jnp.asarray(r.integers(-128, 128, (m, k)), jnp.int8)
      y = jnp.asarray(r.integers(-128, 128, (k, n)), jnp.int8)
    else:
      # Scale so the outputs are O(1).
      x = test_util.normal(r, (m, k), dtype, scale=k ** -0.5)
      y = test_util.normal(r, (k, n), dtype)
    out = self.run_kernel(lambda: matmul_lib.matmul(
        x, y, block_shape=block_shape, block_k=block_k, out_dtype=out_dtype))
    expected_dtype = out_dtype if out_dtype is not None else dtype
    self.assertEqual(out.shape, (m, n))
    self.assertEqual(out.dtype, jnp.dtype(expected_dtype))
    expected = matmul_reference(x, y)
    if jnp.issubdtype(expected_dtype, jnp.integer):
      np.testing.assert_array_equal(np.asarray(out), expected)
    else:
      # The kernel accumulates in f32; only the final cast is to out dtype.
      self.assert_close(out, expected, dtype=expected_dtype)

  @parameterized.named_parameters(*_named(_MATMUL_CASES))
  def test_matmul(self, **kw):
    self._check(**kw)

  @parameterized.named_parameters(*_named(_MATMUL_SLOW_CASES))
  @slow
  def test_matmul_large(self, **kw):
    self._check(**kw)



# ---------------------------------------------------------------------------
# megablox gmm / tgmm (ops/tpu/megablox)


def group_sizes_for(m, num_groups, seed, *, empty=(), total=None):
  """Random int32 group sizes summing to `total` (default m), some empty."""
  total = m if total is None else total
  r = test_util.rng(seed)
  p = r.uniform(0.5, 1.5, num_groups)
  p[list(empty)] = 0.0
  sizes = r.multinomial(total, p / p.sum())
  assert sizes.sum() == total and all(sizes[list(empty)] == 0)
  return jnp.asarray(sizes, jnp.int32)


def _group_bounds(group_sizes):
  ends = np.cumsum(np.asarray(group_sizes))
  starts = ends - np.asarray(group_sizes)
  return list(zip(starts.tolist(), ends.tolist()))


def gmm_reference(lhs, rhs, group_sizes, *, transpose_rhs=False,
                  group_offset=0, existing_out=None):
  """out[rows of group g] = lhs[rows of g] @ rhs[g - group_offset] (float64).

  Rows of groups outside [group_offset, group_offset + rhs.shape[0]) are zero
  (or `existing_out` when given). Rows past sum(group_sizes) are left NaN:
  the kernel does not define them, the caller must not compare them.
  """
  lhs, rhs = test_util.to_f64(lhs), test_util.to_f64(rhs)
  if transpose_rhs:
    rhs = rhs.swapaxes(1, 2)
  m, n = lhs.shape[0], rhs.shape[2]
  if existing_out is None:
    out = np.zeros((m, n))
  else:
    out = test_util.to_f64(existing_out).copy()
  bounds = _group_bounds(group_sizes)
  out[bounds[-1][1]:] = np.nan
  for g, (s, e) in enumerate(bounds):
    local = g - group_offset
    if 0 <= local < rhs.shape[0]:
      out[s:e] = lhs[s:e] @ rhs[local]
  return out


def tgmm_reference(lhs, rhs, group_sizes, *, existing_out=None):
  """out[g] = lhs[:, rows of g] @ rhs[rows of g, :]; lhs is [k, m] (float64)."""
  lhs, rhs = test_util.to_f64(lhs), test_util.to_f64(rhs)
  bounds = _group_bounds(group_sizes)
  out = np.zeros((len(bounds), lhs.shape[0], rhs.shape[1]))
  for g, (s, e) in enumerate(bounds):
    out[g] = lhs[:, s:e] @ rhs[s:e]
  if existing_out is not None:
    out += test_util.to_f64(existing_out)
  return out


_GMM_CASES = [
    # name, m, k, n, num_groups, empty groups, tiling, dtype, out dtype, extra
    dict(testcase_name="f32_m256_g4_grid8", m=256, k=128, n=256, num_groups=4,
         empty=(1,), tiling=(128, 128, 128)),
    dict(testcase_name="f32_m512_g8_tile64_grid52", m=512, k=256, n=256,
         num_groups=8, empty=(0, 5), tiling=(64, 128, 128)),
    dict(testcase_name="f32_transpose_rhs", m=256, k=256, n=128,
         num_groups=3, empty=(), tiling=(64, 128, 128), transpose_rhs=True),
    dict(testcase_name="bf16_in_f32_out", m=256, k=256, n=256, num_groups=4,
         empty=(2,), tiling=(128, 128, 128), dtype=jnp.bfloat16),
    dict(testcase_name="bf16_in_bf16_out", m=512, k=128, n=256, num_groups=6,
         empty=(3,), tiling=(128, 128, 128), dtype=jnp.bfloat16,
         out_dtype=jnp.bfloat16),
    # k and n not multiples of the tile: partial (padded) edge blocks; the
    # kernel masks the k remainder itself.
    dict(testcase_name="f32_ragged_k192_n200", m=256, k=192, n=200,
         num_groups=3, empty=(), tiling=(128, 128, 128)),
    # Groups cover only the first 200 of 256 rows; the rest are undefined.
    dict(testcase_name="f32_groups_cover_prefix", m=256, k=128, n=128,
         num_groups=3, empty=(), tiling=(64, 128, 128), total=200),
    # Sharded groups: rhs holds groups [1, 3) of 5; other rows are zeroed.
    dict(testcase_name="f32_group_offset", m=256, k=128, n=128, num_groups=5,
         empty=(), tiling=(64, 128, 128), group_offset=1, local_groups=2),
    # ... and written into an existing (aliased) output instead.
    dict(testcase_name="f32_group_offset_existing_out", m=256, k=128, n=128,
         num_groups=5, empty=(), tiling=(64, 128, 128), group_offset=2,
         local_groups=2, existing=True),
]

_GMM_SLOW_CASES = [
    dict(testcase_name="bf16_m2048_g16_grid464", m=2048, k=512, n=512,
         num_groups=16, empty=(3, 4), tiling=(128, 128, 128),
         dtype=jnp.bfloat16),
    dict(testcase_name="f32_m1024_g32_tile64_grid270", m=1024, k=256, n=384,
         num_groups=32, empty=(0, 31), tiling=(64, 128, 128)),
]

_TGMM_CASES = [
    dict(testcase_name="f32_m256_g4", m=256, k=128, n=128, num_groups=4,
         empty=(2,), tiling=(128, 128, 128)),
    dict(testcase_name="f32_m512_g8_tile64_grid60", m=512, k=256, n=256,
         num_groups=8, empty=(0, 7), tiling=(64, 128, 128)),
    dict(testcase_name="bf16_in_f32_out", m=256, k=256, n=128, num_groups=5,
         empty=(1, 2), tiling=(64, 128, 128), dtype=jnp.bfloat16),
    dict(testcase_name="f32_existing_out", m=256, k=128, n=128, num_groups=3,
         empty=(), tiling=(64, 128, 128), existing=True),
]

_TGMM_SLOW_CASES = [
    dict(testcase_name="bf16_m2048_g16_grid496", m=2048, k=512, n=512,
         num_groups=16, empty=(5,), tiling=(128, 128, 128),
         dtype=jnp.bfloat16),
]


class GmmTest(test_util.KernelTestCase):

  def _check_gmm(self, m, k, n, num_groups, empty, tiling,
                 dtype=jnp.float32, out_dtype=jnp.float32, transpose_rhs=False,
                 total=None, group_offset=None, local_groups=None,
                 existing=False):
    r = test_util.rng(1)
    group_sizes = group_sizes_for(m, num_groups, seed=m + num_groups,
                                  empty=empty, total=total)
    local_groups = num_groups if local_groups is None else local_groups
    lhs = test_util.normal(r, (m, k), dtype, scale=k ** -0.5)
    rhs_shape = (local_groups, n, k) if transpose_rhs else (local_groups, k, n)
    rhs = test_util.normal(r, rhs_shape, dtype)
    existing_out = (test_util.normal(r, (m, n), out_dtype) if existing
                    else None)
    offset = (None if group_offset is None
              else jnp.asarray(group_offset, jnp.int32))

    out = self.run_kernel(lambda: gmm_lib.gmm(
        lhs, rhs, group_sizes, preferred_element_type=out_dtype,
        tiling=tiling, group_offset=offset, existing_out=existing_out,
        transpose_rhs=transpose_rhs))
    self.assertEqual(out.shape, (m, n))
    self.assertEqual(out.dtype, jnp.dtype(out_dtype))
    expected = gmm_reference(lhs, rhs, group_sizes,
                             transpose_rhs=transpose_rhs,
                             group_offset=group_offset or 0,
                             existing_out=existing_out)
    valid = int(np.sum(group_sizes))  # Rows past this are undefined.
    self.assert_close(out[:valid], expected[:valid], dtype=out_dtype)

  @parameterized.named_parameters(*_GMM_CASES)
  def test_gmm(self, **kw):
    self._check_gmm(**kw)

  @parameterized.named_parameters(*_GMM_SLOW_CASES)
  @slow
  def test_gmm_large(self, **kw):
    self._check_gmm(**kw)

  def _check_tgmm(self, m, k, n, num_groups, empty, tiling,
                  dtype=jnp.float32, existing=False):
    r = test_util.rng(2)
    group_sizes = group_sizes_for(m, num_groups, seed=3 * m + num_groups,
                                  empty=empty)
    lhs = test_util.normal(r, (k, m), dtype, scale=m ** -0.5)
    rhs = test_util.normal(r, (m, n), dtype)
    existing_out = (test_util.normal(r, (num_groups, k, n), jnp.float32)
                    if existing else None)
    out = self.run_kernel(lambda: gmm_lib.tgmm(
        lhs, rhs, group_sizes, preferred_element_type=jnp.float32,
        tiling=tiling, existing_out=existing_out))
    self.assertEqual(out.shape, (num_groups, k, n))
    expected = tgmm_reference(lhs, rhs, group_sizes, existing_out=existing_out)
    self.assert_close(out, expected, dtype=jnp.float32)

  @parameterized.named_parameters(*_TGMM_CASES)
  def test_tgmm(self, **kw):
    self._check_tgmm(**kw)

  @parameterized.named_parameters(*_TGMM_SLOW_CASES)
  @slow
  def test_tgmm_large(self, **kw):
    self._check_tgmm(**kw)

  def _check_gmm_grad(self, m, k, n, num_groups, empty, tiling,
                      dtype=jnp.float32, transpose_rhs=False):
    """jax.grad through megablox.ops.gmm: its VJP runs gmm and tgmm kernels."""
    r = test_util.rng(3)
    group_sizes = group_sizes_for(m, num_groups, seed=5 * m + num_groups,
                                  empty=empty)
    lhs = test_util.normal(r, (m, k), dtype, scale=k ** -0.5)
    rhs_shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    rhs = test_util.normal(r, rhs_shape, dtype)
    ct = test_util.normal(r, (m, n), jnp.float32)

    def loss(lhs, rhs):
      out = megablox_ops.gmm(lhs, rhs, group_sizes, jnp.float32, tiling,
                             None, None, transpose_rhs)
      return jnp.sum(out * ct)

    dlhs, drhs = self.run_kernel(
        lambda: jax.grad(loss, argnums=(0, 1))(lhs, rhs))
    # d(sum(out * ct)): dlhs[rows g] = ct[rows g] @ W_g^T,
    # dW_g = lhs[rows g]^T @ ct[rows g]; W_g = rhs[g] (or rhs[g]^T).
    l64, r64, c64 = (test_util.to_f64(a) for a in (lhs, rhs, ct))
    w = r64.swapaxes(1, 2) if transpose_rhs else r64
    exp_dlhs = np.zeros_like(l64)
    exp_dw = np.zeros_like(w)
    for g, (s, e) in enumerate(_group_bounds(group_sizes)):
      exp_dlhs[s:e] = c64[s:e] @ w[g].T
      exp_dw[g] = l64[s:e].T @ c64[s:e]
    exp_drhs = exp_dw.swapaxes(1, 2) if transpose_rhs else exp_dw
    self.assertEqual(dlhs.dtype, lhs.dtype)
    self.assertEqual(drhs.dtype, rhs.dtype)
    self.assert_close(dlhs, exp_dlhs, err_msg="dlhs")
    self.assert_close(drhs, exp_drhs, err_msg="drhs")

  @parameterized.named_parameters(
      dict(testcase_name="f32_m256_g4", m=256, k=128, n=128, num_groups=4,
           empty=(1,), tiling=(128, 128, 128)),
      dict(testcase_name="f32_m512_g8_tile64_grid56", m=512, k=128,
           n=256, num_groups=8, empty=(4,), tiling=(64, 128, 128)),
      dict(testcase_name="f32_transpose_rhs", m=256, k=128, n=256,
           num_groups=3, empty=(), tiling=(64, 128, 128), transpose_rhs=True),
      dict(testcase_name="bf16", m=256, k=256, n=128, num_groups=4,
           empty=(0,), tiling=(128, 128, 128), dtype=jnp.bfloat16),
  )
  def test_gmm_grad(self, **kw):
    self._check_gmm_grad(**kw)

  @parameterized.named_parameters(
      dict(testcase_name="bf16_m2048_g16", m=2048, k=512, n=512,
           num_groups=16, empty=(2,), tiling=(128, 128, 128),
           dtype=jnp.bfloat16),
  )
  @slow
  def test_gmm_grad_large(self, **kw):
    self._check_gmm_grad(**kw)


if __name__ == "__main__":
  absltest.main()
