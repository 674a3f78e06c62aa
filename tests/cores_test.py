"""Feature tests: several simulated TensorCores under fast_interpret.

Covers ``pl.core_map`` / ``pl.kernel`` over ``pltpu.create_tensorcore_mesh``
with 2 and 4 cores (per-core work split, private VMEM/SMEM, shared HBM and
``pltpu.VMEM_SHARED``), ``pltpu.core_barrier`` (at top level, in a
``pl.run_scoped``, inside a ``pl.loop``), ``pltpu.run_on_first_core``,
``pl.semaphore_signal(..., core_index=)`` from a later core to an earlier
one, ``core_parallel`` grids split by ``num_cores_or_threads``, and
``random_seed`` (a fixed order per seed that does not change the result of a
correct kernel). Expected values come from NumPy.

Run:  python -m pytest tests/cores_test.py -q
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
  from tests.feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, REGULAR  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  from feature_util import setUpModule, sds as _sds, call as _call, data as _data, FI, REGULAR  # pylint: disable=g-import-not-at-top,unused-import

ROWS = 8  # Rows of the array each core owns.


def _mesh_kernel(body, out_shape, num_cores, scratch=(), interpret=None):
  mesh = pltpu.create_tensorcore_mesh("core", num_cores=num_cores)
  return pl.kernel(body, out_type=out_shape, mesh=mesh,
                   scratch_types=scratch,
                   interpret=FI() if interpret is None else interpret)


def _rows(c):
  return pl.ds(pl.multiple_of(c * ROWS, ROWS), ROWS)


def _chunks(x, num_cores):
  return np.asarray(x).reshape(num_cores, ROWS, -1)


class CoreMapTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_each_core_does_its_share(self, num_cores):
    x = _data((num_cores * ROWS, 128))

    def body(x_hbm, o_hbm, buf):
      c = lax.axis_index("core")
      pltpu.sync_copy(x_hbm.at[_rows(c)], buf)
      buf[...] = buf[...] * 2.0 + c.astype(jnp.float32)
      pltpu.sync_copy(buf, o_hbm.at[_rows(c)])

    f = _mesh_kernel(body, _sds(x.shape), num_cores,
                     [pltpu.VMEM((ROWS, 128), jnp.float32)])
    out = self.variant(f)(x)
    expected = _chunks(x, num_cores) * 2 + np.arange(num_cores)[:, None, None]
    np.testing.assert_allclose(np.asarray(out), expected.reshape(x.shape),
                               rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_core_map_over_run_state(self):
    x = _data((2 * ROWS, 128))
    mesh = pltpu.create_tensorcore_mesh("core", num_cores=2)

    def f(x):
      def stateful(refs):
        x_ref, o_ref = refs

        @pl.core_map(mesh, interpret=FI())
        def _():
          c = lax.axis_index("core")

          def scoped(buf):
            pltpu.sync_copy(x_ref.at[_rows(c)], buf)
            buf[...] = buf[...] + 1.0
            pltpu.sync_copy(buf, o_ref.at[_rows(c)])

          pl.run_scoped(scoped, pltpu.VMEM((ROWS, 128), jnp.float32))

      return pl.run_state(stateful)((x, jnp.zeros_like(x)))[1]

    out = self.variant(f)(x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x) + 1, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_smem_and_vmem_are_private_to_a_core(self, num_cores):
    # Only core 0 writes its scratch; with zero-filled memory every other
    # core still reads zeros from its own copy.
    def body(o_hbm, smem, vmem):
      c = lax.axis_index("core")

      @pltpu.run_on_first_core("core")
      def _():
        smem[0] = 7
        vmem[...] = jnp.full(vmem.shape, 5.0)

      vmem[...] = vmem[...] + smem[0].astype(jnp.float32)
      pltpu.sync_copy(vmem, o_hbm.at[_rows(c)])

    f = _mesh_kernel(body, _sds((num_cores * ROWS, 128)), num_cores,
                     [pltpu.SMEM((1,), jnp.int32),
                      pltpu.VMEM((ROWS, 128), jnp.float32)],
                     interpret=FI(uninitialized_memory="zero"))
    out = _chunks(self.variant(f)(), num_cores)
    expected = np.zeros((num_cores, ROWS, 128), np.float32)
    expected[0] = 12.0
    np.testing.assert_array_equal(out, expected)


def _exchange_body(num_cores):
  """Each core publishes 2*x in shared VMEM, then reads its neighbour's."""

  def body(x_hbm, o_hbm, buf, sem, shared):
    c = lax.axis_index("core")
    pltpu.sync_copy(x_hbm.at[_rows(c)], buf)
    shared[_rows(c)] = buf[...] * 2.0
    pltpu.core_barrier(sem, core_axis_name="core")
    pltpu.sync_copy(shared.at[_rows((c + 1) % num_cores)],
                    o_hbm.at[_rows(c)])

  return body


