"""Tests of ranges.py: index ranges known while tracing, and the bounds
checks they drop.

The ranges inferred for each primitive are checked against brute force:
every combination of operand values in their ranges, evaluated by JAX,
must land in the inferred range. End to end, a kernel whose DMA slices are
provably in bounds (a ``pl.loop`` index, ``i % 2``, a start guarded by
``pl.when``) lowers to a program with no host callback, and the same kernel
with the loop or the guard off by one still reports the out-of-bounds DMA.

Run:  python -m pytest tests/ranges_test.py -q
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret
from fast_interpret import interpreter
from fast_interpret import ranges
from fast_interpret.state import KernelState

FI = fast_interpret.FastInterpretParams
ANY = pl.BlockSpec(memory_space=pl.ANY)
LANES = 128

# Functions of two int32 scalars whose range the evaluator infers.
_INFERRED = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "neg": lambda a, b: -a,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "clamp_static": lambda a, b: lax.clamp(-2, a, 3),
    "clamp_dynamic": lambda a, b: lax.clamp(a, b, 4),
    "rem_static": lambda a, b: lax.rem(a, 3),
    "rem_dynamic": lambda a, b: lax.rem(a, b),
    "div_static": lambda a, b: lax.div(a, 3),
    "div_dynamic": lambda a, b: lax.div(a, b),
    "python_mod": lambda a, b: a % 2,
    "where": lambda a, b: jnp.where(a < b, a, b + 1),
    "lt": lambda a, b: (a < b).astype(jnp.int32),
    "le": lambda a, b: (a <= b).astype(jnp.int32),
    "gt": lambda a, b: (a > 1).astype(jnp.int32),
    "ge": lambda a, b: (a >= b).astype(jnp.int32),
    "eq": lambda a, b: (a == b).astype(jnp.int32),
    "ne": lambda a, b: (a != 2).astype(jnp.int32),
    "and_bool": lambda a, b: ((a < b) & (b < 3)).astype(jnp.int32),
    "or_bool": lambda a, b: ((a < 0) | (b > 3)).astype(jnp.int32),
    "not_bool": lambda a, b: (~(a < b)).astype(jnp.int32),
    "and_mask": lambda a, b: a & 3,
    "to_int8": lambda a, b: a.astype(jnp.int8).astype(jnp.int32),
    "multiple_of": lambda a, b: pl.multiple_of(a * 8, 8),
}

# Operand ranges: (a's, b's); b stays positive (divisors).
_OPERANDS = {
    "mixed_signs": ((-5, 6), (1, 4)),
    "non_negative": ((0, 9), (2, 2)),
    "negative": ((-7, -1), (3, 5)),
}


def _evaluate(fn, operand_ranges):
  """(the range ``ranges.infer`` gives ``fn``'s output, the output dtype).

  ``fn``'s jaxpr is evaluated by the interpreter on traced scalars whose
  ranges are ``operand_ranges`` (None: unknown).
  """
  found = {}

  def traced(*xs):
    scope = ranges.Ranges()
    for x, r in zip(xs, operand_ranges, strict=True):
      if r is not None:
        scope.set(x, *r)
    closed = jax.make_jaxpr(fn)(*xs)
    ctx = interpreter.RuleContext(params=None, kernel_name="t",
                                  buffer_ids=None, ranges=scope)
    _, (out,) = interpreter.eval_jaxpr(ctx, KernelState({}), closed.jaxpr,
                                       closed.consts, xs)
    found["range"] = scope.get(out)
    return out

  jax.make_jaxpr(traced)(*[jnp.int32(0)] * len(operand_ranges))
  return found["range"]


def _brute_force(fn, operand_ranges):
  """Every value ``fn`` takes with its operands in ``operand_ranges``."""
  grids = [np.arange(lo, hi + 1, dtype=np.int32) for lo, hi in operand_ranges]
  jitted = jax.jit(fn)  # Not vmapped: multiple_of has no batching rule.
  return np.array([jitted(*c) for c in itertools.product(*grids)])


class InferTest(parameterized.TestCase):

  @parameterized.product(name=sorted(_INFERRED), operands=sorted(_OPERANDS))
  def test_range_holds_every_value(self, name, operands):
    fn, operand_ranges = _INFERRED[name], _OPERANDS[operands]
    found = _evaluate(fn, operand_ranges)
    self.assertIsNotNone(found, "no range inferred")
    values = _brute_force(fn, operand_ranges)
    self.assertLessEqual(found[0], values.min())
    self.assertGreaterEqual(found[1], values.max())

  def test_static_comparison_picks_its_select_case(self):
    # jnp's % is a select between rem and rem + 2 on the sign of rem; with a
    # non-negative dividend only the first case is possible.
    self.assertEqual(_evaluate(lambda a, b: a % 2, [(0, 9), (0, 0)]), (0, 1))

  @parameterized.named_parameters(
      ("mul", lambda a, b: a * b, [(0, 2**20), (0, 2**12)]),
      ("add", lambda a, b: a + b, [(2**31 - 2, 2**31 - 1), (0, 5)]),
      ("neg", lambda a, b: -a, [(-2**31, 0), (0, 0)]),
      ("to_int8", lambda a, b: a.astype(jnp.int8), [(0, 200), (0, 0)]),
  )
  def test_no_range_where_it_could_wrap(self, fn, operand_ranges):
    self.assertIsNone(_evaluate(fn, operand_ranges))

  def test_unknown_operand_gives_no_range(self):
    self.assertIsNone(_evaluate(lambda a, b: a + b, [(0, 3), None]))

  def test_divisor_that_may_be_zero_gives_no_range(self):
    self.assertIsNone(_evaluate(lambda a, b: lax.rem(a, b), [(0, 9), (0, 3)]))
    self.assertIsNone(_evaluate(lambda a, b: lax.div(a, b), [(0, 9), (-1, 3)]))


class RefineTest(parameterized.TestCase):
  """Entering a branch narrows the index and what it was computed from."""

  def _refined(self, guard, k, counter=(0, 63)):
    """The counter's range in branch ``k`` of a cond on ``guard(counter)``."""
    found = {}

    def traced(i):
      scope = ranges.Ranges()
      scope.set(i, *counter)
      closed = jax.make_jaxpr(lambda i: guard(i).astype(jnp.int32))(i)
      ctx = interpreter.RuleContext(params=None, kernel_name="t",
                                    buffer_ids=None, ranges=scope)
      _, (index,) = interpreter.eval_jaxpr(ctx, KernelState({}),
                                           closed.jaxpr, closed.consts, [i])
      branch = scope.child()
      ranges.branch_taken(branch, index, k, 2)
      found["branch"], found["outside"] = branch.get(i), scope.get(i)
      return index

    jax.make_jaxpr(traced)(jnp.int32(0))
    self.assertEqual(found["outside"], counter)  # The branch's own scope.
    return found["branch"]

  @parameterized.named_parameters(
      ("lt_true", lambda i: i + 1 < 64, 1, (0, 62)),
      ("lt_false", lambda i: i + 1 < 64, 0, (63, 63)),
      ("ge_true", lambda i: i >= 2, 1, (2, 63)),
      ("ge_false", lambda i: i >= 2, 0, (0, 1)),
      ("sub_le", lambda i: i - 3 <= 4, 1, (0, 7)),
      ("not", lambda i: ~(i > 10), 1, (0, 10)),
      ("and_true", lambda i: (i > 4) & (i < 9), 1, (5, 8)),
      ("and_false_says_nothing", lambda i: (i > 4) & (i < 9), 0, (0, 63)),
      ("eq", lambda i: i == 7, 1, (7, 7)),
  )
  def test_branch_narrows_counter(self, guard, k, expected):
    self.assertEqual(self._refined(guard, k), expected)


# ---------------------------------------------------------------------------
# End to end: DMA chunks indexed by a pl.loop counter.

_CHUNKS, _ROWS = 4, 8


def _build_chunk_copy(params, steps, guard):
  """Copies chunk ``i + 1`` of x (under ``pl.when(guard(i))``) to chunk
  ``i`` of the output, through slot ``i % 2`` of a VMEM buffer, for ``i`` in
  ``range(steps)``; chunk 0 is copied unguarded."""

  def kernel(x_hbm, o_hbm, buf, sems):
    def chunk(i):
      return pl.ds(pl.multiple_of(i * _ROWS, _ROWS), _ROWS)

    def through(src, dst, slot):
      cin = pltpu.make_async_copy(src, buf.at[slot], sems.at[0])
      cin.start()
      cin.wait()
      cout = pltpu.make_async_copy(buf.at[slot], dst, sems.at[1])
      cout.start()
      cout.wait()

    through(x_hbm.at[chunk(0)], o_hbm.at[chunk(_CHUNKS - 1)], 0)

    @pl.loop(0, steps)
    def _(i):
      @pl.when(guard(i))
      def _():
        through(x_hbm.at[chunk(i + 1)], o_hbm.at[chunk(i)], i % 2)

  shape = (_CHUNKS * _ROWS, LANES)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      in_specs=[ANY], out_specs=ANY,
      scratch_shapes=[pltpu.VMEM((2, _ROWS, LANES), jnp.float32),
                      pltpu.SemaphoreType.DMA((2,))],
      interpret=params)


