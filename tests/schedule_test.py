"""Tests of the grid schedule (fast_interpret/schedule.py).

The schedule decides, once per call, every step's block indices and output
write-backs. Three ways to build it are covered, each against a NumPy
reference of the same pipeline and with its checks:
  * a constant table (index maps that read no ref): block-index and revisit
    errors raise while tracing, with the grid step;
  * a table computed at run time (index maps reading scalar prefetch): errors
    raise at run time; index-map SMEM reads are bounds-checked; a kernel
    error at an earlier grid step still wins;
  * index maps evaluated per step (dynamic grid bounds, or an index map that
    reads SMEM the kernel writes), with the same checks.

Run:  python -m pytest tests/schedule_test.py -q
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret
from fast_interpret import grid_tables
from fast_interpret import schedule
from tests import feature_util

FI = fast_interpret.FastInterpretParams
OOB = r"fast_interpret: out of bounds"
REVISIT = r"fast_interpret: output revisited"
ROWS, LANES = 32, 128
X = jnp.arange(ROWS * LANES, dtype=jnp.float32).reshape(ROWS, LANES)

setUpModule = feature_util.setUpModule


def _i32(*values):
  return jnp.array(values, jnp.int32)


def _copy_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1.0


def _static_call(in_map, out_map, grid, params):
  return pl.pallas_call(
      _copy_kernel, out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
      grid=grid, in_specs=[pl.BlockSpec((8, LANES), in_map)],
      out_specs=pl.BlockSpec((8, LANES), out_map), interpret=params)


def _prefetch_kernel(s_ref, x_ref, o_ref):
  del s_ref
  o_ref[...] = x_ref[...] + 1.0


def _prefetch_call(out_rows, grid, params, in_map=None, out_map=None):
  """Input block s[i], output block s[grid + i] (both from scalar prefetch)."""
  n = grid[0]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid,
      in_specs=[pl.BlockSpec((8, LANES), in_map or (lambda i, s: (s[i], 0)))],
      out_specs=pl.BlockSpec((8, LANES),
                             out_map or (lambda i, s: (s[n + i], 0))))
  return pl.pallas_call(
      _prefetch_kernel,
      out_shape=jax.ShapeDtypeStruct((out_rows, LANES), jnp.float32),
      grid_spec=grid_spec, interpret=params)


def _pipeline_reference(x, in_blocks, out_blocks, out_rows):
  """What the TPU pipeline computes: the last write-back of a block wins."""
  out = np.full((out_rows, LANES), np.nan, np.float32)
  x = np.asarray(x)
  for i, o in zip(in_blocks, out_blocks, strict=True):
    out[8 * o:8 * o + 8] = x[8 * i:8 * i + 8] + 1.0
  return out


class ConstantTableTest(chex.TestCase):
  """Index maps that read no ref: checked while tracing."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_index_out_of_bounds_raises_while_tracing(self):
    call = self.variant(_static_call(lambda i: (i, 0), lambda i: (i % 2, 0),
                                     (3,), FI()))
    with self.assertRaisesRegex(
        fast_interpret.KernelCheckError,
        OOB + r": the index map of .* selects block \[2, 0\].*grid step 2, "
        "found while tracing"):
      call(X[:16])

  @chex.variants(with_jit=True, without_jit=True)
  def test_revisit_raises_while_tracing(self):
    # The output block follows only j, the inner dimension: i revisits.
    call = self.variant(_static_call(lambda i, j: (j, 0),
                                     lambda i, j: (j, 0), (2, 2), FI()))
    with self.assertRaisesRegex(
        fast_interpret.KernelCheckError,
        REVISIT + r": block \[0, 0\] .*grid step 2, found while tracing"):
      call(X[:16])

  @chex.variants(with_jit=True, without_jit=True)
  def test_revisit_unchecked_runs_like_the_pipeline(self):
    call = self.variant(_static_call(lambda i, j: (j, 0),
                                     lambda i, j: (j, 0), (2, 2),
                                     FI(check_output_revisits=False)))
    want = _pipeline_reference(X[:16], [0, 1, 0, 1], [0, 1, 0, 1], 16)
    np.testing.assert_array_equal(call(X[:16]), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_consecutive_visits_are_not_revisits(self):
    # The output block follows i, the outer dimension: written once each.
    def kernel(x_ref, o_ref):
      @pl.when(pl.program_id(1) == 0)
      def _():
        o_ref[...] = jnp.zeros_like(o_ref)
      o_ref[...] += x_ref[...]

    call = self.variant(pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
        grid=(2, 4), in_specs=[pl.BlockSpec((8, LANES), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((8, LANES), lambda i, j: (i, 0)),
        interpret=FI()))
    want = np.tile(np.asarray(X).reshape(4, 8, LANES).sum(0), (2, 1))
    np.testing.assert_allclose(call(X), want)


class RunTimeTableTest(chex.TestCase):
  """Index maps that read scalar prefetch: checked before the loop."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("in_order", (0, 1, 2, 3), (0, 0, 1, 1)),
      ("permuted", (3, 0, 2, 1), (1, 1, 0, 0)),
  )
  def test_blocks_follow_scalar_prefetch(self, ins, outs):
    call = self.variant(_prefetch_call(16, (4,), FI()))
    want = _pipeline_reference(X, ins, outs, 16)
    np.testing.assert_array_equal(call(_i32(*ins, *outs), X), want)

  @chex.variants(with_jit=True, without_jit=True)
  def test_revisit_raises_at_run_time(self):
    call = self.variant(_prefetch_call(16, (3,), FI()))
    with self.assertRaisesRegex(Exception,
                                REVISIT + r": block \[0, 0\].*grid step 2\)"):
      jax.block_until_ready(call(_i32(0, 1, 2, 0, 1, 0), X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_block_index_out_of_bounds_raises_at_run_time(self):
    call = self.variant(_prefetch_call(16, (2,), FI()))
    with self.assertRaisesRegex(
        Exception, OOB + r": the index map of .* selects block \[4, 0\].*"
        r"grid step 1\)"):
      jax.block_until_ready(call(_i32(0, 4, 0, 1), X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_earliest_table_error_wins(self):
    # The input's block index is out of bounds at step 3; the output's
    # revisit (checked after the inputs' bounds) happens at step 2.
    call = self.variant(_prefetch_call(16, (4,), FI()))
    with self.assertRaisesRegex(
        Exception, REVISIT + r": block \[0, 0\].*grid step 2\)"):
      jax.block_until_ready(call(_i32(0, 1, 2, 9, 0, 1, 0, 1), X))
    # With the revisit gone, the out-of-bounds input at step 3 is reported.
    with self.assertRaisesRegex(
        Exception, OOB + r": the index map of .* selects block \[9, 0\].*"
        r"grid step 3\)"):
      jax.block_until_ready(call(_i32(0, 1, 2, 9, 0, 0, 1, 1), X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_map_smem_read_out_of_bounds(self):
    # The input index map reads s[2 * i + 1]: past the end at step 2.
    call = self.variant(_prefetch_call(
        24, (3,), FI(), in_map=lambda i, s: (s[2 * i + 1], 0),
        out_map=lambda i, s: (i, 0)))
    with self.assertRaisesRegex(
        Exception, OOB + r": load of scalar_prefetch\[0\] at index \[5\].*"
        r"grid step 2\)"):
      jax.block_until_ready(call(_i32(0, 1, 2, 3, 0), X))
    out = self.variant(_prefetch_call(
        24, (3,), FI.unchecked(), in_map=lambda i, s: (s[2 * i + 1], 0),
        out_map=lambda i, s: (i, 0)))(_i32(0, 1, 2, 3, 0), X)
    self.assertEqual(out.shape, (24, LANES))

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_map_smem_read_at_coordinate_out_of_bounds(self):
    # s[i] over a grid of 3 with s of 2 entries: past the end at step 2
    # (reads at a coordinate go unchecked only where s spans the grid).
    call = self.variant(_prefetch_call(
        24, (3,), FI(), in_map=lambda i, s: (s[i], 0),
        out_map=lambda i, s: (i, 0)))
    with self.assertRaisesRegex(
        Exception, OOB + r": load of scalar_prefetch\[0\] at index \[2\].*"
        r"grid step 2\)"):
      jax.block_until_ready(call(_i32(0, 1), X))
    np.testing.assert_array_equal(
        call(_i32(2, 0, 1), X),
        _pipeline_reference(X, (2, 0, 1), (0, 1, 2), 24))

  @chex.variants(with_jit=True, without_jit=True)
  def test_kernel_error_at_an_earlier_step_wins(self):
    # Step 0 loads out of bounds in the body; the index map fails at step 1.
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(s_ref[pl.program_id(0) + 2], 8), :]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(2,),
        in_specs=[pl.BlockSpec((16, LANES), lambda i, s: (s[i], 0))],
        out_specs=pl.BlockSpec((8, LANES), lambda i, s: (i, 0)))
    call = self.variant(pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
        grid_spec=grid_spec, interpret=FI()))
    with self.assertRaises(Exception) as cm:
      jax.block_until_ready(call(_i32(0, 7, 12, 0), X))
    self.assertRegex(str(cm.exception),
                     OOB + r": load of .* at index \[12, 0\].*grid step 0\)")
    out = call(_i32(0, 1, 3, 8), X)
    np.testing.assert_array_equal(
        out, jnp.concatenate([X[3:11], X[24:32]]))


def _two_output_call(steps, params):
  """One input and two outputs (2-D and 3-D blocks), all from prefetch.

  Step i reads input block s[i], and writes back output blocks
  (s[steps + i], 0) and (s[2 * steps + i], s[3 * steps + i], 0).
  """
  def kernel(s_ref, x_ref, o1_ref, o2_ref):
    del s_ref
    o1_ref[...] = x_ref[...] + 1.0
    o2_ref[...] = x_ref[...][None] + 2.0

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(steps,),
      in_specs=[pl.BlockSpec((8, LANES), lambda i, s: (s[i], 0))],
      out_specs=[
          pl.BlockSpec((8, LANES), lambda i, s: (s[steps + i], 0)),
          pl.BlockSpec((1, 8, LANES),
                       lambda i, s: (s[2 * steps + i], s[3 * steps + i], 0)),
      ])
  return pl.pallas_call(
      kernel, out_shape=[jax.ShapeDtypeStruct((16, LANES), jnp.float32),
                         jax.ShapeDtypeStruct((2, 16, LANES), jnp.float32)],
      grid_spec=grid_spec, interpret=params)


def _first_table_error(s, steps):
  """The error the schedule checks report, computed step by step."""
  blocks = [[(s[i], 0) for i in range(steps)],
            [(s[steps + i], 0) for i in range(steps)],
            [(s[2 * steps + i], s[3 * steps + i], 0) for i in range(steps)]]
  limits = [(4, 1), (2, 1), (2, 2, 1)]
  written = [set(), set()]
  for i in range(steps):
    # Bounds of every operand first, then revisits of every output.
    for b, lim in zip(blocks, limits, strict=True):
      if any(not 0 <= v < n for v, n in zip(b[i], lim, strict=True)):
        return OOB, b[i], i
    for k, (b, lim) in enumerate(zip(blocks[1:], limits[1:], strict=True)):
      if i + 1 < steps and b[i + 1] == b[i]:
        continue  # Not written back at this step.
      if b[i] in written[k]:
        return REVISIT, b[i], i
      written[k].add(b[i])
  return None


class RunTimeTableReportTest(chex.TestCase):
  """All checks of a run-time table: the earliest step's first check wins."""

  @chex.variants(with_jit=True)
  def test_reports_match_sequential_checks(self):
    steps = 4
    call = self.variant(_two_output_call(steps, FI()))
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(24):
      # In bounds, but for one index past its limit one time in three.
      limits = np.repeat([4, 2, 2, 2], steps)
      s = rng.integers(0, limits)
      if rng.integers(3) == 0:
        at = rng.integers(s.size)
        s[at] = limits[at]
      s = [int(v) for v in s]
      want = _first_table_error(s, steps)
      if want is None:
        outs = call(_i32(*s), X[:32])
        jax.block_until_ready(outs)
        seen.add(None)
        continue
      prefix, block, step = want
      seen.add(prefix)
      where = ", ".join(str(v) for v in block[:-1])
      with self.assertRaisesRegex(
          Exception, prefix + r".*block \[" + where + r", 0\].*"
          r"grid step " + str(step) + r"\)"):
        jax.block_until_ready(call(_i32(*s), X[:32]))
    # The draws cover every outcome.
    self.assertEqual(seen, {None, OOB, REVISIT})

  @chex.variants(with_jit=True)
  def test_element_output_not_revisit_checked_the_other_is(self):
    # Output 0 (an Element row offset s[i] * 8) is not revisit-checked;
    # output 1 (block s[3 + i]) is, in the same table.
    def kernel(s_ref, x_ref, o1_ref, o2_ref):
      del s_ref
      o1_ref[...] = x_ref[...] + 1.0
      o2_ref[...] = x_ref[...] + 2.0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(3,),
        in_specs=[pl.BlockSpec((8, LANES), lambda i, s: (i, 0))],
        out_specs=[
            pl.BlockSpec((pl.Element(8), LANES), lambda i, s: (s[i] * 8, 0)),
            pl.BlockSpec((8, LANES), lambda i, s: (s[3 + i], 0))])
    call = self.variant(pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((16, LANES), jnp.float32)] * 2,
        grid_spec=grid_spec, interpret=FI()))
    out1, out2 = call(_i32(0, 1, 0, 0, 1, 1), X)
    np.testing.assert_array_equal(
        out1, _pipeline_reference(X, (0, 1, 2), (0, 1, 0), 16))
    np.testing.assert_array_equal(
        out2, _pipeline_reference(X, (0, 1, 2), (0, 1, 1), 16) + 1.0)
    with self.assertRaisesRegex(
        Exception, REVISIT + r": block \[0, 0\] of outputs\[1\].*"
        r"grid step 2\)"):
      jax.block_until_ready(call(_i32(0, 1, 1, 0, 1, 0), X))