def _neighbours(x, num_cores, scale=2.0):
  return np.roll(_chunks(x, num_cores) * scale, -1, axis=0).reshape(x.shape)


class BarrierTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_barrier_then_read_neighbour_in_vmem_shared(self, num_cores):
    x = _data((num_cores * ROWS, 128))
    f = _mesh_kernel(_exchange_body(num_cores), _sds(x.shape), num_cores,
                     [pltpu.VMEM((ROWS, 128), jnp.float32), REGULAR,
                      pltpu.VMEM_SHARED((num_cores * ROWS, 128),
                                        jnp.float32)])
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               _neighbours(x, num_cores), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_barrier_on_run_scoped_semaphore_through_hbm(self, num_cores):
    x = _data((num_cores * ROWS, 128))

    def body(x_hbm, o_hbm, tmp_hbm, buf):
      c = lax.axis_index("core")
      pltpu.sync_copy(x_hbm.at[_rows(c)], buf)
      buf[...] = buf[...] * 3.0
      pltpu.sync_copy(buf, tmp_hbm.at[_rows(c)])

      def scoped(sem):
        pltpu.core_barrier(sem, core_axis_name="core")

      pl.run_scoped(scoped, REGULAR)
      pltpu.sync_copy(tmp_hbm.at[_rows((c + 1) % num_cores)],
                      o_hbm.at[_rows(c)])

    f = _mesh_kernel(body, (_sds(x.shape), _sds(x.shape)), num_cores,
                     [pltpu.VMEM((ROWS, 128), jnp.float32)])
    out, _ = self.variant(f)(x)
    np.testing.assert_allclose(np.asarray(out),
                               _neighbours(x, num_cores, 3.0), rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_barriers_inside_a_loop_pass_values_round_a_ring(self, num_cores):
    rounds = 3

    def body(o_hbm, slot, sem, shared):
      c = lax.axis_index("core")
      slot[...] = jnp.full(slot.shape, c.astype(jnp.float32))

      @pl.loop(0, rounds)
      def _(r):
        shared[_rows(c)] = slot[...]
        pltpu.core_barrier(sem, core_axis_name="core")
        slot[...] = shared[_rows((c + 1) % num_cores)] * 10.0 + r
        pltpu.core_barrier(sem, core_axis_name="core")

      pltpu.sync_copy(slot, o_hbm.at[_rows(c)])

    f = _mesh_kernel(body, _sds((num_cores * ROWS, 128)), num_cores,
                     [pltpu.VMEM((ROWS, 128), jnp.float32), REGULAR,
                      pltpu.VMEM_SHARED((num_cores * ROWS, 128),
                                        jnp.float32)])
    values = np.arange(num_cores, dtype=np.float64)
    for r in range(rounds):
      values = np.roll(values, -1) * 10.0 + r
    expected = np.broadcast_to(values[:, None, None], (num_cores, ROWS, 128))
    np.testing.assert_allclose(_chunks(self.variant(f)(), num_cores),
                               expected, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_run_on_first_core_fills_shared_memory(self, num_cores):
    x = _data((num_cores * ROWS, 128))

    def body(x_hbm, o_hbm, sem, shared):
      c = lax.axis_index("core")

      @pltpu.run_on_first_core("core")
      def _():
        pltpu.sync_copy(x_hbm, shared)
        shared[...] = shared[...] + 1.0

      pltpu.core_barrier(sem, core_axis_name="core")
      pltpu.sync_copy(shared.at[_rows(c)], o_hbm.at[_rows(c)])

    f = _mesh_kernel(body, _sds(x.shape), num_cores,
                     [REGULAR, pltpu.VMEM_SHARED(x.shape, jnp.float32)])
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               np.asarray(x) + 1.0, rtol=1e-6)


class CrossCoreSignalTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("two_cores", 2), ("four_cores", 4))
  def test_later_core_produces_for_earlier_core(self, num_cores):
    # The consumer's code comes first and core 0 runs first: it must wait
    # for the last core's signal.
    last = num_cores - 1
    x = _data((ROWS, 128))

    def body(x_hbm, o_hbm, buf, sem, shared):
      c = lax.axis_index("core")

      @pl.when(c == 0)
      def _():
        pl.semaphore_wait(sem, 1)
        pltpu.sync_copy(shared, o_hbm)

      @pl.when(c == last)
      def _():
        pltpu.sync_copy(x_hbm, buf)
        shared[...] = buf[...] * 4.0
        pl.semaphore_signal(sem, 1, core_index=0)

    f = _mesh_kernel(body, _sds(x.shape), num_cores,
                     [pltpu.VMEM((ROWS, 128), jnp.float32), REGULAR,
                      pltpu.VMEM_SHARED((ROWS, 128), jnp.float32)])
    np.testing.assert_allclose(np.asarray(self.variant(f)(x)),
                               np.asarray(x) * 4.0, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_signal_own_core_index_with_one_core(self):
    def body(o_ref, sem):
      pl.semaphore_signal(sem, 3, core_index=0)
      pl.semaphore_wait(sem, 3)
      o_ref[...] = jnp.ones(o_ref.shape, o_ref.dtype)

    out = self.variant(lambda: _call(body, _sds((8, 128)),
                                     scratch_shapes=[REGULAR]))()
    np.testing.assert_array_equal(np.asarray(out), np.ones((8, 128)))

  def test_wait_nobody_signals_is_an_error_not_a_hang(self):
    def body(o_hbm, sem):
      c = lax.axis_index("core")
      pl.semaphore_wait(sem, 1)  # Both cores wait before either signals.
      pl.semaphore_signal(sem, 1, core_index=1 - c)
      del o_hbm

    f = _mesh_kernel(body, _sds((8, 128)), 2, [REGULAR])
    with self.assertRaisesRegex(Exception,
                                r"fast_interpret: semaphore: a semaphore wait"
                                r".*unless another core signals it later"):
      jax.block_until_ready(jax.jit(f)())

  def test_uneven_split_with_signals_is_unsupported(self):
    def kernel(o_ref, sem):
      pl.semaphore_signal(sem, 1, core_index=0)
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    with self.assertRaisesRegex(fast_interpret.UnsupportedFeatureError,
                                "fast_interpret: unsupported feature: cores "
                                "that signal each other"):
      _call(kernel, _sds((3, 8, 128)), grid=(3,),
            out_specs=pl.BlockSpec((None, 8, 128), lambda i: (i, 0, 0)),
            scratch_shapes=[REGULAR],
            compiler_params=pltpu.CompilerParams(
                dimension_semantics=("core_parallel",)),
            interpret=FI(num_cores_or_threads=2))


def _accumulate_kernel(x_ref, o_ref, acc):
  @pl.when(pl.program_id(1) == 0)
  def _():
    acc[...] = jnp.zeros_like(acc)

  acc[...] += x_ref[...]

  @pl.when(pl.program_id(1) == pl.num_programs(1) - 1)
  def _():
    o_ref[...] = acc[...]


def _accumulate(x, interpret, semantics=("core_parallel", "arbitrary")):
  n, k = x.shape[:2]
  return _call(
      _accumulate_kernel, _sds((n, 8, 128)), x, grid=(n, k),
      in_specs=[pl.BlockSpec((None, None, 8, 128),
                             lambda i, j: (i, j, 0, 0))],
      out_specs=pl.BlockSpec((None, 8, 128), lambda i, j: (i, 0, 0)),
      scratch_shapes=[pltpu.VMEM((8, 128), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
      interpret=interpret)


class GridSplitTest(chex.TestCase, parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("two_cores", 2, 4), ("four_cores", 4, 4), ("uneven", 2, 3),
      ("more_cores_than_points", 4, 2))
  def test_core_parallel_grid_with_private_scratch(self, num_cores, n):
    x = _data((n, 3, 8, 128))
    out = self.variant(lambda x: _accumulate(
        x, FI(num_cores_or_threads=num_cores)))(x)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(x, np.float64).sum(1), rtol=1e-5,
                               atol=1e-5)


def _visit_order(n, seed, num_cores=1):
  """Position at which each point of a parallel grid of n points ran."""

  def kernel(o_ref, counter):
    o_ref[0] = counter[0]
    counter[0] += 1

  return _call(kernel, _sds((n,), jnp.int32), grid=(n,),
               out_specs=pl.BlockSpec((1,), lambda i: (i,),
                                      memory_space=pltpu.SMEM),
               scratch_shapes=[pltpu.SMEM((1,), jnp.int32)],
               compiler_params=pltpu.CompilerParams(
                   dimension_semantics=("parallel",)),
               interpret=FI(random_seed=seed, num_cores_or_threads=num_cores,
                            uninitialized_memory="zero"))


class RandomSeedTest(chex.TestCase, parameterized.TestCase):

  def test_no_seed_runs_in_order(self):
    np.testing.assert_array_equal(np.asarray(_visit_order(16, None)),
                                  np.arange(16))

  @parameterized.named_parameters(("seed_1", 1), ("seed_7", 7))
  def test_a_seed_gives_a_fixed_shuffle(self, seed):
    first = np.asarray(_visit_order(16, seed))
    np.testing.assert_array_equal(np.sort(first), np.arange(16))
    self.assertFalse(np.array_equal(first, np.arange(16)))
    np.testing.assert_array_equal(np.asarray(_visit_order(16, seed)), first)

  def test_different_seeds_give_different_orders(self):
    self.assertFalse(np.array_equal(np.asarray(_visit_order(16, 1)),
                                    np.asarray(_visit_order(16, 2))))

  def test_shuffle_is_split_over_cores(self):
    # Two cores, each counting from zero in its own SMEM: each core visits
    # half of the points.
    order = np.asarray(_visit_order(16, 3, num_cores=2))
    np.testing.assert_array_equal(np.sort(order), np.repeat(np.arange(8), 2))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("seed_0", 0), ("seed_5", 5),
                                  ("seed_5_two_cores", 5, 2))
  def test_result_of_a_correct_kernel_does_not_depend_on_it(self, seed,
                                                            num_cores=1):
    x = _data((4, 3, 8, 128))
    out = self.variant(lambda x: _accumulate(
        x, FI(random_seed=seed, num_cores_or_threads=num_cores),
        ("parallel", "arbitrary")))(x)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(x, np.float64).sum(1), rtol=1e-5,
                               atol=1e-5)


class LoweringTest(absltest.TestCase):

  def test_lock_step_without_checks_has_no_host_callback(self):
    x = _data((2 * ROWS, 128))
    f = _mesh_kernel(_exchange_body(2), _sds(x.shape), 2,
                     [pltpu.VMEM((ROWS, 128), jnp.float32), REGULAR,
                      pltpu.VMEM_SHARED((2 * ROWS, 128), jnp.float32)],
                     interpret=FI.unchecked())
    text = jax.jit(f).lower(x).as_text()
    self.assertNotIn("callback", text)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), _neighbours(x, 2),
                               rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