def _x():
  return jnp.arange(_CHUNKS * _ROWS * LANES, dtype=jnp.float32).reshape(
      _CHUNKS * _ROWS, LANES)


def _reference(x):
  return jnp.roll(x, -_ROWS, axis=0)


# Only bounds checks: any check left in the program is a bounds check.
def _bounds_only():
  return FI.unchecked(out_of_bounds_reads="raise")


class DroppedChecksTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("guarded", _CHUNKS, lambda i: i + 1 < _CHUNKS),
      ("short_loop", _CHUNKS - 1, lambda i: i >= 0),
  )
  def test_in_range_kernel_has_no_check_left(self, steps, guard):
    fn = jax.jit(_build_chunk_copy(_bounds_only(), steps, guard))
    self.assertNotIn("callback", fn.lower(_x()).as_text())
    np.testing.assert_array_equal(fn(_x()), _reference(_x()))

  @parameterized.named_parameters(
      ("guard_off_by_one", _CHUNKS, lambda i: i + 1 <= _CHUNKS),
      ("loop_off_by_one", _CHUNKS, lambda i: i >= 0),
  )
  def test_out_of_range_kernel_still_raises(self, steps, guard):
    fn = jax.jit(_build_chunk_copy(_bounds_only(), steps, guard))
    self.assertIn("callback", fn.lower(_x()).as_text())
    # Raised in a host callback: JAX wraps the KernelCheckError.
    with self.assertRaisesRegex(
        Exception,
        r"fast_interpret: out of bounds: DMA source of .* at index "
        rf"\[{_CHUNKS * _ROWS}, 0\] .*grid step 0\)"):
      jax.block_until_ready(fn(_x()))

  def test_every_check_on_matches_reference(self):
    fn = jax.jit(_build_chunk_copy(FI(), _CHUNKS,
                                   lambda i: i + 1 < _CHUNKS))
    np.testing.assert_array_equal(fn(_x()), _reference(_x()))


