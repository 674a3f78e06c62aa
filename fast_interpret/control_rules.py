"""Rules for control flow with refs inside: cond, while, scan, jit, run_scoped.

Each is re-emitted as the same ``lax`` construct. Its carry holds the loop's
own values plus only the buffers the body can write (found from the body's
ref effects); every other buffer is read from the enclosing scope.

Control flow around remote ops (multi-device kernels, see remote.py) must not
put a collective under a device-varying condition, or the devices would
wait for each other forever. So a conditional whose branches hold remote ops
is *predicated*: every device evaluates every branch in order, with
``RuleContext.active`` saying whether it took it (writes of a branch not
taken are dropped; what other devices send is still received). Its
semaphore waits are checked at the end of the grid step, so that one
device's branch may wait for a copy that another device's later branch
starts (as in ``pl.when(me == 2)(...)`` followed by
``pl.when(me == 3)(...)``). A condition computed from the grid step alone
(``pl.when(pl.program_id(0) < n - 1)``) is the same on every device
(``remote.same_on_every_device``): such a conditional stays a plain
``lax.switch``, collectives inside, and the branches not taken cost nothing.
A while loop with remote ops runs until no device wants another iteration;
a device whose condition is false idles through the rest. Static loops
(scan, fori) are the same on every device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import dma_rules
from fast_interpret import errors
from fast_interpret import inflight
from fast_interpret import interpreter
from fast_interpret import outbox
from fast_interpret import ranges
from fast_interpret import remote
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import (KernelState, RefHandle, scoped_memory_space,
                                  storage_dtype, uninitialized)


def _written(ctx: RuleContext, state: KernelState, closed: _jax.ClosedJaxpr,
             invals) -> set[int]:
  """Buffers a body may write: its written refs, and the special buffers.

  Special buffers (negative ids: the error word, the PRNG state) are always
  carried; they are a few words each. With on_wait DMAs, a body that starts
  or waits on a DMA carries the DMA destinations and their companions.
  """
  ids = interpreter.written_buffer_ids(closed.jaxpr, [*closed.consts, *invals])
  ids |= inflight.carried_ids(ctx.in_flight, state, closed.jaxpr)
  return ids | {k for k in state.buffers if k < 0}


def _run(ctx, state, closed: _jax.ClosedJaxpr, invals, carried, what,
         keep_sends=None):
  """Evaluates a closed sub-jaxpr and checks it wrote only ``carried``.

  With ``keep_sends`` (a list), remote ops still waiting at the end are
  moved there instead of being delivered.
  """
  new_state, outs = interpreter.eval_jaxpr(ctx, state, closed.jaxpr,
                                           closed.consts, invals,
                                           keep_sends=keep_sends)
  new_state = checks.flush(new_state)
  interpreter.check_carried(state, new_state, carried, what)
  return new_state, outs


def _rematerialised(ctx: RuleContext, closed: _jax.ClosedJaxpr, ops):
  """(ctx, ops) for a branch being traced, cheap scalars recomputed in it.

  Values in ``ctx.remat`` (program ids) are read again from the schedule's
  table inside the branch, where the read fuses into the code using them,
  instead of entering the conditional as operands, each a fusion kernel of
  its own on XLA:CPU (see ``RuleContext.remat``). Not done for loop bodies:
  there the read often feeds an index that does not fuse (paged
  attention's page loop got one more kernel). The program ids of ``ctx``
  are read again only for a branch that asks for one (most take theirs as
  operands): a read nothing uses is still traced and lowered.
  """
  if not ctx.remat:
    return ctx, ops
  remat = dict(ctx.remat)

  def again(x):
    entry = ctx.remat.get(id(x))
    if entry is None or entry[0] is not x:
      return x
    y = entry[1]()
    remat[id(y)] = (y, entry[1])
    return y

  new_ops = [again(x) for x in ops]
  program_ids = ctx.program_ids
  if _reads_program_ids(closed.jaxpr):
    program_ids = tuple(again(p) for p in program_ids)
  return dataclasses.replace(ctx, remat=remat,
                             program_ids=program_ids), new_ops


@functools.lru_cache(maxsize=4096)
def _reads_program_ids(jaxpr: _jax.Jaxpr) -> bool:
  return _jax.uses_primitives(jaxpr, (_jax.program_id_p, lax.axis_index_p))


def _no_remat(ctx: RuleContext) -> RuleContext:
  """``ctx`` for a loop body: no program id is read again in there.

  In a loop, a branch's read of the table ran at every iteration: paged
  attention ran 2.5x slower per call.
  """
  return dataclasses.replace(ctx, remat={}) if ctx.remat else ctx


def _taken(ctx: RuleContext, index, k: int, num_branches: int
           ) -> RuleContext:
  """``ctx`` for branch ``k`` of a conditional on ``index``: ranges there
  hold where the branch is taken (see ranges.py)."""
  if ctx.ranges is None:
    return ctx
  scope = ctx.ranges.child()
  ranges.branch_taken(scope, index, k, num_branches)
  return dataclasses.replace(ctx, ranges=scope)


def _and(active, pred):
  return pred if active is None else active & pred


@register_rule(_jax.cond_p, predicated=True)
def _cond_rule(ctx: RuleContext, state: KernelState, index, *ops, branches,
               **_):
  """``lax.cond``/``lax.switch``/``pl.when``: a ``lax.switch`` over branches.

  Predicated (see the module docstring) when a branch holds remote ops and
  the index may differ between devices.
  Inside a predicated branch, a plain switch still works: its rules see
  ``active`` and drop their writes where it is False.
  """
  if (any(remote.has_remote_ops(b.jaxpr) for b in branches)
      and not remote.same_on_every_device(ctx, index)):
    return _predicated_cond(ctx, checks.flush(state), index, ops, branches)
  if (ctx.check_semaphores and ctx.lockstep is None and not ctx.in_flight
      and _semaphore_only(branches)):
    # E.g. ``pl.when(i >= 2)`` around a DMA wait: with checks on, the
    # count update is live, and a conditional around it cost a conditional,
    # a predicate kernel and the update's own kernel per grid step. Run
    # every branch, masked: the update becomes a select in one kernel.
    return _predicated_cond(ctx, checks.flush(state), index, ops, branches,
                            defer_waits=False)
  hoist = ctx.outbox is not None and any(
      remote.has_remote_ops(b.jaxpr) for b in branches)
  if hoist or ctx.active is not None:
    state = checks.flush(state)
  else:
    state = checks.defer(state)
  # Branches start with nothing pending or held back.
  inner = dataclasses.replace(state, deferred=None)
  carried = set().union(*(_written(ctx, inner, b, ops) for b in branches))

  def make_branch(closed, k, layout=None, kept=None):
    def branch(buffers):
      sends = [] if hoist else None
      branch_ctx, branch_ops = _rematerialised(
          _taken(ctx, index, k, len(branches)), closed, ops)
      st, outs = _run(branch_ctx, inner.with_buffers(buffers), closed,
                      branch_ops, carried, "a cond branch", keep_sends=sends)
      if not hoist:
        return st.subset(carried), outs
      if kept is not None:
        kept[:] = sends
      if layout is None:
        return st.subset(carried), outs
      return st.subset(carried), outs, outbox.slots_of(layout, k, sends)
    return branch

  if not hoist:
    buffers, outs = lax.switch(
        jnp.asarray(index, jnp.int32),
        [make_branch(b, k) for k, b in enumerate(branches)],
        inner.subset(carried))
    return state.with_buffers(buffers), outs
  # Remote ops still waiting at the end of a branch leave the switch as
  # outputs (zeros and a False valid flag from the other branches), so that
  # they can go in one exchange with what comes after. Every device takes
  # the same branch here. The branches are traced once to learn the layout.
  shapes = []
  for k, b in enumerate(branches):
    kept = []
    jax.eval_shape(make_branch(b, k, kept=kept), inner.subset(carried))
    shapes.append(kept)
  layout = outbox.slot_layout(shapes)
  kept = [[] for _ in branches]
  buffers, outs, slots = lax.switch(
      jnp.asarray(index, jnp.int32),
      [make_branch(b, k, layout, kept[k]) for k, b in enumerate(branches)],
      inner.subset(carried))
  for send in outbox.sends_of(layout, kept, slots):
    ctx.outbox.append(send)
  return state.with_buffers(buffers), outs


def _predicated_cond(ctx: RuleContext, state: KernelState, index, ops,
                     branches, defer_waits=None):
  """Every branch runs on every device; ``active`` says which one it took.

  Waits are deferred to the end of the grid step (``defer_waits`` None:
  where the step collects them), as another device's branch may signal.
  """
  taken = index
  index = jnp.asarray(index, jnp.int32)
  every = set(state.buffers)
  if defer_waits is None:
    defer_waits = ctx.pending_waits is not None
  branch_outs = []
  for k, closed in enumerate(branches):
    # The branch's checks are gated by ``active``: they can fail only where
    # it was taken, so its ranges may assume so.
    sub = dataclasses.replace(_taken(ctx, taken, k, len(branches)),
                              active=_and(ctx.active, index == k),
                              defer_waits=defer_waits)
    state, outs = _run(sub, state, closed, ops, every, "a cond branch")
    branch_outs.append(outs)
  if len(branches) == 1:
    return state, branch_outs[0]
  return state, [lax.select_n(index, *vals)
                 for vals in zip(*branch_outs, strict=True)]


# Semaphore operations a branch may hold and still run as selects.
_SEMAPHORE_OPS = frozenset({_jax.semaphore_wait_p, _jax.semaphore_signal_p,
                            _jax.dma_wait_p})
# Branches larger than this keep their conditional.
_MAX_SELECTED_EQNS = 16


def _semaphore_only(branches) -> bool:
  """Whether the branches wait or signal locally, and do only scalar
  arithmetic besides (the empty branch of a ``pl.when`` qualifies).

  Such branches cost less run unconditionally with their updates masked
  than as a conditional.
  """
  waits = False
  for closed in branches:
    jaxpr = closed.jaxpr
    if len(jaxpr.eqns) > _MAX_SELECTED_EQNS or remote.has_remote_ops(jaxpr):
      return False
    for eqn in jaxpr.eqns:
      if eqn.primitive in _SEMAPHORE_OPS:
        waits = True
      elif not interpreter.is_pure(eqn) or any(
          getattr(v.aval, "ndim", 1) != 0 for v in eqn.outvars):
        return False
  return waits


@register_rule(_jax.while_p, predicated=True)
def _while_rule(ctx: RuleContext, state: KernelState, *invals, cond_jaxpr,
                body_jaxpr, cond_nconsts, body_nconsts):
  """``lax.while_loop`` / ``lax.fori_loop`` with dynamic bounds."""
  cond_consts = invals[:cond_nconsts]
  body_consts = invals[cond_nconsts:cond_nconsts + body_nconsts]
  init = invals[cond_nconsts + body_nconsts:]
  state = checks.flush(state)
  carried = (_written(ctx, state, body_jaxpr, [*body_consts, *init])
             | _written(ctx, state, cond_jaxpr, [*cond_consts, *init]))
  collective = (remote.has_remote_ops(body_jaxpr.jaxpr)
                or remote.has_remote_ops(cond_jaxpr.jaxpr))
  ctx = dataclasses.replace(ctx, in_loop=True)
  if collective or ctx.active is not None:
    # A device not running this loop must not spin on values it never set.
    return _lockstep_while(ctx, state, cond_consts, body_consts, init,
                           cond_jaxpr, body_jaxpr, carried, collective)

  ctx = _no_remat(ctx)

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


def _lockstep_while(ctx, state, cond_consts, body_consts, init, cond_jaxpr,
                    body_jaxpr, carried, collective: bool):
  """A predicated while loop: ``active`` is its own condition on each device.

  With ``collective`` (remote ops inside) it iterates while the condition
  holds on any device: a device whose own condition is false takes part in
  the rest of the iterations' exchanges with ``active`` False.
  """
  mesh = (ctx.mesh if collective and ctx.mesh is not None
          else remote.DeviceMesh((), ()))

  def local_pred(buffers, vals, active):
    sub = dataclasses.replace(ctx, active=active)
    _, (pred,) = _run(sub, state.with_buffers(buffers), cond_jaxpr,
                      [*cond_consts, *vals], carried, "a while condition")
    return _and(active, jnp.asarray(pred, jnp.bool_))

  def cond_fn(carry):
    _, _, pred = carry
    return mesh.any(pred)

  def body_fn(carry):
    buffers, vals, pred = carry
    sub = dataclasses.replace(ctx, active=pred)
    st, outs = _run(sub, state.with_buffers(buffers), body_jaxpr,
                    [*body_consts, *vals], carried, "a while body")
    outs = [jnp.where(pred, o, v).astype(jnp.result_type(o))
            for o, v in zip(outs, vals, strict=True)]
    buffers = st.subset(carried)
    return buffers, outs, local_pred(buffers, outs, pred)

  buffers = state.subset(carried)
  init = list(init)
  buffers, outs, _ = lax.while_loop(
      cond_fn, body_fn, (buffers, init, local_pred(buffers, init,
                                                   ctx.active)))
  return state.with_buffers(buffers), outs


@register_rule(_jax.scan_p, predicated=True)
def _scan_rule(ctx: RuleContext, state: KernelState, *invals, jaxpr,
               num_consts, num_carry, length, reverse, unroll, **_):
  """``lax.scan`` / ``lax.fori_loop`` / ``pl.loop`` with static bounds."""
  consts = invals[:num_consts]
  init = invals[num_consts:num_consts + num_carry]
  xs = invals[num_consts + num_carry:]
  state = checks.flush(state)
  carried = _written(ctx, state, jaxpr, [*consts, *init, *xs])
  if length > 1:
    ctx = dataclasses.replace(ctx, in_loop=True)
  ctx = _no_remat(ctx)
  counters = _counters(ctx, jaxpr.jaxpr, num_consts, init, length)

  def body_fn(carry, x):
    buffers, vals = carry
    body_ctx = ctx
    if counters:
      body_ctx = dataclasses.replace(ctx, ranges=ctx.ranges.child())
      for k, (lo, hi) in counters.items():
        body_ctx.ranges.set(vals[k], lo, hi)
    st, outs = _run(body_ctx, state.with_buffers(buffers), jaxpr,
                    [*consts, *vals, *x], carried, "a loop body")
    return (st.subset(carried), list(outs[:num_carry])), list(
        outs[num_carry:])

  (buffers, carry), ys = lax.scan(
      body_fn, (state.subset(carried), list(init)), list(xs), length=length,
      reverse=reverse, unroll=unroll)
  return state.with_buffers(buffers), [*carry, *ys]


def _counters(ctx: RuleContext, jaxpr: _jax.Jaxpr, num_consts: int, init,
              length: int) -> dict[int, tuple[int, int]]:
  """Ranges of the loop counters among a scan's carries, by carry position.

  A counter is a carry the body returns plus 1 (a ``fori_loop`` with static
  bounds is such a scan): from an ``init`` in ``[lo, hi]``, it stays in
  ``[lo, hi + length - 1]`` inside the body.
  """
  if ctx.ranges is None:
    return {}
  producers = {v: e for e in jaxpr.eqns for v in e.outvars}
  found = {}
  for k, start in enumerate(init):
    var = jaxpr.invars[num_consts + k]
    out = jaxpr.outvars[k]
    eqn = None if isinstance(out, _jax.Literal) else producers.get(out)
    if eqn is None or eqn.primitive is not lax.add_p:
      continue
    a, b = eqn.invars
    if isinstance(a, _jax.Literal):
      a, b = b, a
    if a is not var or not isinstance(b, _jax.Literal) or not (
        _is_one(b.val)):
      continue
    span = ranges.counter_range(ctx.ranges, start, length)
    if span is not None and span[1] <= np.iinfo(var.aval.dtype).max:
      found[k] = span
  return found


def _is_one(x) -> bool:
  return getattr(x, "shape", ()) == () and int(x) == 1


@register_rule(_jax.jit_p, predicated=True)
def _jit_rule(ctx: RuleContext, state: KernelState, *invals, jaxpr, **_):
  """A nested ``jax.jit``: inlined into the kernel.

  One that holds only pure equations without rules (``jnp.where``, say) is
  inlined as it is (``_jax.inline_call``), without the walk: the walk
  would record the same equations, at many times the cost. Unless an
  operand has a range (``jnp.remainder`` of a loop counter, say): the walk
  gives the results theirs (ranges.py).
  """
  if (interpreter.only_binds(jaxpr.jaxpr) and interpreter.is_pure(ctx.eqn)
      and not (ctx.ranges is not None
               and any(ctx.ranges.has_range(v) for v in invals))):
    outs = _jax.inline_call(ctx.eqn, jaxpr, invals)
    if outs is not None:
      return state, outs
  known = [ctx.known_operand(i) for i in range(len(invals))]
  return interpreter.eval_jaxpr(ctx, state, jaxpr.jaxpr, jaxpr.consts, invals,
                                known_args=known)


@register_rule(_jax.run_scoped_p, predicated=True)
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
  if inflight.enabled(ctx.params):
    n_const = len(jaxpr.constvars)
    state, table = inflight.allocate(
        state, handles, [p - n_const for p in inflight.destinations(jaxpr)
                         if p >= n_const], ctx.fresh_buffer_id)
    fresh += [i for e in table.values() for i in (e.shadow_id, e.tag_id)]
    ctx = dataclasses.replace(ctx, in_flight={**ctx.in_flight, **table})
  state, outs = interpreter.eval_jaxpr(ctx, state, jaxpr, invals, handles)
  state = dma_rules.check_pending_waits(ctx, state, set(fresh))
  state = checks.add_records(state, dma_rules.end_records(
      ctx, state, handles, left_over=False))
  return state.drop(fresh), outs


def check_scoped_space(ctx: RuleContext, space) -> None:
  value = getattr(space, "value", space)
  if (isinstance(value, str) and value.lower() in ("any", "hbm")
      and not ctx.params.allow_hbm_allocation_in_run_scoped):
    raise errors.UnsupportedFeatureError(
        "an HBM allocation in pl.run_scoped", ctx.kernel_name,
        "A TPU kernel cannot allocate HBM in run_scoped; allocate VMEM, or set "
        "FastInterpretParams(allow_hbm_allocation_in_run_scoped=True).")
