"""Rules for control flow with refs inside: cond, while, scan, jit, run_scoped.

Each is re-emitted as the same ``lax`` construct. Its carry holds the loop's
own values plus only the buffers the body can write (found from the body's
ref effects); every other buffer is read from the enclosing scope.
"""

from __future__ import annotations

from typing import Any

from jax import lax
import jax.numpy as jnp

from fast_interpret import _jax
from fast_interpret import errors
from fast_interpret import interpreter
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import (KernelState, RefHandle, scoped_memory_space,
                                  storage_dtype, uninitialized)


def _written(state: KernelState, closed: _jax.ClosedJaxpr, invals
             ) -> set[int]:
  """Buffers a body may write: its written refs, and the special buffers.

  Special buffers (negative ids: the error word, the PRNG state) are always
  carried; they are a few words each.
  """
  ids = interpreter.written_buffer_ids(closed.jaxpr, [*closed.consts, *invals])
  return ids | {k for k in state.buffers if k < 0}


def _run(ctx, state, closed: _jax.ClosedJaxpr, invals, carried, what):
  """Evaluates a closed sub-jaxpr and checks it wrote only ``carried``."""
  new_state, outs = interpreter.eval_jaxpr(ctx, state, closed.jaxpr,
                                           closed.consts, invals)
  interpreter.check_carried(state, new_state, carried, what)
  return new_state, outs


@register_rule(_jax.cond_p)
def _cond_rule(ctx: RuleContext, state: KernelState, index, *ops, branches,
               **_):
  """``lax.cond``/``lax.switch``/``pl.when``: a ``lax.switch`` over branches."""
  carried = set().union(*(_written(state, b, ops) for b in branches))

  def make_branch(closed):
    def branch(buffers):
      st, outs = _run(ctx, state.with_buffers(buffers), closed, ops, carried,
                      "a cond branch")
      return st.subset(carried), outs
    return branch

  index = jnp.asarray(index, jnp.int32)
  buffers, outs = lax.switch(index, [make_branch(b) for b in branches],
                             state.subset(carried))
  return state.with_buffers(buffers), outs


@register_rule(_jax.while_p)
def _while_rule(ctx: RuleContext, state: KernelState, *invals, cond_jaxpr,
                body_jaxpr, cond_nconsts, body_nconsts):
  """``lax.while_loop`` / ``lax.fori_loop`` with dynamic bounds."""
  cond_consts = invals[:cond_nconsts]
  body_consts = invals[cond_nconsts:cond_nconsts + body_nconsts]
  init = invals[cond_nconsts + body_nconsts:]
  carried = (_written(state, body_jaxpr, [*body_consts, *init])
             | _written(state, cond_jaxpr, [*cond_consts, *init]))

  def cond_fn(carry):
    buffers, vals = carry
    _, (pred,) = _run(ctx, state.with_buffers(buffers), cond_jaxpr,
                      [*cond_consts, *vals], carried, "a while condition")
    return pred

  def body_fn(carry):
    buffers, vals = carry
    st, outs = _run(ctx, state.with_buffers(buffers), body_jaxpr,
                    [*body_consts, *vals], carried, "a while body")
    return st.subset(carried), list(outs)

  buffers, outs = lax.while_loop(cond_fn, body_fn,
                                 (state.subset(carried), list(init)))
  return state.with_buffers(buffers), outs


@register_rule(_jax.scan_p)
def _scan_rule(ctx: RuleContext, state: KernelState, *invals, jaxpr,
               num_consts, num_carry, length, reverse, unroll, **_):
  """``lax.scan`` / ``lax.fori_loop`` / ``pl.loop`` with static bounds."""
  consts = invals[:num_consts]
  init = invals[num_consts:num_consts + num_carry]
  xs = invals[num_consts + num_carry:]
  carried = _written(state, jaxpr, [*consts, *init, *xs])

  def body_fn(carry, x):
    buffers, vals = carry
    st, outs = _run(ctx, state.with_buffers(buffers), jaxpr,
                    [*consts, *vals, *x], carried, "a loop body")
    return (st.subset(carried), list(outs[:num_carry])), list(
        outs[num_carry:])

  (buffers, carry), ys = lax.scan(
      body_fn, (state.subset(carried), list(init)), list(xs), length=length,
      reverse=reverse, unroll=unroll)
  return state.with_buffers(buffers), [*carry, *ys]


@register_rule(_jax.jit_p)
def _jit_rule(ctx: RuleContext, state: KernelState, *invals, jaxpr, **_):
  """A nested ``jax.jit``: inlined into the kernel."""
  return interpreter.eval_jaxpr(ctx, state, jaxpr.jaxpr, jaxpr.consts, invals)


@register_rule(_jax.run_scoped_p)
def _run_scoped_rule(ctx: RuleContext, state: KernelState, *invals, jaxpr,
                     collective_axes=(), **_):
  """``pl.run_scoped``: fresh buffers that live only for the body.

  Buffers start uninitialised (semaphores at zero) every time the scope is
  entered, as on TPU where the space is reused.
  """
  if collective_axes and ctx.lockstep is not None:
    # With one core a collective allocation is a plain one; several cores
    # share it only where they run in lock step (cores.py).
    raise errors.UnsupportedFeatureError(
        f"run_scoped with collective_axes={collective_axes} inside a loop or "
        "conditional that the cores do not run in lock step", ctx.kernel_name,
        "Allocate it at the top level of the kernel.")
  handles: list[Any] = []
  fresh = []
  for k, var in enumerate(jaxpr.invars):
    aval = var.aval
    inner = getattr(aval, "inner_aval", aval)
    space = scoped_memory_space(aval)
    check_scoped_space(ctx, space)
    bid = ctx.fresh_buffer_id()
    fresh.append(bid)
    if space == "semaphore":
      value = jnp.zeros(inner.shape, jnp.int32)
    else:
      value = uninitialized(inner.shape, storage_dtype(inner),
                            ctx.params.uninitialized_memory)
    state = state.add(bid, value)
    handles.append(RefHandle(bid, space, f"run_scoped[{k}]"))
  state, outs = interpreter.eval_jaxpr(ctx, state, jaxpr, invals, handles)
  return state.drop(fresh), outs


def check_scoped_space(ctx: RuleContext, space) -> None:
  value = getattr(space, "value", space)
  if (isinstance(value, str) and value.lower() in ("any", "hbm")
      and not ctx.params.allow_hbm_allocation_in_run_scoped):
    raise errors.UnsupportedFeatureError(
        "an HBM allocation in pl.run_scoped", ctx.kernel_name,
        "A TPU kernel cannot allocate HBM in run_scoped; allocate VMEM, or set "
        "FastInterpretParams(allow_hbm_allocation_in_run_scoped=True).")
