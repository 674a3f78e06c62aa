"""Tests of the runtime checks of fast_interpret (the fidelity features).

For every check there is a kernel with the bug, which must raise with the
check's message prefix; the same kernel fixed (usually the same kernel with
good scalar-prefetch values), which must pass and match a ``jnp`` reference;
and the same buggy kernel with the check switched off (``unchecked()`` or the
single field off), which must run without raising.

Checks covered:
  * dynamic ``pl.ds`` ref indexing out of bounds (load and store), with the
    start read from scalar prefetch or an SMEM operand;
  * block index maps selecting a block outside the array (input and output);
  * DMA source and destination slices out of bounds;
  * static out-of-bounds indices, found while tracing (``KernelCheckError``);
  * semaphore waits asking for more than was signalled (must raise, never
    hang);
  * DMA and REGULAR semaphores left non-zero when the kernel ends;
  * DMA waits whose size differs from the started copy (both directions);
  * the uninitialised-memory fill (``nan``/int max versus ``zero``);
  * errors leave no global state behind;
  * the first error (earliest grid step) wins;
  * the lowered program holds a host callback only when checks are on.

Run:  python -m pytest tests/checks_test.py -q
"""

import dataclasses
import os
from typing import Any, Callable
import unittest
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import chex
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret
from fast_interpret import checks
from fast_interpret import dma_rules
from fast_interpret import views
from fast_interpret.state import KernelState

FI = fast_interpret.FastInterpretParams
VMEM = pl.BlockSpec(memory_space=pltpu.VMEM)
SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)
ANY = pl.BlockSpec(memory_space=pl.ANY)
DMA = pltpu.SemaphoreType.DMA
REGULAR = pltpu.SemaphoreType.REGULAR

OOB = r"fast_interpret: out of bounds"
SEM = r"fast_interpret: semaphore"

ROWS, LANES = 16, 128
X = jnp.arange(ROWS * LANES, dtype=jnp.float32).reshape(ROWS, LANES)


_ENV = mock.patch.dict(os.environ)
_FLAGS = flagsaver.flagsaver()


def setUpModule():
  # Each test picks the interpret mode of its calls; a session-wide override
  # (pytest --fast-interpret) would replace it.
  from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
  if jax_config.pallas_tpu_interpret_mode_context_manager.get_global() is not None:
    raise unittest.SkipTest("a global Pallas interpret mode is set")
  # FastInterpretParams() here means the built-in defaults (every check on),
  # whatever fidelity flags or FAST_INTERPRET_* variables the run was given.
  _ENV.start()
  for key in [k for k in os.environ if k.startswith("FAST_INTERPRET_")]:
    del os.environ[key]
  _FLAGS.__enter__()
  for name in flags.FLAGS:
    if name.startswith("fast_interpret_"):
      flags.FLAGS[name].value = None
      flags.FLAGS[name].present = 0


def tearDownModule():
  _FLAGS.__exit__(None, None, None)
  _ENV.stop()


def _sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def _i32(*values):
  return jnp.asarray(values, jnp.int32)


def _rows_call(kernel, params, **kwargs):
  """``kernel(smem_ref, x_ref, o_ref)`` over a grid of 2 steps: all of a
  (16, 128) x each step, and output rows 8i:8i+8 at step i."""
  return pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
      grid=(2,),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec((16, LANES), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda i: (i, 0)),
      interpret=params, **kwargs)


# ---------------------------------------------------------------------------
# Buggy kernels. Each case builds `f(params) -> fn` where `fn` takes arrays
# only (so it can be jitted by chex variants), plus the arguments that trigger
# the bug, arguments that do not, and the reference for the good arguments.


@dataclasses.dataclass(frozen=True)
class Case:
  build: Callable[[Any, bool], Callable[..., Any]]  # (params, fixed) -> fn
  bad_args: tuple
  good_args: tuple
  reference: Callable[..., Any]  # of good_args
  error: str  # regex the error message must contain
  field_off: dict  # the single FastInterpretParams field that turns it off


# (a) Dynamic pl.ds starts out of bounds.


def _load_kernel(s_ref, x_ref, o_ref):
  o_ref[...] = x_ref[pl.ds(s_ref[0], 8), :]


