"""Rules for local DMAs and semaphores.

A DMA is a functional copy between two buffers, done when it is started
(eager: a valid TPU schedule). Its destination semaphore is then incremented
by the number of bytes copied, as the TPU's DMA engine does; ``.wait()``
decrements it by the byte size of the copy it names. REGULAR semaphores are
integer counters changed by ``pl.semaphore_signal`` / ``semaphore_wait``.

Fidelity lost: DMA latency and overlap with compute; reads of a destination
before its wait already see the new data.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors
from fast_interpret import views
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import KernelState, RefHandle


def _split_ref(ref) -> tuple[RefHandle | None, tuple]:
  """(handle, extra transforms) of a ref operand, possibly a TransformedRef."""
  if ref is None:
    return None, ()
  if isinstance(ref, RefHandle):
    return ref, ()
  inner, transforms = getattr(ref, "ref", None), getattr(ref, "transforms", ())
  if isinstance(inner, RefHandle):
    return inner, tuple(transforms)
  raise errors.InternalError(f"expected a ref operand, got {ref!r}.")


def _view(ref) -> tuple[RefHandle, tuple]:
  handle, extra = _split_ref(ref)
  return handle, handle.transforms + extra


def _nbytes(value) -> int:
  return math.prod(value.shape) * np.dtype(value.dtype).itemsize


def _sem_view(ctx: RuleContext, state: KernelState, sem, core=None
              ) -> tuple[RefHandle, tuple]:
  """(handle, transforms) of a semaphore, on ``core``'s row if per core.

  ``core`` defaults to the running core; a signal with ``core_index`` names
  another one.
  """
  handle, transforms = _view(sem)
  if not handle.per_core:
    return handle, transforms
  row = ctx.core_index if core is None else core
  shape = state.read(handle.buffer_id).shape
  if not isinstance(row, jax.core.Tracer):
    row = int(row)  # A static row keeps the update a static slice.
  indexer = _jax.NDIndexer.from_indices_shape(
      (row,) + (slice(None),) * (len(shape) - 1),
      shape)
  return handle, (indexer, *transforms)


def _add_to_semaphore(ctx: RuleContext, state: KernelState, sem, amount,
                      what: str = "", core=None) -> KernelState:
  """Adds ``amount`` to a semaphore; with checks, a negative count is an error.

  A count below zero means a wait asked for more than was (or ever will be,
  in this eager model) signalled: on a TPU that wait would hang.
  """
  handle, transforms = _sem_view(ctx, state, sem, core)
  new, buf = views.update(
      state.read(handle.buffer_id), transforms,
      lambda v: (v + jnp.asarray(amount, jnp.int32),) * 2)
  state = state.write(handle.buffer_id, buf)
  if ctx.check_semaphores and what:
    state = checks.record(
        state, ctx.sites, ctx.grid_step, jnp.any(new < 0),
        f"semaphore: {what} on {handle.name} waits for more than was "
        "signalled (count would be {0}); on a TPU this wait never returns"
        + (_LOCKSTEP_HINT if ctx.lockstep is not None else ""),
        [jnp.min(new)])
  return state


_LOCKSTEP_HINT = (
    ", unless another core signals it later: simulated cores switch only at "
    "waits, in core order (see docs/limitations.md, 'Multiple cores')")


def _require_local(ctx: RuleContext, device_id, what: str) -> None:
  if device_id is not None:
    raise errors.UnsupportedFeatureError(
        f"a remote {what} (device_id={device_id!r})", ctx.kernel_name,
        "Remote DMAs and signals across devices are not modelled yet; use "
        "interpret=pltpu.InterpretParams() for this kernel.")


@register_rule(_jax.dma_start_p)
def _dma_start_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                    device_id_type, priority=0, add=False):
  """``copy.start()``: copies now and signals the destination semaphore."""
  del device_id_type, priority
  src, dst, dst_sem, src_sem, device_id = _jax.tree_unflatten(tree, flat)
  _require_local(ctx, device_id, "DMA")
  del src_sem  # Only remote copies have a send semaphore.
  src_h, src_t = _view(src)
  dst_h, dst_t = _view(dst)
  src_report, dst_report = checks.bounds_report(ctx), checks.bounds_report(ctx)
  value = views.read(state.read(src_h.buffer_id), src_t, src_report)
  state = checks.record_bounds(ctx, state, src_report, src_h.name,
                               "DMA source")

  def put(view):
    if view.shape != value.shape:
      raise errors.UnsupportedFeatureError(
          f"a DMA from {src_h.name} {value.shape} into {dst_h.name} "
          f"{view.shape} of a different shape", ctx.kernel_name,
          "Source and destination views of a DMA must have the same shape.")
    new = view + value.astype(view.dtype) if add else value.astype(view.dtype)
    return None, new

  _, buf = views.update(state.read(dst_h.buffer_id), dst_t, put, dst_report)
  state = checks.record_bounds(ctx, state, dst_report, dst_h.name,
                               "DMA destination")
  state = state.write(dst_h.buffer_id, buf)
  return _add_to_semaphore(ctx, state, dst_sem, _nbytes(value)), []


@register_rule(_jax.dma_wait_p)
def _dma_wait_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                   device_id_type, **_):
  """``copy.wait()``: takes the copy's byte count off its semaphore."""
  del device_id_type
  src, _, dst_sem, _, device_id = _jax.tree_unflatten(tree, flat)
  _require_local(ctx, device_id, "DMA wait")
  src_h, src_t = _view(src)
  shape = views.read(state.read(src_h.buffer_id), src_t)
  return _add_to_semaphore(ctx, state, dst_sem, -_nbytes(shape),
                           "a DMA wait"), []


