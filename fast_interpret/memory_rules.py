"""Rules for loads and stores on VMEM/SMEM refs.

``ref[...]``, ``ref[...] = x``, ``ref[...] += x``, ``pl.load``/``pl.store`` and
``pltpu.load``/``pltpu.store`` with masks all become (dynamic) slices and
updates of the buffer the ref's handle names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors
from fast_interpret import interpreter
from fast_interpret import views
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import KernelState, RefHandle, uninitialized

_HBM_SPACES = ("any", "hbm")


def _check_direct_access(ctx: RuleContext, ref: RefHandle, what: str) -> None:
  """A TPU kernel cannot load or store HBM directly; it must DMA."""
  space = getattr(ref.memory_space, "value", ref.memory_space)
  if isinstance(space, str) and space.lower() in _HBM_SPACES:
    raise errors.UnsupportedFeatureError(
        f"{what} of operand {ref.name!r} that lives in HBM "
        f"(memory_space={space})", ctx.kernel_name,
        "A TPU kernel cannot access HBM directly: copy it to VMEM with "
        "pltpu.make_async_copy / pltpu.sync_copy, or give its BlockSpec a "
        "VMEM memory space.")


def _transforms(ref: RefHandle, tree, flat) -> tuple:
  return ref.transforms + tuple(_jax.tree_unflatten(tree, flat))


@register_rule(_jax.get_p)
def _get_rule(ctx: RuleContext, state: KernelState, ref: RefHandle, *idx,
              tree):
  """Simulates ``ref[idx]``: a slice of the buffer. No fidelity lost.

  A load of the same view of the same buffer value (not written since),
  outside predicated code, gives the earlier load's value again: its
  bounds check is already recorded (``interpreter.cse_key``).
  """
  _check_direct_access(ctx, ref, "a load")
  buf = state.read(ref.buffer_id)
  transforms = _transforms(ref, tree, idx)
  key = None
  if ctx.reuse is not None and ctx.active is None:
    leaves, structure = jax.tree_util.tree_flatten(transforms)
    key = interpreter.cse_key(("load", ref.name, structure),
                              {"fill": ctx.oob_fill}, [buf, *leaves])
    if key in ctx.reuse:
      return state, ctx.reuse[key][1]
  report = checks.bounds_report(ctx)
  value = views.read(buf, transforms, report, fill=ctx.oob_fill,
                     ranges=ctx.ranges)
  if key is not None:
    ctx.reuse[key] = ((buf, leaves), value)
  return checks.record_bounds(ctx, state, report, ref.name, "load"), value


@register_rule(_jax.swap_p)
def _swap_rule(ctx: RuleContext, state: KernelState, ref: RefHandle, val,
               *idx, tree):
  """Simulates ``ref[idx] = val`` (returning the old value)."""
  _check_direct_access(ctx, ref, "a store")
  report = checks.bounds_report(ctx)
  old, buf = views.swap(state.read(ref.buffer_id),
                        _transforms(ref, tree, idx), val, report,
                        fill=ctx.oob_fill, ranges=ctx.ranges)
  state = checks.record_bounds(ctx, state, report, ref.name, "store")
  return state.write(ref.buffer_id, buf), old


@register_rule(_jax.addupdate_p)
def _addupdate_rule(ctx: RuleContext, state: KernelState, ref: RefHandle, val,
                    *idx, tree):
  """Simulates ``ref[idx] += val``."""
  _check_direct_access(ctx, ref, "an accumulate")
  report = checks.bounds_report(ctx)
  buf = views.add(state.read(ref.buffer_id), _transforms(ref, tree, idx), val,
                  report, fill=ctx.oob_fill, ranges=ctx.ranges)
  state = checks.record_bounds(ctx, state, report, ref.name, "accumulate")
  return state.write(ref.buffer_id, buf), []


@register_rule(_jax.masked_load_p)
def _masked_load_rule(ctx: RuleContext, state: KernelState, *flat, args_tree,
                      **_):
  """Simulates ``pl.load(ref, idx, mask=, other=)``.

  Masked-off lanes take ``other``, or the uninitialised fill value when no
  ``other`` is given (the TPU leaves them undefined).
  """
  ref, transforms, mask, other = _jax.tree_unflatten(args_tree, flat)
  _check_direct_access(ctx, ref, "a load")
  report = checks.bounds_report(ctx)
  value = views.read(state.read(ref.buffer_id),
                     ref.transforms + tuple(transforms or ()), report,
                     fill=ctx.oob_fill, ranges=ctx.ranges)
  state = checks.record_bounds(ctx, state, report, ref.name, "masked load")
  if mask is None:
    return state, value
  if other is None:
    other = uninitialized((), value.dtype, ctx.params.uninitialized_memory)
  return state, jnp.where(mask, value, jnp.asarray(other, value.dtype))


@register_rule(_jax.masked_swap_p)
def _masked_swap_rule(ctx: RuleContext, state: KernelState, *flat, args_tree,
                      **_):
  """Simulates ``pl.store``/``pl.swap`` with an optional mask."""
  ref, transforms, val, mask = _jax.tree_unflatten(args_tree, flat)
  _check_direct_access(ctx, ref, "a store")
  transforms = ref.transforms + tuple(transforms or ())
  buf = state.read(ref.buffer_id)
  report = checks.bounds_report(ctx)
  if mask is None:
    old, buf = views.swap(buf, transforms, val, report, fill=ctx.oob_fill,
                          ranges=ctx.ranges)
  else:
    old, buf = views.masked_swap(buf, transforms, val, mask, report,
                                 fill=ctx.oob_fill, ranges=ctx.ranges)
  state = checks.record_bounds(ctx, state, report, ref.name, "masked store")
  return state.write(ref.buffer_id, buf), old


@register_rule(_jax.delay_p)
def _delay_rule(ctx: RuleContext, state: KernelState, *args, **params):
  """``pl.delay``: a no-op, since simulated time is not modelled."""
  del ctx, args, params
  return state, []
