"""Rules for local DMAs and semaphores.

A DMA is a functional copy between two buffers. With
``dma_execution_mode="eager"`` it is done when it is started (a valid TPU
schedule); with ``"on_wait"`` it lands at the first wait on its semaphore
(see inflight.py), so a read of the destination before the wait sees the old
data. Either way its destination semaphore is incremented by the number of
bytes copied when it starts (a count the wait is then sure to find), and
``.wait()`` decrements it by the byte size of the copy it names. REGULAR
semaphores are integer counters changed by ``pl.semaphore_signal`` /
``semaphore_wait``.

Fidelity lost: DMA latency and overlap with compute; in ``eager`` mode, reads
of a destination before its wait already see the new data.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors
from fast_interpret import inflight
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


def _add_to_semaphore(ctx: RuleContext, state: KernelState, sem, amount,
                      what: str = "") -> KernelState:
  """Adds ``amount`` to a semaphore; with checks, a negative count is an error.

  A count below zero means a wait asked for more than was (or ever will be,
  in this eager model) signalled: on a TPU that wait would hang.
  """
  handle, transforms = _view(sem)
  new, buf = views.update(
      state.read(handle.buffer_id), transforms,
      lambda v: (v + jnp.asarray(amount, jnp.int32),) * 2)
  state = state.write(handle.buffer_id, buf)
  if ctx.check_semaphores and what:
    state = checks.record(
        state, ctx.sites, ctx.grid_step, jnp.any(new < 0),
        f"semaphore: {what} on {handle.name} waits for more than was "
        "signalled (count would be {0}); on a TPU this wait never returns",
        [jnp.min(new)])
  return state


def _require_local(ctx: RuleContext, device_id, what: str) -> None:
  if device_id is not None:
    raise errors.UnsupportedFeatureError(
        f"a remote {what} (device_id={device_id!r})", ctx.kernel_name,
        "Remote DMAs and signals across devices are not modelled yet; use "
        "interpret=pltpu.InterpretParams() for this kernel.")


@register_rule(_jax.dma_start_p)
def _dma_start_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                    device_id_type, priority=0, add=False):
  """``copy.start()``: copies (now, or at the wait) and signals the semaphore."""
  del device_id_type, priority
  src, dst, dst_sem, src_sem, device_id = _jax.tree_unflatten(tree, flat)
  _require_local(ctx, device_id, "DMA")
  del src_sem  # Only remote copies have a send semaphore.
  src_h, src_t = _view(src)
  dst_h, dst_t = _view(dst)
  src_report, dst_report = checks.bounds_report(ctx), checks.bounds_report(ctx)
  value = views.read(state.read(src_h.buffer_id), src_t, src_report,
                     fill=ctx.oob_fill)
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

  if inflight.can_defer(ctx.in_flight, dst_h, dst_t, add):
    sem_h, sem_t = _view(dst_sem)
    state = inflight.start(state, ctx.in_flight[dst_h.buffer_id], dst_t, put,
                           inflight.semaphore_tag(state, sem_h, sem_t),
                           dst_report, fill=ctx.oob_fill)
  else:
    _, buf = views.update(state.read(dst_h.buffer_id), dst_t, put, dst_report,
                          fill=ctx.oob_fill)
    state = state.write(dst_h.buffer_id, buf)
  state = checks.record_bounds(ctx, state, dst_report, dst_h.name,
                               "DMA destination")
  return _add_to_semaphore(ctx, state, dst_sem, _nbytes(value)), []


@register_rule(_jax.dma_wait_p)
def _dma_wait_rule(ctx: RuleContext, state: KernelState, *flat, tree,
                   device_id_type, **_):
  """``copy.wait()``: lands copies in flight; takes the bytes off the semaphore.

  The byte count comes from the view of the source the wait names.
  """
  del device_id_type
  src, _, dst_sem, _, device_id = _jax.tree_unflatten(tree, flat)
  _require_local(ctx, device_id, "DMA wait")
  if ctx.in_flight:
    sem_h, sem_t = _view(dst_sem)
    state = inflight.land(ctx.in_flight, state,
                          inflight.semaphore_tag(state, sem_h, sem_t))
  src_h, src_t = _view(src)
  shape = views.read(state.read(src_h.buffer_id), src_t)
  return _add_to_semaphore(ctx, state, dst_sem, -_nbytes(shape),
                           "a DMA wait"), []


@register_rule(_jax.semaphore_signal_p)
def _semaphore_signal_rule(ctx: RuleContext, state: KernelState, *flat,
                           args_tree, device_id_type=None, **_):
  """``pl.semaphore_signal``: adds ``inc`` to a local semaphore."""
  del device_id_type
  sem, sem_transforms, inc, device_id, core_index = _jax.tree_unflatten(
      args_tree, flat)
  _require_local(ctx, device_id, "semaphore signal")
  if core_index is not None:
    raise errors.UnsupportedFeatureError(
        "semaphore_signal with core_index", ctx.kernel_name)
  handle = sem.with_transforms(sem_transforms)
  return _add_to_semaphore(ctx, state, handle, inc), []


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
  del ctx
  sem, sem_transforms = _jax.tree_unflatten(args_tree, flat)
  handle, transforms = _view(sem.with_transforms(sem_transforms))
  return state, views.read(state.read(handle.buffer_id), transforms)