def _build_program_id_rows(params, shift):
  """Output block i: rows ``8 * i + shift`` on of all of x, in VMEM."""

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[pl.ds(pl.program_id(0) * _ROWS + shift, _ROWS), :]

  shape = (_CHUNKS * _ROWS, LANES)
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
      grid=(_CHUNKS,), in_specs=[pl.BlockSpec(shape, lambda i: (0, 0))],
      out_specs=pl.BlockSpec((_ROWS, LANES), lambda i: (i, 0)),
      interpret=params)


class ProgramIdTest(parameterized.TestCase):
  """A program id lies in [0, grid size)."""

  def test_in_range_load_has_no_check_left(self):
    fn = jax.jit(_build_program_id_rows(_bounds_only(), 0))
    self.assertNotIn("callback", fn.lower(_x()).as_text())
    np.testing.assert_array_equal(fn(_x()), _x())

  def test_out_of_range_load_still_raises(self):
    fn = jax.jit(_build_program_id_rows(_bounds_only(), 1))
    with self.assertRaisesRegex(
        Exception, r"fast_interpret: out of bounds: load of .* at index "
        rf"\[{(_CHUNKS - 1) * _ROWS + 1}, 0\] .*grid step {_CHUNKS - 1}\)"):
      jax.block_until_ready(fn(_x()))


if __name__ == "__main__":
  absltest.main()