def _build_load(params, fixed):
  del fixed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(1,),
      in_specs=[pl.BlockSpec((ROWS, LANES), lambda g, s: (0, 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda g, s: (0, 0)))
  return pl.pallas_call(_load_kernel, out_shape=_sds((8, LANES)),
                        grid_spec=grid_spec, interpret=params)


def _store_kernel(s_ref, x_ref, o_ref):
  # The start comes from an SMEM operand rather than scalar prefetch.
  o_ref[...] = jnp.zeros_like(o_ref)
  o_ref[pl.ds(s_ref[0], 8), :] = x_ref[...]


def _build_store(params, fixed):
  del fixed
  return pl.pallas_call(_store_kernel, out_shape=_sds((ROWS, LANES)),
                        in_specs=[SMEM, VMEM], out_specs=VMEM,
                        interpret=params)


# (b) Block index maps that read scalar prefetch.


def _copy_block_kernel(s_ref, x_ref, o_ref):
  del s_ref
  o_ref[...] = x_ref[...] + 1.0


def _build_block_in(params, fixed):
  del fixed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(2,),
      in_specs=[pl.BlockSpec((8, LANES), lambda g, s: (s[g], 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda g, s: (g, 0)))
  return pl.pallas_call(_copy_block_kernel, out_shape=_sds((ROWS, LANES)),
                        grid_spec=grid_spec, interpret=params)


def _build_block_out(params, fixed):
  del fixed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(2,),
      in_specs=[pl.BlockSpec((8, LANES), lambda g, s: (g, 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda g, s: (s[g], 0)))
  return pl.pallas_call(_copy_block_kernel, out_shape=_sds((ROWS, LANES)),
                        grid_spec=grid_spec, interpret=params)


# (c) DMA slices with a dynamic start out of bounds.


def _dma_src_kernel(s_ref, x_hbm, o_ref, buf, sem):
  copy = pltpu.make_async_copy(x_hbm.at[pl.ds(s_ref[0], 8)], buf, sem)
  copy.start()
  copy.wait()
  o_ref[...] = buf[...]


def _build_dma_src(params, fixed):
  del fixed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, in_specs=[ANY], out_specs=VMEM,
      scratch_shapes=[pltpu.VMEM((8, LANES), jnp.float32), DMA(())])
  return pl.pallas_call(_dma_src_kernel, out_shape=_sds((8, LANES)),
                        grid_spec=grid_spec, interpret=params)


def _dma_dst_kernel(s_ref, x_hbm, o_ref, buf, sem):
  buf[...] = jnp.zeros_like(buf)
  copy = pltpu.make_async_copy(x_hbm, buf.at[pl.ds(s_ref[0], 8)], sem)
  copy.start()
  copy.wait()
  o_ref[...] = buf[...]


def _build_dma_dst(params, fixed):
  del fixed
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, in_specs=[ANY], out_specs=VMEM,
      scratch_shapes=[pltpu.VMEM((ROWS, LANES), jnp.float32), DMA(())])
  return pl.pallas_call(_dma_dst_kernel, out_shape=_sds((ROWS, LANES)),
                        grid_spec=grid_spec, interpret=params)


# (e) A REGULAR semaphore wait asking for more than was signalled.


def _sem_wait_kernel(n_ref, x_ref, o_ref, sem):
  pl.semaphore_signal(sem, 1)
  pl.semaphore_wait(sem, n_ref[0])
  o_ref[...] = x_ref[...] * 2.0


def _build_sem_wait(params, fixed):
  del fixed
  return pl.pallas_call(_sem_wait_kernel, out_shape=_sds((ROWS, LANES)),
                        in_specs=[SMEM, VMEM], out_specs=VMEM,
                        scratch_shapes=[REGULAR(())], interpret=params)


# (f) Semaphores left non-zero when the kernel ends.


def _build_dma_sem_left(params, fixed):
  def kernel(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    if fixed:
      copy.wait()
    o_ref[...] = buf[...] - 1.0

  return pl.pallas_call(kernel, out_shape=_sds((ROWS, LANES)),
                        in_specs=[ANY], out_specs=VMEM,
                        scratch_shapes=[pltpu.VMEM((ROWS, LANES), jnp.float32),
                                        DMA(())], interpret=params)


def _build_regular_sem_left(params, fixed):
  def kernel(x_ref, o_ref, sem):
    pl.semaphore_signal(sem, 3)
    if fixed:
      pl.semaphore_wait(sem, 3)
    o_ref[...] = x_ref[...] + 2.0

  return pl.pallas_call(kernel, out_shape=_sds((ROWS, LANES)),
                        in_specs=[VMEM], out_specs=VMEM,
                        scratch_shapes=[REGULAR(())], interpret=params)


# (g) A DMA wait whose descriptor names a different size than the started
# copy (on the same semaphore).


def _dma_size_builder(start_rows, wait_rows):
  def build(params, fixed):
    waited = start_rows if fixed else wait_rows

    def kernel(x_hbm, o_ref, buf, sem):
      buf[...] = jnp.zeros_like(buf)
      pltpu.make_async_copy(x_hbm.at[pl.ds(0, start_rows)],
                            buf.at[pl.ds(0, start_rows)], sem).start()
      pltpu.make_async_copy(x_hbm.at[pl.ds(0, waited)],
                            buf.at[pl.ds(0, waited)], sem).wait()
      o_ref[...] = buf[...]

    return pl.pallas_call(kernel, out_shape=_sds((ROWS, LANES)),
                          in_specs=[ANY], out_specs=VMEM,
                          scratch_shapes=[pltpu.VMEM((ROWS, LANES),
                                                     jnp.float32), DMA(())],
                          interpret=params)

  return build


def _ref_dma_rows(rows):
  return lambda x: jnp.zeros_like(x).at[:rows].set(x[:rows])


BOUNDS_OFF = dict(out_of_bounds_reads="uninitialized")
SEMAPHORES_OFF = dict(check_semaphores=False)

CASES = {
    # (a)
    "dynamic_load_start": Case(
        _build_load, (_i32(9), X), (_i32(8), X), lambda s, x: x[8:16],
        OOB + r": load of .* at index \[9, 0\]", BOUNDS_OFF),
    "dynamic_load_negative_start": Case(
        _build_load, (_i32(-1), X), (_i32(0), X), lambda s, x: x[0:8],
        OOB + r": load of .* at index \[-1, 0\]", BOUNDS_OFF),
    "dynamic_store_start": Case(
        _build_store, (_i32(12), X[:8]), (_i32(5), X[:8]),
        lambda s, x: jnp.zeros((ROWS, LANES)).at[5:13].set(x),
        OOB + r": store of .* at index \[12, 0\]", BOUNDS_OFF),
    # (b)
    "input_block_index": Case(
        _build_block_in, (_i32(0, 2), X), (_i32(1, 0), X),
        lambda s, x: jnp.concatenate([x[8:], x[:8]]) + 1.0,
        OOB + r": the index map of .* selects block \[2, 0\].*grid step 1",
        BOUNDS_OFF),
    "output_block_index": Case(
        _build_block_out, (_i32(0, 2), X), (_i32(1, 0), X),
        lambda s, x: jnp.concatenate([x[8:], x[:8]]) + 1.0,
        OOB + r": the index map of .* selects block \[2, 0\].*grid step 1",
        BOUNDS_OFF),
    # (c)
    "dma_source_slice": Case(
        _build_dma_src, (_i32(9), X), (_i32(8), X), lambda s, x: x[8:],
        OOB + r": DMA source of .* at index \[9, 0\]", BOUNDS_OFF),
    "dma_destination_slice": Case(
        _build_dma_dst, (_i32(9), X[:8]), (_i32(8), X[:8]),
        lambda s, x: jnp.zeros((ROWS, LANES)).at[8:].set(x),
        OOB + r": DMA destination of .* at index \[9, 0\]", BOUNDS_OFF),
    # (e)
    "semaphore_wait_more_than_signalled": Case(
        _build_sem_wait, (_i32(2), X), (_i32(1), X), lambda n, x: x * 2.0,
        SEM + r": a semaphore wait on .* waits for more than was signalled",
        SEMAPHORES_OFF),
    # (f)
    "dma_semaphore_left_after_start_without_wait": Case(
        _build_dma_sem_left, (X,), (X,), lambda x: x - 1.0,
        SEM + r": .* is left at 8192 when the kernel ends", SEMAPHORES_OFF),
    "regular_semaphore_signalled_never_waited": Case(
        _build_regular_sem_left, (X,), (X,), lambda x: x + 2.0,
        SEM + r": .* is left at 3 when the kernel ends", SEMAPHORES_OFF),
    # (g)
    "dma_wait_smaller_than_copy": Case(
        _dma_size_builder(16, 8), (X,), (X,), _ref_dma_rows(16),
        SEM + r": .* is left at 4096 when the kernel ends", SEMAPHORES_OFF),
    "dma_wait_larger_than_copy": Case(
        _dma_size_builder(8, 16), (X,), (X,), _ref_dma_rows(8),
        SEM + r": a DMA wait on .* waits for more than was signalled",
        SEMAPHORES_OFF),
}


def _named(*variants):
  """named_parameters over CASES, crossed with extra named variants."""
  if not variants:
    return [(name, name) for name in CASES]
  return [(f"{name}_{v}", name, v) for name in CASES for v in variants]


class ChecksTest(chex.TestCase):
  """Bug raises; fix passes and matches; check off runs."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_named())
  def test_bug_raises(self, case_name):
    case = CASES[case_name]
    fn = self.variant(case.build(FI(), False))
    with self.assertRaisesRegex(Exception, case.error) as cm:
      jax.block_until_ready(fn(*case.bad_args))
    message = str(cm.exception)
    self.assertRegex(message, r"\(kernel '\w+', grid step \d+\)")

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_named())
  def test_fixed_kernel_matches_reference(self, case_name):
    case = CASES[case_name]
    fn = self.variant(case.build(FI(), True))
    out = jax.block_until_ready(fn(*case.good_args))
    np.testing.assert_array_equal(out, case.reference(*case.good_args))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_named("unchecked", "field_off"))
  def test_check_off_runs(self, case_name, how):
    case = CASES[case_name]
    params = FI.unchecked() if how == "unchecked" else FI(**case.field_off)
    fn = self.variant(case.build(params, False))
    out = jax.block_until_ready(fn(*case.bad_args))
    self.assertEqual(out.shape, case.reference(*case.good_args).shape)

  def test_check_fields_off_only_their_check(self):
    # Turning bounds checks off keeps semaphore checks, and vice versa.
    case = CASES["semaphore_wait_more_than_signalled"]
    with self.assertRaisesRegex(Exception, case.error):
      jax.block_until_ready(case.build(FI(**BOUNDS_OFF), False)(
          *case.bad_args))
    case = CASES["dynamic_load_start"]
    with self.assertRaisesRegex(Exception, case.error):
      jax.block_until_ready(case.build(FI(**SEMAPHORES_OFF), False)(
          *case.bad_args))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("past_end", 9), ("far_past_end", 100),
                                  ("negative", -3))
  def test_unchecked_out_of_bounds_start_is_clamped(self, start):
    # Documented: with checks off an out-of-range dynamic start is clamped,
    # as lax.dynamic_slice does (negative starts wrap first) and as JAX's own
    # interpret=True mode does.
    fn = self.variant(_build_load(FI.unchecked(), False))
    expected = _build_load(True, False)(_i32(start), X)
    np.testing.assert_array_equal(fn(_i32(start), X), expected)
    np.testing.assert_array_equal(
        expected, jax.lax.dynamic_slice(X, (jnp.int32(start), 0), (8, LANES)))

  def test_message_names_operand_kernel_and_step(self):
    with self.assertRaises(Exception) as cm:
      jax.block_until_ready(_build_load(FI(), False)(_i32(9), X))
    message = str(cm.exception)
    self.assertIn("fast_interpret: out of bounds: load of", message)
    self.assertIn("(kernel '_load_kernel', grid step 0)", message)
    self.assertIn("shape (16, 128)", message)

  def test_semaphore_error_is_kernel_check_error_in_callback(self):
    # The host callback raises KernelCheckError; JAX wraps it, keeping text.
    with self.assertRaises(Exception) as cm:
      jax.block_until_ready(_build_sem_wait(FI(), False)(_i32(5), X))
    self.assertIn("KernelCheckError", str(cm.exception))
    self.assertIn("count would be -4", str(cm.exception))


# ---------------------------------------------------------------------------
# (d) Static out-of-bounds indices are found while tracing.


def _static_int_load_kernel(x_ref, o_ref):
  o_ref[...] = jnp.broadcast_to(x_ref[ROWS, :], o_ref.shape)


def _static_int_store_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[...]
  o_ref[ROWS + 3, :] = x_ref[0, :]


def _static_strided_load_kernel(x_ref, o_ref):
  o_ref[...] = x_ref[pl.ds(0, 8, stride=3), :]


def _static_fixed_kernel(x_ref, o_ref):
  o_ref[...] = jnp.broadcast_to(x_ref[ROWS - 1, :], o_ref.shape)


STATIC_CASES = (
    ("int_index_load", _static_int_load_kernel, (8, LANES)),
    ("int_index_store", _static_int_store_kernel, (ROWS, LANES)),
    ("strided_slice_load", _static_strided_load_kernel, (8, LANES)),
)


def _static_call(kernel, out_shape, params):
  return pl.pallas_call(kernel, out_shape=_sds(out_shape), in_specs=[VMEM],
                        out_specs=VMEM, interpret=params)


class StaticIndexTest(chex.TestCase):

  # A static out-of-bounds index raises KernelCheckError ("fast_interpret:
  # out of bounds: ... found while tracing") at trace time.
  def test_static_int_index_raises_kernel_check_error_while_tracing(self):
    fn = jax.jit(_static_call(_static_int_load_kernel, (8, LANES), FI()))
    with self.assertRaisesRegex(fast_interpret.KernelCheckError,
                                OOB + r".*found while tracing"):
      fn.lower(X)  # Tracing and lowering only: nothing runs.

  # The same for every static out-of-bounds index kind.
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STATIC_CASES)
  def test_static_out_of_bounds_raises_kernel_check_error(self, kernel,
                                                          out_shape):
    fn = self.variant(_static_call(kernel, out_shape, FI()))
    with self.assertRaisesRegex(fast_interpret.KernelCheckError, OOB):
      fn(X)

  # With checks off, a static out-of-bounds index is clamped like a dynamic
  # one (documented), so the kernel runs.
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*STATIC_CASES)
  def test_static_out_of_bounds_unchecked_runs(self, kernel, out_shape):
    fn = self.variant(_static_call(kernel, out_shape, FI.unchecked()))
    jax.block_until_ready(fn(X))

  def test_static_slice_out_of_bounds_is_caught_by_jax(self):
    # pl.ds with a static start is checked by JAX itself when indexing.
    def kernel(x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(12, 8), :]

    with self.assertRaisesRegex(ValueError, "Out of bound slice"):
      _static_call(kernel, (8, LANES), FI())(X)

  @chex.variants(with_jit=True, without_jit=True)
  def test_static_in_bounds_index_matches_reference(self):
    fn = self.variant(_static_call(_static_fixed_kernel, (8, LANES), FI()))
    np.testing.assert_array_equal(
        fn(X), jnp.broadcast_to(X[ROWS - 1], (8, LANES)))


# ---------------------------------------------------------------------------
# (h) Uninitialised memory.


def _write_second_block_only(o_ref):
  @pl.when(pl.program_id(0) == 1)
  def _():
    o_ref[...] = jnp.ones_like(o_ref)


class UninitializedMemoryTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("float32_nan", jnp.float32, "nan", np.nan),
      ("float32_zero", jnp.float32, "zero", 0.0),
      ("bfloat16_nan", jnp.bfloat16, "nan", np.nan),
      ("int32_nan", jnp.int32, "nan", np.iinfo(np.int32).max),
      ("int32_zero", jnp.int32, "zero", 0),
      ("int8_nan", jnp.int8, "nan", np.iinfo(np.int8).max),
  )
  def test_output_block_never_written(self, dtype, fill, expected):
    # Block 0 is never written (the kernel writes only at step 1, and block
    # 0's VMEM buffer is fresh at step 0).
    fn = self.variant(pl.pallas_call(
        _write_second_block_only, out_shape=_sds((ROWS, LANES), dtype),
        grid=(2,), out_specs=pl.BlockSpec((8, LANES), lambda i: (i, 0)),
        interpret=FI(uninitialized_memory=fill)))
    out = np.asarray(jnp.asarray(fn()).astype(
        jnp.float32 if dtype == jnp.bfloat16 else dtype))
    np.testing.assert_array_equal(out[:8], np.full((8, LANES), expected))
    np.testing.assert_array_equal(out[8:], np.ones((8, LANES)))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("nan", "nan"), ("zero", "zero"))
  def test_scratch_read_before_write(self, fill):
    def kernel(o_ref, scratch):
      scratch[0:4, :] = jnp.full((4, LANES), 7.0)
      o_ref[...] = scratch[...]

    fn = self.variant(pl.pallas_call(
        kernel, out_shape=_sds((8, LANES)), out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((8, LANES), jnp.float32)],
        interpret=FI(uninitialized_memory=fill)))
    out = np.asarray(fn())
    np.testing.assert_array_equal(out[:4], 7.0)
    np.testing.assert_array_equal(out[4:], np.nan if fill == "nan" else 0.0)

  def test_invalid_fill_raises(self):
    with self.assertRaises(ValueError):
      FI(uninitialized_memory="garbage")


# ---------------------------------------------------------------------------
# (i) No global state after errors, (j) the first error wins.


def _two_errors_kernel(a_ref, b_ref, x_ref, o_ref, scratch):
  # The load site comes first in the kernel but fails later (step 2); the
  # store fails first (step 1).
  g = pl.program_id(0)
  v = x_ref[pl.ds(a_ref[g], 8), :]
  scratch[pl.ds(b_ref[g], 8), :] = v
  o_ref[...] = v


def _build_two_errors(params):
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(3,),
      in_specs=[pl.BlockSpec((ROWS, LANES), lambda g, a, b: (0, 0))],
      out_specs=pl.BlockSpec((8, LANES), lambda g, a, b: (g, 0)),
      scratch_shapes=[pltpu.VMEM((ROWS, LANES), jnp.float32)])
  return pl.pallas_call(_two_errors_kernel, out_shape=_sds((24, LANES)),
                        grid_spec=grid_spec, interpret=params)


class ErrorReportingTest(chex.TestCase):

  @parameterized.named_parameters(
      ("no_table_error", False, True, 9),
      ("later_table_error", True, True, 9),
      ("only_branch_fails", True, False, 11))
  def test_load_before_a_branch_beats_one_inside_it(self, table_bad,
                                                     first_bad, index):
    # At step 1 a load fails before a pl.when and another inside it: the
    # first in program order is reported, even when the checks of the
    # whole grid (an index map reading a table, checked before the loop)
    # already found an error at the later step 3.
    def kernel(t_ref, s_ref, x_ref, o_ref):
      i = pl.program_id(0)
      a = s_ref[t_ref[i]]

      @pl.when(t_ref[4 + i] > 0)
      def _():
        o_ref[...] = x_ref[...] + s_ref[t_ref[8 + i]].astype(jnp.float32)

      o_ref[...] += a.astype(jnp.float32)

    t = np.zeros(16, np.int32)
    t[1], t[4:8], t[9] = (9 if first_bad else 0), 1, 11
    t[15] = 5 if table_bad else 0
    call = pl.pallas_call(
        kernel, out_shape=_sds((8, LANES)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(4,),
            in_specs=[SMEM, pl.BlockSpec((8, LANES),
                                         lambda i, t: (t[12 + i], 0))],
            out_specs=pl.BlockSpec((8, LANES), lambda i, t: (0, 0))),
        interpret=FI())
    with self.assertRaisesRegex(
        Exception, OOB + rf": load of args\[1\] at index \[{index}\].*grid "
        r"step 1\)"):
      jax.block_until_ready(call(jnp.asarray(t), jnp.arange(8, dtype=jnp.int32),
                                 jnp.zeros((32, LANES))))

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_state_left_after_error(self):
    load = self.variant(_build_load(FI(), False))
    with self.assertRaisesRegex(Exception, OOB):
      jax.block_until_ready(load(_i32(9), X))
    # The same (possibly cached) program, good arguments.
    np.testing.assert_array_equal(load(_i32(3), X), X[3:11])
    # It fails again when asked to (the error word starts clean each call).
    with self.assertRaisesRegex(Exception, r"index \[10, 0\]"):
      jax.block_until_ready(load(_i32(10), X))
    # Another kernel, and a semaphore error followed by a good run.
    sem = self.variant(_build_sem_wait(FI(), False))
    with self.assertRaisesRegex(Exception, SEM):
      jax.block_until_ready(sem(_i32(2), X))
    np.testing.assert_array_equal(sem(_i32(1), X), X * 2.0)
    np.testing.assert_array_equal(load(_i32(0), X), X[0:8])

  def test_no_state_left_across_fresh_kernels(self):
    with self.assertRaisesRegex(Exception, OOB):
      jax.block_until_ready(_build_dma_src(FI(), False)(_i32(9), X))
    out = _build_regular_sem_left(FI(), True)(X)
    np.testing.assert_array_equal(out, X + 2.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_earliest_grid_step_wins(self):
    fn = self.variant(_build_two_errors(FI()))
    with self.assertRaises(Exception) as cm:
      jax.block_until_ready(fn(_i32(0, 0, 20), _i32(0, 20, 0), X))
    message = str(cm.exception)
    self.assertRegex(message, OOB + r": store of .* at index \[20, 0\]")
    self.assertIn("grid step 1)", message)
    self.assertNotIn("grid step 2)", message)
    self.assertNotIn("load of", message)

  @chex.variants(with_jit=True, without_jit=True)
  def test_same_step_first_site_wins(self):
    fn = self.variant(_build_two_errors(FI()))
    with self.assertRaises(Exception) as cm:
      jax.block_until_ready(fn(_i32(0, 30, 0), _i32(0, 20, 0), X))
    message = str(cm.exception)
    self.assertRegex(message, OOB + r": load of .* at index \[30, 0\]")
    self.assertIn("grid step 1)", message)

  @chex.variants(with_jit=True, without_jit=True)
  def test_two_errors_kernel_fixed(self):
    fn = self.variant(_build_two_errors(FI()))
    out = fn(_i32(0, 4, 8), _i32(8, 0, 2), X)
    np.testing.assert_array_equal(
        out, jnp.concatenate([X[0:8], X[4:12], X[8:16]]))


# ---------------------------------------------------------------------------
# Folding check records into the error word (checks.flush), directly.

_BIG = 2**31 - 1


def _fresh(word=None):
  word = checks.initial_word() if word is None else jnp.asarray(word, jnp.int32)
  return KernelState({checks.ERROR_ID: word}), checks.Sites("k")


def _expected_word(values, limits, step, sites=None):
  """The word a sequential check-by-check reading gives (NumPy)."""
  for i, (v, (lo, hi)) in enumerate(zip(values, limits, strict=True)):
    if not lo <= int(v) <= hi:
      site = i if sites is None else sites[i]
      return np.array([site + 1, step, int(v), i, 0, 0, 0, 0], np.int32)
  return np.asarray(checks.initial_word())


class FoldTest(chex.TestCase):

  def _fold_ranges(self, limits, step=3):
    def fold(values):
      state, sites = _fresh()
      for i, (lo, hi) in enumerate(limits):
        state = checks.record_outside(
            state, sites, step, [(values[i], lo, hi)], f"site {i}: {{0}}",
            [values[i], i])
      self.assertLen(state.pending, len(limits))
      return checks.flush(state).read(checks.ERROR_ID)
    return fold

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("none_fails", [1, 2, 3, 4]),
      ("first_fails", [-1, 2, 3, 4]),
      ("last_fails", [1, 2, 3, 40]),
      ("two_fail_first_wins", [1, 20, 3, -4]))
  def test_many_records_one_word(self, values):
    limits = [(0, 7), (0, 15), (2, 3), (-5, 5)]
    fold = self.variant(self._fold_ranges(limits))
    np.testing.assert_array_equal(
        fold(jnp.asarray(values, jnp.int32)),
        _expected_word(values, limits, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_random_runs_match_sequential_checks(self):
    rng = np.random.default_rng(0)
    limits = [tuple(sorted(rng.integers(-20, 20, 2))) for _ in range(40)]
    fold = self.variant(self._fold_ranges(limits))
    for _ in range(5):
      values = rng.integers(-25, 25, 40).astype(np.int32)
      np.testing.assert_array_equal(fold(jnp.asarray(values)),
                                    _expected_word(values, limits, 3))

  def test_host_checks_fold_as_records_do(self):
    # A HostCheck's records, decoded in the callback, must land in the word
    # as the same records folded in the program would.
    rng = np.random.default_rng(1)

    @jax.jit
    def fold(word, steps, values, failed):
      state, sites = _fresh(word)
      for k in range(3):
        sites.add(f"site {k}")
        state = checks.add_records(state, [checks.Record(
            k, steps[k], (values[k],), failed[k])])
      return checks.flush(state).read(checks.ERROR_ID)

    for _ in range(40):
      word = np.asarray(checks.initial_word())
      if rng.random() < 0.6:
        word = np.array([rng.integers(1, 9), rng.integers(0, 6), 5, 0, 0, 0,
                         0, 0], np.int32)
      steps = rng.integers(0, 6, 3).astype(np.int32)
      values = rng.integers(-9, 9, 3).astype(np.int32)
      failed = rng.random(3) < 0.5
      records = [(k, steps[k], values[k], failed[k]) for k in range(3)]
      np.testing.assert_array_equal(
          checks._first_on_host(word.copy(), records),  # pylint: disable=protected-access
          fold(word, steps, values, failed))

  @chex.variants(with_jit=True, without_jit=True)
  def test_flush_keeps_earlier_step_recorded_before(self):
    def fold(values, word):
      state, sites = _fresh(word)
      state = checks.record_outside(state, sites, 5, [(values[0], 0, 3)],
                                    "a {0}", [values[0]])
      return checks.flush(state).read(checks.ERROR_ID)
    fold = self.variant(fold)
    earlier = np.array([7, 2, 1, 0, 0, 0, 0, 0], np.int32)
    same = np.array([7, 5, 1, 0, 0, 0, 0, 0], np.int32)
    later = np.array([7, 9, 1, 0, 0, 0, 0, 0], np.int32)
    bad = jnp.asarray([10], jnp.int32)
    np.testing.assert_array_equal(fold(bad, earlier), earlier)
    np.testing.assert_array_equal(fold(bad, same), same)
    np.testing.assert_array_equal(
        fold(bad, later), [1, 5, 10, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(fold(jnp.asarray([1], jnp.int32), later),
                                  later)

  def test_duplicates_folded_once_first_reported(self):
    def fold(v):
      state, sites = _fresh()
      for template in ("first {0}", "second {0}", "third {0}"):
        state = checks.record_outside(state, sites, 0, [(v, 0, 3)],
                                      template, [v])
      return checks.flush(state).read(checks.ERROR_ID)
    word = jax.jit(fold)(jnp.int32(9))
    np.testing.assert_array_equal(word, [1, 0, 9, 0, 0, 0, 0, 0])
    # One value compared (against lo and hi), not three.
    jaxpr = jax.make_jaxpr(fold)(jnp.int32(9))
    compares = [e for e in jaxpr.eqns if e.primitive.name in ("lt", "gt")]
    self.assertLen(compares, 2)

  def test_same_value_other_limits_or_gate_not_merged(self):
    def fold(v, gate):
      state, sites = _fresh()
      state = checks.record_outside(state, sites, 0, [(v, 0, 20)], "wide", [v])
      state = checks.add_records(state, [r.gated(gate) for r in
                                         checks.record_outside(
                                             _fresh()[0], sites, 0,
                                             [(v, 0, 3)], "gated", [v]
                                         ).pending])
      state = checks.record_outside(state, sites, 0, [(v, 0, 3)], "narrow",
                                    [v])
      return checks.flush(state).read(checks.ERROR_ID)
    fold = jax.jit(fold)
    # Sites: 0 wide, 1 gated, 2 narrow.
    self.assertEqual(int(fold(jnp.int32(9), True)[0]), 2)
    self.assertEqual(int(fold(jnp.int32(9), False)[0]), 3)
    self.assertEqual(int(fold(jnp.int32(30), False)[0]), 1)
    self.assertEqual(int(fold(jnp.int32(2), True)[0]), 0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("dim0", (9, 0), 0), ("dim1", (0, 200), 1), ("both", (-1, 200), 0),
      ("inside", (8, 0), None))
  def test_range_record_per_dimension(self, start, bad_dim):
    indexer = _jax_indexer((16, 256), start, (8, 128))

    def fold(i, j):
      state, sites = _fresh()
      report = []
      views._bounds((16, 256), indexer(i, j), report)
      [(ranges, starts, shape)] = report
      self.assertLen(ranges, 2)
      self.assertEqual(shape, (16, 256))
      state = checks.record_outside(state, sites, 1, ranges, "view {0} {1}",
                                    starts)
      return checks.flush(state).read(checks.ERROR_ID)

    word = self.variant(fold)(jnp.int32(start[0]), jnp.int32(start[1]))
    if bad_dim is None:
      np.testing.assert_array_equal(word, checks.initial_word())
    else:
      np.testing.assert_array_equal(word, [1, 1, *start, 0, 0, 0, 0])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("uint32_huge_fails_negative_lo", np.uint32, 3_000_000_000,
       (-2**31, 10), True),
      ("uint32_inside_negative_lo", np.uint32, 5, (-5, 10), False),
      ("uint8_max_inside", np.uint8, 255, (-1, 255), False),
      ("uint16_over", np.uint16, 300, (-1, 299), True),
      ("int8_negative", np.int8, -3, (0, 10), True),
      ("bool_true_fails_zero_range", np.bool_, True, (0, 0), True))
  def test_value_dtypes(self, dtype, value, limits, fails):
    def fold(v):
      state, sites = _fresh()
      state = checks.record_outside(state, sites, 0, [(v, *limits)], "x", [])
      return checks.flush(state).read(checks.ERROR_ID)[0]
    got = self.variant(fold)(jnp.asarray(value, dtype))
    self.assertEqual(int(got), 1 if fails else 0)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(("open", True), ("closed", False))
  def test_gated_record_fails_only_where_gate_holds(self, gate):
    def fold(v, g):
      state, sites = _fresh()
      state = checks.record_outside(state, sites, 0, [(v, 0, 3)], "x", [v])
      state = dataclasses.replace(
          state, pending=tuple(r.gated(g) for r in state.pending))
      return checks.flush(state).read(checks.ERROR_ID)[0]
    got = self.variant(fold)(jnp.int32(5), jnp.bool_(gate))
    self.assertEqual(int(got), 1 if gate else 0)

  @parameterized.named_parameters(
      ("first", 0, 2, r"scratch\[0\] is left at 2"),
      ("third_row_1", 3, 5, r"scratch\[2\] is left at 5"),
      ("none", None, 0, None))
  def test_semaphores_left_found_among_many(self, which, count, message):
    # Scratch: two single semaphores and one of shape (2,); ``which`` is the
    # flat position of the one left at ``count`` (position 3 is row 1 of the
    # third).
    def kernel(x_ref, o_ref, a, b, c):
      sems = [a, b, c.at[0], c.at[1]]
      for k, sem in enumerate(sems):
        pl.semaphore_signal(sem, 1)
        pl.semaphore_wait(sem, 1)
        if k == which:
          pl.semaphore_signal(sem, count)
      o_ref[...] = x_ref[...]

    call = pl.pallas_call(
        kernel, out_shape=_sds((ROWS, LANES)), in_specs=[VMEM],
        out_specs=VMEM, scratch_shapes=[REGULAR(()), REGULAR(()),
                                        REGULAR((2,))], interpret=FI())
    if message is None:
      np.testing.assert_array_equal(call(X), X)
      return
    with self.assertRaisesRegex(Exception, SEM + r": " + message +
                                " when the kernel ends"):
      jax.block_until_ready(call(X))

  @parameterized.named_parameters(
      ("left_2d", "left", (1, 2), r"scratch\[1\] is left at 7 when the kernel "
       "ends"),
      ("wait_2d", "wait", (0, 1), r"a semaphore wait on scratch\[1\] waits for "
       "more than was signalled"),
      ("wait_last", "wait", (1,), r"a semaphore wait on scratch\[2\] waits for "
       "more than was signalled"),
      ("none", None, None, None))
  def test_semaphore_arrays_of_any_shape_keep_their_names(self, what, at,
                                                          message):
    # Checked semaphores of one kernel share a buffer (grid.py); each array
    # still counts, and is named, on its own, at a dynamic index too.
    def kernel(x_ref, o_ref, a, b, c):
      i = pl.program_id(0)
      copy = pltpu.make_async_copy(x_ref, o_ref, a)
      copy.start()
      copy.wait()
      for sem in (b.at[i, i + 1], c.at[1 - i]):
        pl.semaphore_signal(sem, 2)
        pl.semaphore_wait(sem, 2)
      target = b if len(at or ()) == 2 else c
      if what == "left":
        pl.semaphore_signal(target.at[at], 7)
        pl.semaphore_wait(target.at[at], 7 * i)
      elif what == "wait":
        pl.semaphore_wait(target.at[at], 1 - i)
      o_ref[...] += 1

    call = pl.pallas_call(
        kernel, out_shape=_sds((ROWS, LANES)), grid=(2,),
        in_specs=[pl.BlockSpec((ROWS // 2, LANES), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((ROWS // 2, LANES), lambda i: (i, 0)),
        scratch_shapes=[DMA(()), REGULAR((2, 3)), REGULAR((2,))],
        interpret=FI())
    if message is None:
      np.testing.assert_array_equal(call(X), X + 1)
      return
    step = 1 if what == "left" else 0  # Left over: found at the end.
    with self.assertRaisesRegex(Exception, SEM + r": " + message +
                                rf".*grid step {step}\b"):
      jax.block_until_ready(call(X))

  @parameterized.named_parameters(("a_first", False, r"args\[1\]"),
                                  ("b_first", True, r"args\[2\]"))
  def test_shared_bad_index_names_the_first_copy(self, b_first, operand):
    # Both copies read the same table entry (one traced value): the copy
    # that runs first is the one reported, as it would fault first.
    def kernel(t_ref, a_hbm, b_hbm, o_ref, buf, sem):
      def copy(src):
        page = t_ref[0] + 0
        c = pltpu.make_async_copy(src.at[pl.ds(page, 8)], buf, sem)
        c.start()
        c.wait()
        o_ref[...] += buf[...]
      o_ref[...] = jnp.zeros_like(o_ref)
      for src in ((b_hbm, a_hbm) if b_first else (a_hbm, b_hbm)):
        copy(src)

    call = pl.pallas_call(
        kernel, out_shape=_sds((8, LANES)), in_specs=[SMEM, ANY, ANY],
        out_specs=VMEM, scratch_shapes=[pltpu.VMEM((8, LANES), jnp.float32),
                                        DMA(())], interpret=FI())
    np.testing.assert_array_equal(call(_i32(8), X, 2 * X), 3 * X[8:])
    with self.assertRaisesRegex(Exception, OOB + r": DMA source of " +
                                operand + r" at index \[9, 0\]"):
      jax.block_until_ready(call(_i32(9), X, 2 * X))

  def test_static_value_out_of_range_raises_while_tracing(self):
    state, sites = _fresh()
    with self.assertRaisesRegex(checks.KernelCheckError,
                                r"fast_interpret: x 12 .*found while tracing"):
      checks.record_outside(state, sites, 0, [(12, 0, 3)], "x {0}", [12])
    state = checks.record_outside(state, sites, 0, [(2, 0, 3)], "x {0}", [2])
    self.assertEqual(state.pending, ())


def _jax_indexer(shape, start, size):
  """A function of the two starts: the NDIndexer of ``pl.ds`` windows."""
  del start
  def make(i, j):
    # validate=False: NDIndexer rejects concrete out-of-range starts itself.
    return fast_interpret._jax.NDIndexer(
        (fast_interpret._jax.Slice(i, size[0]),
         fast_interpret._jax.Slice(j, size[1])), shape, (), validate=False)
  return make


# ---------------------------------------------------------------------------
# The lowered program: a host callback only when checks are on.


class LoweredProgramTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("checked", FI, True),
      ("unchecked", FI.unchecked, False),
      ("unchecked_by_fields", lambda: FI(
          out_of_bounds_reads="uninitialized", check_semaphores=False,
          **({"check_output_revisits": False}
             if "check_output_revisits" in FI.__dataclass_fields__ else {})),
       False),
  )
  def test_callback_only_with_checks(self, make_params, expect_callback):
    # Params are built here, not at import, so setUpModule's clean slate holds.
    text = jax.jit(_build_load(make_params(), False)).lower(
        _i32(0), X).as_text()
    self.assertEqual("callback" in text, expect_callback)

  @parameterized.named_parameters(
      ("bounds_in_the_word", _build_load, 3, 9),
      ("semaphores_decoded_on_host", _build_sem_wait, 1, 2))
  def test_host_reached_only_when_a_check_fails(self, build, good, bad):
    # With checks on (the default), the program holds the callback, but it
    # runs only when a check failed: for errors in the word and for the
    # semaphores' end check decoded on the host alike.
    calls, io_callback = [], checks.io_callback

    def counting(fn, result_shape, *args):
      def counted(*a):
        calls.append(1)
        return fn(*a)
      return io_callback(counted, result_shape, *args)

    with mock.patch.object(checks, "io_callback", counting):
      call = jax.jit(build(FI(), False))
      for _ in range(3):
        jax.block_until_ready(call(_i32(good), X))
      self.assertEqual(calls, [])
      with self.assertRaises(Exception):
        jax.block_until_ready(call(_i32(bad), X))
    self.assertEqual(calls, [1])

  def test_semaphore_checks_alone_emit_callback(self):
    params = FI.unchecked(check_semaphores=True)
    text = jax.jit(_build_sem_wait(params, False)).lower(_i32(1), X).as_text()
    self.assertIn("callback", text)

  def test_unchecked_semaphore_kernel_has_no_callback(self):
    text = jax.jit(_build_sem_wait(FI.unchecked(), False)).lower(
        _i32(1), X).as_text()
    self.assertNotIn("callback", text)

  @parameterized.named_parameters(("fits", 2, False), ("too_short", 1, True))
  def test_smem_read_at_program_id_checked_only_if_it_can_fail(
      self, smem_size, expect_callback):
    # A program id lies in [0, grid size): a table of the grid's size
    # indexed by it needs no run-time check, a shorter one does.
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(0, 8), :] + s_ref[pl.program_id(0)]

    call = _rows_call(kernel, FI())
    s = jnp.arange(smem_size, dtype=jnp.int32)
    self.assertEqual("callback" in jax.jit(call).lower(s, X).as_text(),
                     expect_callback)
    if expect_callback:
      with self.assertRaisesRegex(Exception, OOB + r".*grid step 1"):
        jax.block_until_ready(call(s, X))
    else:
      np.testing.assert_array_equal(
          call(s, X), jnp.concatenate([X[:8], X[:8] + 1]))



class MultiCoreChecksTest(chex.TestCase):
  """Errors and semaphore leftovers of every simulated core are reported."""

  def _call(self, params):
    def kernel(i_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(i_ref[pl.program_id(0)], 8), :]

    return _rows_call(kernel, params, compiler_params=pltpu.CompilerParams(
        dimension_semantics=("parallel",)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_error_on_the_second_core_is_raised(self):
    call = self.variant(self._call(FI(num_cores_or_threads=2)))
    x = jnp.arange(16 * LANES, dtype=jnp.float32).reshape(16, LANES)
    with self.assertRaisesRegex(Exception, OOB + r".*grid step 1"):
      jax.block_until_ready(call(jnp.array([0, 12], jnp.int32), x))
    out = call(jnp.array([0, 8], jnp.int32), x)
    np.testing.assert_array_equal(out, x)

  def test_semaphore_left_on_the_first_core_is_reported(self):
    def kernel(o_ref, sem):
      @pl.when(pl.program_id(0) == 0)
      def _():
        pl.semaphore_signal(sem, 1)
      o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

    call = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16, LANES), jnp.float32),
        grid=(2,), out_specs=pl.BlockSpec((8, LANES), lambda i: (i, 0)),
        scratch_shapes=[pltpu.SemaphoreType.REGULAR],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",)),
        interpret=FI(num_cores_or_threads=2))
    with self.assertRaisesRegex(Exception,
                                r"fast_interpret: semaphore: .*grid step 0"):
      jax.block_until_ready(call())

class PoisonedWaitTest(chex.TestCase):
  """A wait below zero poisons its count; the kernel's end reports it."""

  def _build(self, params):
    # bad[0]: the step whose wait asks for one more than was signalled;
    # bad[1]: the step whose load starts out of bounds (-1: none).
    def kernel(bad_ref, x_ref, o_ref, sem):
      i = pl.program_id(0)
      pl.semaphore_signal(sem, 1)
      pl.semaphore_wait(sem, jnp.where(i == bad_ref[0], 2, 1))
      # A signal after the failed wait must not hide it.
      pl.semaphore_signal(sem, 1)
      pl.semaphore_wait(sem, 1)
      start = jnp.where(i == bad_ref[1], 9, 0)
      o_ref[...] = x_ref[pl.ds(start, 8), :] * 2.0

    return pl.pallas_call(
        kernel, out_shape=_sds((8, LANES)), grid=(4,),
        in_specs=[SMEM, VMEM], out_specs=pl.BlockSpec(
            (8, LANES), lambda i: (0, 0)),
        scratch_shapes=[REGULAR(())], interpret=params)

  @chex.variants(with_jit=True, without_jit=True)
  def test_failed_wait_reported_with_its_step_and_count(self):
    fn = self.variant(self._build(FI()))
    with self.assertRaisesRegex(
        Exception, SEM + r": a semaphore wait on scratch\[0\] waits for more "
        r"than was signalled \(count would be -1\).*grid step 2\)"):
      jax.block_until_ready(fn(_i32(2, -1), X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_fixed_kernel_matches_reference(self):
    fn = self.variant(self._build(FI()))
    np.testing.assert_array_equal(fn(_i32(-1, -1), X), X[:8] * 2.0)

  @parameterized.named_parameters(
      ("wait_first", (1, 2), SEM + r": a semaphore wait.*grid step 1\)"),
      ("load_first", (2, 1), OOB + r": load of .*grid step 1\)"))
  def test_earliest_step_wins(self, bad, error):
    with self.assertRaisesRegex(Exception, error):
      jax.block_until_ready(self._build(FI())(_i32(*bad), X))

  def test_deficit_too_large_for_the_code_says_so(self):
    def kernel(x_ref, o_ref, sem):
      pl.semaphore_wait(sem, 1 << 29)
      o_ref[...] = x_ref[...]

    fn = pl.pallas_call(kernel, out_shape=_sds((ROWS, LANES)),
                        in_specs=[VMEM], out_specs=VMEM,
                        scratch_shapes=[REGULAR(())], interpret=FI())
    with self.assertRaisesRegex(
        Exception, r"\(count would be -\d+ or lower\).*grid step 0\)"):
      jax.block_until_ready(fn(X))

  @chex.variants(with_jit=True, without_jit=True)
  def test_run_scoped_semaphore_reported_at_scope_end(self):
    def build(amount):
      def kernel(x_ref, o_ref):
        def body(sem):
          pl.semaphore_signal(sem, 1)
          pl.semaphore_wait(sem, amount)
        pl.run_scoped(body, REGULAR(()))
        o_ref[...] = x_ref[...] + 1.0
      return self.variant(pl.pallas_call(
          kernel, out_shape=_sds((ROWS, LANES)), in_specs=[VMEM],
          out_specs=VMEM, interpret=FI()))

    np.testing.assert_array_equal(build(1)(X), X + 1.0)
    with self.assertRaisesRegex(
        Exception, SEM + r": a semaphore wait on run_scoped\[0\] waits for "
        r"more than was signalled \(count would be -2\)"):
      jax.block_until_ready(build(3)(X))

  @parameterized.named_parameters(("taken", 2, True), ("not_taken", -1, False))
  def test_wait_under_pl_when_runs_as_a_select(self, bad, fails):
    # A branch that only waits becomes masked updates, not a conditional.
    def kernel(bad_ref, x_ref, o_ref, sem):
      @pl.when(pl.program_id(0) == bad_ref[0])
      def _():
        pl.semaphore_wait(sem, 1)
      o_ref[...] = x_ref[:8] + 1.0

    fn = jax.jit(pl.pallas_call(
        kernel, out_shape=_sds((8, LANES)), grid=(4,),
        in_specs=[SMEM, VMEM], out_specs=pl.BlockSpec(
            (8, LANES), lambda i: (0, 0)),
        scratch_shapes=[REGULAR(())], interpret=FI()))
    hlo = fn.lower(_i32(bad), X).compile().as_text()
    # The one conditional left is the one that raises after the grid.
    self.assertEqual(hlo.count(" conditional("), 1)
    if fails:
      with self.assertRaisesRegex(
          Exception, SEM + r": a semaphore wait .*\(count would be -1\)"
          r".*grid step 2\)"):
        jax.block_until_ready(fn(_i32(bad), X))
    else:
      np.testing.assert_array_equal(fn(_i32(bad), X), X[:8] + 1.0)

  def test_without_a_code_waits_record_their_check(self):
    # Grids too long for a code (or dynamic) check each wait as it runs.
    with mock.patch.object(dma_rules, "wait_code_bits", return_value=None):
      with self.assertRaisesRegex(
          Exception, SEM + r": a semaphore wait .*\(count would be -1\)"
          r".*grid step 3\)"):
        jax.block_until_ready(self._build(FI())(_i32(3, -1), X))


class HeldRecordsTest(chex.TestCase):
  """Checks before a pl.when are folded after it (checks.defer), in order."""

  def _call(self):
    def kernel(i_ref, x_ref, o_ref):
      a = x_ref[pl.ds(i_ref[0], 8), :]

      @pl.when(pl.program_id(0) == 0)
      def _():
        o_ref[...] = x_ref[pl.ds(i_ref[1], 8), :]

      o_ref[...] += a + x_ref[pl.ds(i_ref[2], 8), :]

    return _rows_call(kernel, FI())

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("before_the_branch", (11, 12, 13), r"\[11, 0\]"),
      ("in_the_branch", (0, 12, 13), r"\[12, 0\]"),
      ("after_the_branch", (0, 8, 13), r"\[13, 0\]"))
  def test_first_failing_check_is_reported(self, starts, index):
    call = self.variant(self._call())
    x = jnp.arange(16 * LANES, dtype=jnp.float32).reshape(16, LANES)
    with self.assertRaisesRegex(Exception, index + r".*grid step 0"):
      jax.block_until_ready(call(jnp.array(starts, jnp.int32), x))

  def test_no_error(self):
    x = jnp.arange(16 * LANES, dtype=jnp.float32).reshape(16, LANES)
    out = self._call()(jnp.array([0, 8, 4], jnp.int32), x)
    np.testing.assert_array_equal(
        out[:8], x[8:] + x[:8] + x[4:12])


if __name__ == "__main__":
  absltest.main()
