"""Feature tests: control flow with refs inside, under fast_interpret.

Covers ``lax.fori_loop`` (static and dynamic bounds), ``pl.loop``,
``pl.when``, ``lax.cond`` / ``lax.switch``, ``lax.while_loop`` (also with a
condition that reads a ref), ``lax.scan``, a nested ``jax.jit`` inside the
kernel and ``pl.run_scoped`` (VMEM scratch and semaphores scoped to the body).
Every body reads and writes refs. Expected values come from plain NumPy or
from JAX's ``interpret=True`` mode.

Run:  python -m pytest tests/control_flow_test.py -q
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
  from tests.feature_util import setUpModule, sds as _sds, call as _call, FI, VMEM, SMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, FI, VMEM, SMEM, ANY  # pylint: disable=g-import-not-at-top,unused-import



def _data(shape, seed=0):
  return jnp.asarray(
      np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


X = _data((8, 128))


class LoopTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("unroll1", 1), ("unroll2", 2),
                                  ("unroll_full", True))
  def test_fori_loop_static_bounds(self, unroll):
    def kernel(x_ref, o_ref, acc_ref):
      acc_ref[...] = jnp.zeros_like(acc_ref)

      def body(i, carry):
        row = x_ref[pl.ds(i, 1), :]
        o_ref[pl.ds(7 - i, 1), :] = row * i.astype(jnp.float32)
        acc_ref[...] += row
        return carry + jnp.sum(row)

      total = lax.fori_loop(0, 8, body, jnp.float32(0), unroll=unroll)
      o_ref[0:1, :] = acc_ref[...] + total

    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((8, 128)), x,
        scratch_shapes=[pltpu.VMEM((1, 128), jnp.float32)]))(X))
    x = np.asarray(X, np.float64)
    expected = (x * np.arange(8)[:, None])[::-1].copy()
    expected[0] = x.sum(0) + x.sum()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("n0", 0), ("n3", 3), ("n8", 8))
  def test_fori_loop_dynamic_bounds(self, n):
    """Upper bound read from SMEM: a while loop with a traced trip count."""

    def kernel(n_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def body(i, c):
        o_ref[pl.ds(i, 1), :] = x_ref[pl.ds(i, 1), :] + c
        return c + 1.0

      last = lax.fori_loop(n_ref[0], n_ref[1], body, jnp.float32(0))
      o_ref[7:8, :] += last

    def f(n, x, interpret=None):
      return _call(kernel, _sds((8, 128)), n, x, in_specs=[SMEM, VMEM],
                   interpret=interpret)

    bounds = jnp.array([0, n], jnp.int32)
    out = np.asarray(self.variant(f)(bounds, X))
    expected = np.zeros((8, 128), np.float32)
    expected[:n] = np.asarray(X)[:n] + np.arange(n)[:, None]
    expected[7] += n
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(f(bounds, X, interpret=True)),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_fori_loop_dynamic_lower_bound(self):
    def kernel(n_ref, x_ref, o_ref):
      o_ref[...] = jnp.full(o_ref.shape, -1.0, o_ref.dtype)

      @pl.loop(n_ref[0], 8)
      def _(i):
        o_ref[pl.ds(i, 1), :] = x_ref[pl.ds(i, 1), :]

    out = np.asarray(self.variant(lambda n, x: _call(
        kernel, _sds((8, 128)), n, x, in_specs=[SMEM, VMEM]))(
            jnp.array([5], jnp.int32), X))
    expected = np.full((8, 128), -1.0, np.float32)
    expected[5:] = np.asarray(X)[5:]
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("step1", 1), ("step2", 2), ("step3", 3))
  def test_pl_loop_with_step(self, step):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      @pl.loop(1, 8, step=step)
      def _(i):
        o_ref[pl.ds(i, 1), :] = x_ref[pl.ds(i - 1, 1), :] * 2.0

    out = np.asarray(self.variant(lambda x: _call(kernel, _sds((8, 128)),
                                                  x))(X))
    expected = np.zeros((8, 128), np.float32)
    for i in range(1, 8, step):
      expected[i] = np.asarray(X)[i - 1] * 2
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_pl_loop_with_carry_and_nested_loop(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      @pl.loop(0, 4, init_carry=jnp.float32(0))
      def total(i, c):
        @pl.loop(0, 2)
        def _(j):
          r = 2 * i + j
          o_ref[pl.ds(r, 1), :] = x_ref[pl.ds(r, 1), :] + c
        return c + 10.0

      o_ref[0:1, 0:1] = jnp.full((1, 1), total)

    out = np.asarray(self.variant(lambda x: _call(kernel, _sds((8, 128)),
                                                  x))(X))
    expected = np.asarray(X) + (np.arange(8) // 2 * 10.0)[:, None]
    expected[0, 0] = 40.0
    np.testing.assert_allclose(out, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("below_limit", 10.0), ("above", 100.0))
  def test_while_loop_condition_reads_ref(self, limit):
    def kernel(lim_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def cond(c):
        return o_ref[0, 0] < lim_ref[0]

      def body(c):
        o_ref[...] += x_ref[...]
        return c + 1

      n = lax.while_loop(cond, body, jnp.int32(0))
      o_ref[1, 0] = n.astype(jnp.float32)

    x = jnp.full((8, 128), 3.0, jnp.float32)
    out = np.asarray(self.variant(lambda lim, x: _call(
        kernel, _sds((8, 128)), lim, x, in_specs=[SMEM, VMEM]))(
            jnp.array([limit], jnp.float32), x))
    n = int(np.ceil(limit / 3.0))
    expected = np.full((8, 128), 3.0 * n, np.float32)
    expected[1, 0] = n
    np.testing.assert_array_equal(out, expected)

  @chex.variants(with_jit=True, without_jit=True)
  def test_while_loop_with_value_condition(self):
    def kernel(x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def body(carry):
        i, s = carry
        o_ref[pl.ds(i, 1), :] = x_ref[pl.ds(i, 1), :] + s
        return i + 1, s + jnp.sum(x_ref[pl.ds(i, 1), :])

      lax.while_loop(lambda c: c[0] < 5, body, (jnp.int32(0), jnp.float32(0)))

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    x = np.asarray(X, np.float64)
    sums = np.concatenate([[0.0], np.cumsum(x.sum(1))])
    expected = np.zeros((8, 128))
    expected[:5] = x[:5] + sums[:5, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out, np.asarray(f(X, interpret=True)),
                               rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("forward", False), ("reverse", True))
  def test_scan_with_refs(self, reverse):
    def kernel(x_ref, o_ref, ys_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def body(carry, i):
        row = x_ref[pl.ds(i, 1), :]
        o_ref[...] += row
        o_ref[pl.ds(i, 1), :] += carry
        return carry + 1.0, jnp.sum(row)

      last, ys = lax.scan(body, jnp.float32(0), jnp.arange(8),
                          reverse=reverse)
      ys_ref[...] = ys[None, :] + last

    out, ys = self.variant(lambda x: _call(
        kernel, (_sds((8, 128)), _sds((1, 8))), x))(X)
    x = np.asarray(X, np.float64)
    order = range(7, -1, -1) if reverse else range(8)
    expected = np.zeros((8, 128))
    for step, i in enumerate(order):
      expected += x[i]
      expected[i] += step
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(ys)[0], x.sum(1) + 8, rtol=1e-5,
                               atol=1e-4)


  @chex.variants(with_jit=True, without_jit=True)
  def test_scan_over_xs_with_smem_indices(self):
    def kernel(idx_ref, x_ref, o_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def body(c, i):
        o_ref[pl.ds(c, 1), :] = x_ref[pl.ds(idx_ref[i], 1), :]
        return c + 1, idx_ref[i] * 2

      _, ys = lax.scan(body, jnp.int32(0), jnp.arange(4))
      o_ref[4:5, 0:4] = ys.astype(jnp.float32)[None, :]

    x = _data((16, 128), seed=4)
    idx = jnp.array([5, 2, 9, 0], jnp.int32)
    f = lambda idx, x, interpret=None: _call(
        kernel, _sds((8, 128)), idx, x, in_specs=[SMEM, VMEM],
        interpret=interpret)
    out = np.asarray(self.variant(f)(idx, x))
    expected = np.zeros((8, 128), np.float32)
    expected[:4] = np.asarray(x)[np.asarray(idx)]
    expected[4, :4] = np.asarray(idx) * 2
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(idx, x, interpret=True)))


class BranchTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_pl_when_per_grid_step(self):
    def kernel(x_ref, o_ref):
      i = pl.program_id(0)
      o_ref[...] = x_ref[...]

      @pl.when(i % 2 == 0)
      def _():
        o_ref[...] = x_ref[...] * 10.0

      @pl.when(i == 3)
      def _():
        o_ref[0:1, :] = jnp.full((1, 128), -1.0)

    f = lambda x, interpret=None: _call(
        kernel, _sds((32, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        interpret=interpret)
    x = _data((32, 128), seed=1)
    out = np.asarray(self.variant(f)(x))
    expected = np.asarray(x).copy()
    expected[0:8] *= 10
    expected[16:24] *= 10
    expected[24] = -1
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("true", 1.0), ("false", -1.0))
  def test_cond_with_refs_and_outputs(self, sign):
    def kernel(p_ref, x_ref, o_ref, s_ref):
      o_ref[...] = jnp.zeros_like(o_ref)

      def yes():
        o_ref[0:4, :] = x_ref[0:4, :]
        return jnp.sum(x_ref[...])

      def no():
        o_ref[4:8, :] = x_ref[4:8, :] * 2.0
        return jnp.float32(-5.0)

      s_ref[0] = lax.cond(p_ref[0] > 0, yes, no)

    out, s = self.variant(lambda p, x: _call(
        kernel, (_sds((8, 128)), _sds((1,))), p, x,
        in_specs=[SMEM, VMEM], out_specs=(VMEM, SMEM)))(
            jnp.array([sign], jnp.float32), X)
    x = np.asarray(X)
    expected = np.zeros((8, 128), np.float32)
    if sign > 0:
      expected[0:4] = x[0:4]
      np.testing.assert_allclose(float(s[0]), x.astype(np.float64).sum(),
                                 rtol=1e-4, atol=1e-3)
    else:
      expected[4:8] = x[4:8] * 2
      self.assertEqual(float(s[0]), -5.0)
    np.testing.assert_array_equal(np.asarray(out), expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("branch0", 0), ("branch1", 1),
                                  ("branch2", 2), ("clamped_high", 7))
  def test_switch_with_refs(self, index):
    def kernel(i_ref, x_ref, o_ref):
      o_ref[...] = x_ref[...]
      branches = [
          lambda: o_ref.__setitem__((slice(0, 2),), x_ref[0:2] + 1.0),
          lambda: o_ref.__setitem__((slice(2, 4),), x_ref[2:4] * 3.0),
          lambda: o_ref.__setitem__(
              (slice(None),), jnp.zeros((8, 128), jnp.float32)),
      ]
      lax.switch(i_ref[0], branches)

    f = lambda i, x, interpret=None: _call(
        kernel, _sds((8, 128)), i, x, in_specs=[SMEM, VMEM],
        interpret=interpret)
    idx = jnp.array([index], jnp.int32)
    out = np.asarray(self.variant(f)(idx, X))
    x = np.asarray(X)
    expected = x.copy()
    k = min(index, 2)
    if k == 0:
      expected[0:2] += 1
    elif k == 1:
      expected[2:4] *= 3
    else:
      expected[:] = 0
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(idx, X, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_cond_inside_loop_accumulates(self):
    def kernel(x_ref, o_ref, even_ref):
      o_ref[...] = jnp.zeros_like(o_ref)
      even_ref[0] = 0

      @pl.loop(0, 8)
      def _(i):
        @pl.when(i % 2 == 0)
        def _():
          o_ref[0:1, :] += x_ref[pl.ds(i, 1), :]
          even_ref[0] += 1

        @pl.when(i % 2 == 1)
        def _():
          o_ref[1:2, :] += x_ref[pl.ds(i, 1), :]

    out, n = self.variant(lambda x: _call(
        kernel, (_sds((2, 128)), _sds((1,), jnp.int32)), x,
        out_specs=(VMEM, SMEM)))(X)
    x = np.asarray(X, np.float64)
    np.testing.assert_allclose(np.asarray(out),
                               np.stack([x[0::2].sum(0), x[1::2].sum(0)]),
                               rtol=1e-5, atol=1e-5)
    self.assertEqual(int(n[0]), 4)


@jax.jit
def _jitted_ref_helper(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1.0


class NestedJitAndScopeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("values", False), ("refs", True))
  def test_nested_jit(self, with_refs):
    def kernel(x_ref, o_ref):
      if with_refs:
        _jitted_ref_helper(x_ref, o_ref)
      else:
        o_ref[...] = jax.jit(lambda v: v + 1.0)(x_ref[...])
      o_ref[0:2] += jax.jit(lambda v: v * 10.0)(x_ref[0:2])

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    expected = np.asarray(X) + 1
    expected[0:2] += np.asarray(X)[0:2] * 10
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(f(X, interpret=True)),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_nested_jits_of_pure_code(self):
    # jnp.where is a jit of pure equations (inlined as it is); the outer jit
    # holds a gather with a rule (walked), whose indices are known.
    @jax.jit
    def butterfly(v):
      partner = lax.broadcasted_iota(jnp.int32, v.shape, 1) ^ 1
      swapped = jnp.take_along_axis(v, partner, axis=1)
      return jnp.where(v > swapped, v, swapped)

    def kernel(x_ref, o_ref):
      v = x_ref[...]
      o_ref[...] = jax.jit(lambda a: jnp.where(a > 0, a, 2.0 * a))(
          butterfly(v))

    f = lambda x, interpret=None: _call(kernel, _sds((8, 128)), x,
                                        interpret=interpret)
    out = np.asarray(self.variant(f)(X))
    x = np.asarray(X)
    m = np.maximum(x, x[:, np.arange(128) ^ 1])
    expected = np.where(m > 0, m, 2 * m)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(out, np.asarray(f(X, interpret=True)),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_run_scoped_vmem_scratch(self):
    def kernel(x_ref, o_ref):
      def body(tmp_ref, acc_ref):
        tmp_ref[...] = x_ref[...] * 2.0
        acc_ref[0] = 0

        @pl.loop(0, 8)
        def _(i):
          acc_ref[0] += i

        o_ref[...] = tmp_ref[...] + acc_ref[0].astype(jnp.float32)
        return acc_ref[0]

      n = pl.run_scoped(body, pltpu.VMEM((8, 128), jnp.float32),
                        pltpu.SMEM((1,), jnp.int32))
      o_ref[0, 0] = n.astype(jnp.float32)

    out = np.asarray(self.variant(lambda x: _call(kernel, _sds((8, 128)),
                                                  x))(X))
    expected = np.asarray(X) * 2 + 28
    expected[0, 0] = 28
    np.testing.assert_allclose(out, expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_run_scoped_dma_semaphore(self):
    def kernel(x_hbm, o_ref, cnt_ref):
      def body(buf, sem):
        cnt_ref[0] = pl.semaphore_read(sem)
        cp = pltpu.make_async_copy(x_hbm.at[pl.ds(2, 4)], buf, sem)
        cp.start()
        cnt_ref[1] = jnp.minimum(pl.semaphore_read(sem), 1)
        cp.wait()
        cnt_ref[2] = pl.semaphore_read(sem)
        o_ref[...] = buf[...] * 3.0

      pl.run_scoped(body, pltpu.VMEM((4, 128), jnp.float32),
                    pltpu.SemaphoreType.DMA)

    out, cnt = self.variant(lambda x: _call(
        kernel, (_sds((4, 128)), _sds((3,), jnp.int32)), x,
        in_specs=[ANY], out_specs=(VMEM, SMEM)))(X)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(X)[2:6] * 3)
    np.testing.assert_array_equal(np.asarray(cnt), [0, 1, 0])

  @chex.variants(with_jit=True, without_jit=True)
  def test_run_scoped_regular_semaphore_fresh_each_entry(self):
    """A scoped semaphore starts at zero every time its scope is entered."""

    def kernel(o_ref):
      @pl.loop(0, 3)
      def _(i):
        def body(sem):
          pl.semaphore_signal(sem, i + 1)
          o_ref[i] = pl.semaphore_read(sem)
          pl.semaphore_wait(sem, i + 1)
        pl.run_scoped(body, pltpu.SemaphoreType.REGULAR)

    out = self.variant(lambda: _call(kernel, _sds((3,), jnp.int32),
                                     out_specs=SMEM))()
    np.testing.assert_array_equal(np.asarray(out), [1, 2, 3])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("taken", 1), ("not_taken", 0))
  def test_run_scoped_dma_semaphore_array_inside_when(self, pred):
    x = _data((16, 128), seed=3)

    def kernel(p_ref, x_hbm, o_ref):
      @pl.when(p_ref[0] > 0)
      def _():
        def body(buf, sems):
          c0 = pltpu.make_async_copy(x_hbm.at[0:8], buf.at[0], sems.at[0])
          c1 = pltpu.make_async_copy(x_hbm.at[8:16], buf.at[1], sems.at[1])
          c0.start()
          c1.start()
          c1.wait()
          c0.wait()
          o_ref[...] = buf[0] - buf[1]

        pl.run_scoped(body, pltpu.VMEM((2, 8, 128), jnp.float32),
                      pltpu.SemaphoreType.DMA((2,)))

      @pl.when(p_ref[0] <= 0)
      def _():
        o_ref[...] = jnp.full(o_ref.shape, -7.0, o_ref.dtype)

    f = lambda p, x, interpret=None: _call(
        kernel, _sds((8, 128)), p, x, in_specs=[SMEM, ANY],
        interpret=interpret)
    p = jnp.array([pred], jnp.int32)
    out = np.asarray(self.variant(f)(p, x))
    h = np.asarray(x)
    expected = h[:8] - h[8:] if pred else np.full((8, 128), -7.0, np.float32)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, np.asarray(f(p, x, interpret=True)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_run_scoped_in_grid_loop(self):
    def kernel(x_ref, o_ref):
      def body(tmp_ref):
        tmp_ref[...] = x_ref[...] + pl.program_id(0).astype(jnp.float32)
        o_ref[...] = tmp_ref[...] * 2.0
      pl.run_scoped(body, pltpu.VMEM((8, 128), jnp.float32))

    x = _data((32, 128), seed=2)
    out = np.asarray(self.variant(lambda x: _call(
        kernel, _sds((32, 128)), x, grid=(4,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0))))(x))
    expected = (np.asarray(x) + np.repeat(np.arange(4), 8)[:, None]) * 2
    np.testing.assert_allclose(out, expected, rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