@register_rule(_jax.semaphore_signal_p)
def _semaphore_signal_rule(ctx: RuleContext, state: KernelState, *flat,
                           args_tree, device_id_type=None, **_):
  """``pl.semaphore_signal``: adds ``inc`` to this or another core's semaphore.

  ``core_index`` names a core of the same chip; the signal lands at once
  (no latency is modelled). Cores only signal each other when they run in
  lock step (cores.py), where semaphores have one row per core; with one
  core, ``core_index`` can only be this core.
  """
  del device_id_type
  sem, sem_transforms, inc, device_id, core_index = _jax.tree_unflatten(
      args_tree, flat)
  _require_local(ctx, device_id, "semaphore signal")
  handle = sem.with_transforms(sem_transforms)
  if core_index is not None and not handle.per_core and (
      ctx.lockstep is not None):
    raise errors.UnsupportedFeatureError(
        f"semaphore_signal with core_index on {handle.name}, which was "
        "allocated inside a loop or conditional that the cores do not run in "
        "lock step", ctx.kernel_name,
        "Allocate the semaphore in scratch_shapes, or with pl.run_scoped at "
        "the top level of the kernel.")
  return _add_to_semaphore(ctx, state, handle, inc, core=core_index), []


@register_rule(_jax.semaphore_wait_p)
def _semaphore_wait_rule(ctx: RuleContext, state: KernelState, *flat,
                         args_tree, **_):
  """``pl.semaphore_wait``: subtracts ``value`` (when decrementing)."""
  sem, sem_transforms, value, decrement = _jax.tree_unflatten(args_tree, flat)
  if not decrement:
    return state, []
  handle = sem.with_transforms(sem_transforms)
  return _add_to_semaphore(ctx, state, handle, -jnp.asarray(value, jnp.int32),
                           "a semaphore wait"), []


@register_rule(_jax.semaphore_read_p)
def _semaphore_read_rule(ctx: RuleContext, state: KernelState, *flat,
                         args_tree):
  """``pl.semaphore_read``: the counter's current value."""
  sem, sem_transforms = _jax.tree_unflatten(args_tree, flat)
  handle, transforms = _sem_view(ctx, state, sem.with_transforms(sem_transforms))
  return state, views.read(state.read(handle.buffer_id), transforms)