class NumpyIndexMapTest(parameterized.TestCase):
  """Ref-free index maps are tabulated with NumPy; they must agree with JAX."""

  @parameterized.named_parameters(
      ("floor_div_and_mod", lambda i, j: (i // 3, j % 4)),
      ("negative_operands", lambda i, j: ((i - 7) // 2, (j - 5) % 3)),
      ("lax_div_rem", lambda i, j: (jax.lax.div(i - 6, 4),
                                    jax.lax.rem(j - 6, 4))),
      ("where_min_max", lambda i, j: (jnp.where(i > j, i, j),
                                      jnp.minimum(jnp.maximum(i - 2, 0), 5))),
      ("clip_and_constant", lambda i, j: (jnp.clip(i * 3 - j, 0, 9), 2)),
      ("bool_logic", lambda i, j: (((i > 2) & (j < 3)).astype(jnp.int32),
                                   (~(i == j)).astype(jnp.int32))),
  )
  def test_matches_jax(self, index_map):
    from fast_interpret import schedule  # pylint: disable=g-import-not-at-top
    i, j = np.meshgrid(np.arange(-4, 12, dtype=np.int32),
                       np.arange(-4, 12, dtype=np.int32), indexing="ij")
    i, j = i.ravel(), j.ravel()
    closed = jax.make_jaxpr(index_map)(jnp.int32(0), jnp.int32(0))
    got = grid_tables.numpy_eval(closed.jaxpr, closed.consts, [i, j])
    want = jax.vmap(index_map)(jnp.asarray(i), jnp.asarray(j))
    for g, w in zip(got, want, strict=True):
      np.testing.assert_array_equal(np.broadcast_to(g, i.shape), w)

  def test_float_index_map_falls_back_to_jax(self):
    from fast_interpret import schedule  # pylint: disable=g-import-not-at-top
    closed = jax.make_jaxpr(
        lambda i: ((i * 0.5).astype(jnp.int32),))(jnp.int32(0))
    with self.assertRaises(grid_tables.NotNumpy):
      grid_tables.numpy_eval(closed.jaxpr, closed.consts,
                             [np.arange(4, dtype=np.int32)])
    # The kernel still runs (the JAX path tabulates it).
    call = _static_call(lambda i: ((i * 0.5).astype(jnp.int32), 0),
                        lambda i: ((i * 0.5).astype(jnp.int32), 0), (4,),
                        FI())
    want = _pipeline_reference(X[:16], [0, 0, 1, 1], [0, 0, 1, 1], 16)
    np.testing.assert_array_equal(call(X[:16]), want)


class StepwiseTest(chex.TestCase):
  """Schedules that cannot be tabulated: index maps run inside the loop."""

  def _dynamic_grid(self, out_map, params):
    def run(n, x):
      return pl.pallas_call(
          _copy_kernel,
          out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
          grid=(n,), in_specs=[pl.BlockSpec((8, LANES), lambda i: (i % 4, 0))],
          out_specs=pl.BlockSpec((8, LANES), out_map), interpret=params)(x)
    return jax.jit(run)

  def test_dynamic_grid_matches_reference(self):
    out = self._dynamic_grid(lambda i: (i // 2, 0), FI())(jnp.int32(4), X)
    want = _pipeline_reference(X, [0, 1, 2, 3], [0, 0, 1, 1], 16)
    np.testing.assert_array_equal(out, want)

  def test_dynamic_grid_revisit_raises(self):
    with self.assertRaisesRegex(Exception,
                                REVISIT + r": block \[0, 0\].*grid step 2\)"):
      jax.block_until_ready(
          self._dynamic_grid(lambda i: (i % 2, 0), FI())(jnp.int32(3), X))

  def test_dynamic_grid_block_index_out_of_bounds_raises(self):
    with self.assertRaisesRegex(
        Exception, OOB + r": the index map of .* selects block \[2, 0\].*"
        r"grid step 2\)"):
      jax.block_until_ready(
          self._dynamic_grid(lambda i: (i, 0), FI())(jnp.int32(3), X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_index_map_reading_smem_the_kernel_writes(self):
    # The kernel rewrites s[1] at step 0; the output index map of step 1
    # must see the new value, as on a TPU (scalar prefetch lives in SMEM).
    def kernel(s_ref, x_ref, o_ref):
      @pl.when(pl.program_id(0) == 0)
      def _():
        s_ref[1] = 3
      o_ref[...] = x_ref[...] + 1.0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(2,),
        in_specs=[pl.BlockSpec((8, LANES), lambda i, s: (i, 0))],
        out_specs=pl.BlockSpec((8, LANES), lambda i, s: (s[i], 0)))
    call = self.variant(pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((32, LANES), jnp.float32),
        grid_spec=grid_spec, interpret=FI()))
    out = np.asarray(call(_i32(0, 1), X))
    want = _pipeline_reference(X, [0, 1], [0, 3], 32)
    np.testing.assert_array_equal(out[:8], want[:8])
    np.testing.assert_array_equal(out[24:], want[24:])


def _first_pipeline_error(blocks, probes, per_core):
  """The error a TPU pipeline walk meets first: (kind, step, block) or None.

  Each step reads ``blocks[probes[step]]`` in the input's index map (an
  SMEM read out of bounds when the probe is), then writes its output block
  back when the next step of its core maps another block or when it is the
  core's last step; a block written back a second time is a revisit.
  Steps run in order (the cores one after another), and within a step the
  index-map read comes first.
  """
  written = set()
  for step, block in enumerate(blocks):
    if not 0 <= probes[step] < len(blocks):
      return ("smem", step, None)
    last = (step + 1) % per_core == 0 or step == len(blocks) - 1
    if last or blocks[step + 1] != block:
      if block in written:
        return ("revisit", step, block)
      written.add(block)
  return None


def _run_per_step(kernel, out_shape, grid_spec, num_cores, *args):
  """Runs a ("parallel", "arbitrary") kernel; its schedule must be per step."""
  call = pl.pallas_call(
      kernel, out_shape=out_shape, grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary")),
      interpret=FI(num_cores_or_threads=num_cores))
  with mock.patch.object(schedule.TableSchedule, "build",
                         side_effect=AssertionError("not per step")):
    return jax.block_until_ready(jax.jit(call)(*args))


class StepwiseRevisitTest(parameterized.TestCase):
  """Per-step revisit checks against a walk of the pipeline (above).

  The kernel writes its scalar-prefetch table, so the index maps that read
  it run inside the loop. A write-back is decided at the next step of the
  core, or at the core's last step; the revisit must still name the step
  that wrote the block back, and lose to an earlier step's error only.
  """

  def _run(self, blocks, probes, num_cores, signal_last=False):
    def kernel(b_ref, p_ref, x_ref, o_ref, *sem):
      p_ref[0] = p_ref[0]
      o_ref[...] = x_ref[...] + b_ref[0].astype(jnp.float32)
      if signal_last:
        # Left signalled: an error of the last step, checked after its
        # write-back.
        @pl.when((pl.program_id(0) == 1) & (pl.program_id(1) == 2))
        def _():
          pl.semaphore_signal(sem[0], 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(2, 3),
        scratch_shapes=[pltpu.SemaphoreType.REGULAR] if signal_last else [],
        # The input block is always 0, read through b[p[step]].
        in_specs=[pl.BlockSpec(
            (8, LANES), lambda i, j, b, p: (b[p[3 * i + j]] * 0, 0))],
        out_specs=pl.BlockSpec((8, LANES),
                               lambda i, j, b, p: (b[3 * i + j], 0)))
    return _run_per_step(
        kernel, jax.ShapeDtypeStruct((32, LANES), jnp.float32), grid_spec,
        num_cores, _i32(*blocks), _i32(*probes), X)

  @parameterized.parameters(
      # One core: the last step's write-back is checked after the loop.
      ([0, 0, 1, 1, 2, 0], 1, None),
      ([0, 1, 1, 0, 2, 3], 1, None),
      ([0, 0, 1, 1, 2, 2], 1, None),
      # The revisit at step 2 is decided at step 3, whose index map reads
      # out of bounds: the earlier step still wins; at the same step or
      # before, the read does.
      ([0, 1, 0, 2, 2, 3], 1, 3),
      ([0, 1, 0, 2, 2, 3], 1, 2),
      ([0, 1, 0, 2, 2, 3], 1, 1),
      # Two cores of three steps: each core writes its block back at its
      # own last step (2 and 5).
      ([0, 0, 0, 0, 1, 1], 2, None),
      ([0, 1, 0, 1, 2, 3], 2, None),
      ([0, 1, 2, 2, 3, 3], 2, None),
      ([0, 1, 1, 2, 3, 1], 2, None),
      ([0, 1, 1, 2, 3, 3], 2, None),
      ([0, 1, 0, 0, 1, 3], 2, 4),
  )
  def test_matches_pipeline_walk(self, blocks, num_cores, bad_probe):
    probes = [5] * 6
    if bad_probe is not None:
      probes[bad_probe] = 6
    want = _first_pipeline_error(blocks, probes, 6 // num_cores)
    if want is None:
      out = self._run(blocks, probes, num_cores)
      self.assertEqual(out.shape, (32, LANES))
      return
    kind, step, block = want
    pattern = (REVISIT + rf": block \[{block}, 0\]" if kind == "revisit"
               else OOB) + rf".*grid step {step}\)"
    with self.assertRaisesRegex(Exception, pattern):
      self._run(blocks, probes, num_cores)


  @parameterized.parameters((1,), (2,))
  def test_last_step_revisit_wins_over_semaphore_left_signalled(
      self, num_cores):
    with self.assertRaisesRegex(
        Exception, REVISIT + r": block \[0, 0\].*grid step 5\)"):
      self._run([0, 0, 1, 2, 3, 0], [5] * 6, num_cores, signal_last=True)
    with self.assertRaisesRegex(
        Exception, r"fast_interpret: semaphore: .* is left at 1.*grid step 5\)"):
      self._run([0, 0, 1, 2, 3, 3], [5] * 6, num_cores, signal_last=True)

  def _run_two(self, blocks_a, blocks_b, num_cores):
    """Two outputs, each at the blocks its table names, one core or two."""
    def kernel(a_ref, b_ref, x_ref, o_ref, q_ref):
      a_ref[0] = a_ref[0]
      o_ref[...] = x_ref[...]
      q_ref[...] = x_ref[...] + 1.0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(2, 3),
        in_specs=[pl.BlockSpec((8, LANES), lambda i, j, a, b: (0, 0))],
        out_specs=[
            pl.BlockSpec((8, LANES), lambda i, j, a, b: (a[3 * i + j], 0)),
            pl.BlockSpec((8, LANES), lambda i, j, a, b: (b[3 * i + j], 0))])
    return _run_per_step(
        kernel, [jax.ShapeDtypeStruct((32, LANES), jnp.float32)] * 2,
        grid_spec, num_cores, _i32(*blocks_a), _i32(*blocks_b), X)

  @parameterized.parameters(
      # Each output's own walk decides; the earlier step wins, the first
      # output on a tie (its check comes first in the step).
      ([0, 0, 1, 1, 2, 0], [0, 1, 2, 3, 2, 1], 1),
      ([0, 1, 2, 3, 2, 1], [0, 0, 1, 1, 2, 0], 1),
      ([0, 1, 0, 2, 3, 3], [0, 1, 1, 0, 2, 3], 1),
      ([0, 1, 1, 0, 2, 3], [0, 1, 0, 2, 3, 3], 1),
      ([0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 2, 0], 1),
      ([0, 1, 2, 3, 3, 3], [3, 2, 1, 0, 0, 0], 1),
      ([0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 3, 3], 2),
      ([0, 1, 2, 2, 3, 3], [0, 1, 0, 3, 3, 3], 2),
  )
  def test_two_outputs_match_pipeline_walks(self, blocks_a, blocks_b,
                                            num_cores):
    probes = [5] * 6
    found = []
    for output, blocks in enumerate((blocks_a, blocks_b)):
      want = _first_pipeline_error(blocks, probes, 6 // num_cores)
      if want is not None:
        found.append((want[1], output, want[2]))
    if not found:
      out_a, out_b = self._run_two(blocks_a, blocks_b, num_cores)
      np.testing.assert_array_equal(out_b[:8], X[:8] + 1.0)
      return
    step, output, block = min(found)
    with self.assertRaisesRegex(
        Exception, REVISIT + rf": block \[{block}, 0\] of outputs\[{output}\]"
        rf".*grid step {step}\)"):
      self._run_two(blocks_a, blocks_b, num_cores)

  def _run_coordinate_map(self, num_steps, out_map):
    """An output at ``out_map`` of the step's coordinate, scheduled per step."""
    def kernel(b_ref, x_ref, o_ref):
      b_ref[0] = b_ref[0]
      o_ref[...] = x_ref[...] + 1.0

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((32, LANES), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(num_steps,),
            in_specs=[pl.BlockSpec((8, LANES), lambda i, b: (b[0] * 0, 0))],
            out_specs=pl.BlockSpec((8, LANES), out_map)),
        interpret=FI())
    with mock.patch.object(schedule.TableSchedule, "build",
                           side_effect=AssertionError("not per step")):
      return jax.block_until_ready(jax.jit(call)(_i32(0), X))

  def test_coordinate_block_index_in_bounds_needs_no_check(self):
    # The coordinate lies in [0, 4): its block index is proven in bounds.
    out = self._run_coordinate_map(4, lambda i, b: (i, 0))
    np.testing.assert_array_equal(out, jnp.tile(X[:8] + 1.0, (4, 1)))

  @parameterized.parameters(
      (lambda i, b: (i, 0), 4, r"\[4, 0\]"),
      (lambda i, b: (i + 1, 0), 3, r"\[4, 0\]"),
      (lambda i, b: (i - 1, 0), 0, r"\[-1, 0\]"))
  def test_coordinate_block_index_out_of_bounds_raises(self, out_map, step,
                                                       block):
    # Six steps over four blocks: a coordinate's range does not fit.
    with self.assertRaisesRegex(
        Exception, OOB + rf": the index map of .* selects block {block}.*"
        rf"grid step {step}\)"):
      self._run_coordinate_map(6, out_map)


if __name__ == "__main__":
  absltest.main()
