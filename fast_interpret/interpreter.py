"""The jaxpr evaluator: one registry of rules, one lookup per equation.

A rule simulates one primitive on the kernel state::

  @register_rule(prim)
  def _prim_rule(ctx: RuleContext, state: KernelState, *invals, **params):
    ...
    return state, outvals   # outvals: a list if prim.multiple_results

``invals`` hold a ``RefHandle`` wherever the equation takes a ref, and traced
arrays elsewhere. Primitives without a rule that are pure (no ref operand, no
effect, not a Pallas primitive) fall through to ``bind`` (``bind_pure``: in
a jaxpr trace, the equation is recorded as it is, without re-deriving its
types). Anything else fails while tracing with an
``UnsupportedPrimitiveError`` that names the primitive.

Predication: inside a branch that holds remote ops (see control_rules), every
device evaluates every branch, with ``RuleContext.active`` telling whether it
took this one. The evaluator then keeps a rule's writes only where ``active``
holds, unless the rule was registered with ``predicated=True`` (control flow,
which passes ``active`` down, and rules with remote effects, which must
deliver what another device sent whatever branch this one is in).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import constants
from fast_interpret import errors
from fast_interpret import fences
from fast_interpret import outbox
from fast_interpret import ranges
from fast_interpret.state import (BufferIds, KernelState, RefHandle,
                                  is_semaphore_aval)

Rule = Callable[..., tuple[KernelState, Any]]
_RULES: dict[_jax.Primitive, Rule] = {}
_PREDICATED: set[_jax.Primitive] = set()


def register_rule(prim: _jax.Primitive, *, predicated: bool = False):
  """Decorator: registers ``rule`` as the simulation of ``prim``.

  Args:
    prim: the primitive.
    predicated: the rule honours ``RuleContext.active`` itself; otherwise
      the evaluator masks its writes (see the module docstring).
  """
  def decorator(rule: Rule) -> Rule:
    _RULES[prim] = rule
    if predicated:
      _PREDICATED.add(prim)
    return rule
  return decorator


def has_rule(prim: _jax.Primitive) -> bool:
  return prim in _RULES


@dataclasses.dataclass(frozen=True)
class RuleContext:
  """What a rule may know besides its operands.

  Attributes:
    params: the FastInterpretParams of the call.
    kernel_name: name of the kernel, for messages.
    buffer_ids: allocator of fresh buffer ids (scoped allocations).
    program_ids: grid coordinates of the current step, one per grid axis
      visible to the kernel (vmapped axes excluded).
    num_programs: grid size per visible axis (ints or traced scalars).
    grid_names: named grid axes, or None.
    eqn: the equation being simulated (for avals and source info).
    opaque_true: a run-time True the compiler cannot fold, for fusion fences
      (see fences.py); None disables fences.
    sites: the kernel's check sites (checks.Sites), or None without checks.
    grid_step: the flat index of the current grid step, for error reports.
    check_bounds: whether ref, DMA and block indices are bounds-checked.
    check_semaphores: whether semaphore counts are checked.
    wait_code_bits: with check_semaphores, how a wait below zero poisons
      its count (``dma_rules.wait_code_bits``); None: it records a check.
    mesh: the devices of the enclosing shard_map (remote.DeviceMesh), or None.
    active: None, or a traced bool: whether this device runs the code being
      simulated (False in a branch it did not take; see predication above).
    pending_waits: semaphore waits whose check is deferred to the end of
      the grid step, as ``(buffer id, name, what)`` (a list per traced step,
      or None).
    defer_waits: whether waits are deferred here: inside a predicated
      conditional, where one device may wait for what another device's
      later branch sends (control_rules).
    in_flight: with ``dma_execution_mode="on_wait"``, the companion buffers
      (``inflight.InFlight``) of each DMA destination buffer id in scope.
    core_index: the simulated core running this code (a static int), when
      several cores run in lock step; None otherwise (see cores.py).
    lockstep: the cores.Lockstep of a lock-step multi-core run, or None.
    outbox: remote ops issued but not yet delivered (``remote.Send``s), a
      list per evaluated jaxpr in a multi-device kernel (see ``eval_jaxpr``);
      None: remote ops are delivered when issued.
    constants: NumPy values of the variables of the jaxpr being evaluated
      that are known while tracing (see constants.py); read them through
      ``known_operand``.
    in_loop: whether this code runs inside a loop of more than one
      iteration (fences there do not pack values: see fences.py).
    remat: ``id(value) -> (value, recompute)`` for traced scalars (the
      program ids of a grid step read from the schedule's table) that a
      conditional recomputes inside its branches rather than taking as
      operands: on XLA:CPU every scalar handed to a conditional is a
      fusion kernel of its own (about 30 ms of compile time), while a
      table read inside the branch fuses into the code that uses it.
    reuse: results already computed in the jaxpr walk under way, by a key
      naming the computation (``cse_key``); None outside a walk.
  """

  params: Any
  kernel_name: str
  buffer_ids: BufferIds
  program_ids: tuple[Any, ...] = ()
  num_programs: tuple[Any, ...] = ()
  grid_names: tuple[Any, ...] | None = None
  eqn: _jax.JaxprEqn | None = None
  opaque_true: Any = None
  sites: Any = None
  grid_step: Any = 0
  check_bounds: bool = False
  check_semaphores: bool = False
  wait_code_bits: int | None = None
  mesh: Any = None
  active: Any = None
  pending_waits: list | None = None
  defer_waits: bool = False
  in_flight: Mapping[int, Any] = dataclasses.field(default_factory=dict)
  core_index: int | None = None
  lockstep: Any = None
  outbox: list | None = None
  constants: Mapping[_jax.Var, Any] = dataclasses.field(default_factory=dict)
  in_loop: bool = False
  remat: Mapping[int, tuple[Any, Any]] = dataclasses.field(
      default_factory=dict)
  ranges: ranges.Ranges | None = None
  reuse: dict[tuple, Any] | None = None

  def fresh_buffer_id(self) -> int:
    return self.buffer_ids.fresh()

  def known_operand(self, i: int) -> Any:
    """The NumPy value of operand ``i`` of ``eqn`` if known, else None."""
    return constants.literal_or_known(self.eqn.invars[i], self.constants)

  @property
  def oob_fill(self) -> str | None:
    """How reads outside a buffer fill (``views.read``'s ``fill``).

    None (clamp) when bounds are checked: the error is reported instead.
    """
    if getattr(self.params, "out_of_bounds_reads", "raise") == "uninitialized":
      return self.params.uninitialized_memory
    return None


@functools.cache
def _pallas_primitives() -> frozenset[_jax.Primitive]:
  return _jax.pallas_primitive_set()


def is_pure(eqn: _jax.JaxprEqn) -> bool:
  if (eqn.primitive in _pallas_primitives()
      and not _jax.has_generic_lowering(eqn.primitive)):
    return False
  if eqn.effects:
    return False
  return not any(isinstance(v.aval, _jax.AbstractRef) for v in eqn.invars)


@functools.lru_cache(maxsize=4096)
def only_binds(jaxpr: _jax.Jaxpr) -> bool:
  """Whether evaluating ``jaxpr`` would do nothing but bind its equations.

  True when every equation is pure and has no rule, nested ``jax.jit``s
  included, and no jaxpr in it is large enough to be fenced (fences.py).
  Such a jaxpr, called by a nested ``jax.jit``, can be bound as one call
  rather than walked (control_rules).
  """
  if len(jaxpr.eqns) > fences.MIN_FENCED_EQNS:
    return False
  for eqn in jaxpr.eqns:
    if not is_pure(eqn):
      return False
    if eqn.primitive is _jax.jit_p:
      if not only_binds(eqn.params["jaxpr"].jaxpr):
        return False
    elif eqn.primitive in _RULES:
      return False
  return True


def eval_jaxpr(ctx: RuleContext, state: KernelState, jaxpr: _jax.Jaxpr,
               consts: Sequence[Any], args: Sequence[Any],
               keep_sends: list | None = None,
               known_args: Sequence[Any] | None = None
               ) -> tuple[KernelState, list[Any]]:
  """Simulates ``jaxpr`` on ``state``; returns the new state and outputs.

  In a multi-device kernel, remote ops wait in an outbox of this jaxpr's own
  until an equation could observe what they deliver, or the jaxpr ends; all
  waiting then move in one exchange (remote.py). With ``keep_sends`` (a
  list), those still waiting at the end are moved there, undelivered.

  ``known_args``, if given, holds for each of ``args`` its NumPy value when
  known while tracing (else None); see constants.py.
  """
  if ctx.mesh is not None:
    ctx = dataclasses.replace(ctx, outbox=[])
  env: dict[_jax.Var, Any] = {}
  known: dict[_jax.Var, Any] = {}
  if known_args is not None:
    known.update((v, k) for v, k in zip(jaxpr.invars, known_args, strict=True)
                 if k is not None)
  seen: dict[tuple, Any] = {}
  ctx = dataclasses.replace(ctx, constants=known, reuse=seen)

  def read(atom):
    if isinstance(atom, _jax.Literal):
      return atom.val
    return env[atom]

  for var, val in zip(jaxpr.constvars, consts, strict=True):
    env[var] = val
  for var, val in zip(jaxpr.invars, args, strict=True):
    env[var] = val
  fencer = fences.Fencer(jaxpr, ctx.opaque_true, pack=not ctx.in_loop)
  for i, eqn in enumerate(jaxpr.eqns):
    fencer.before(i, eqn, env)
    invals = [read(v) for v in eqn.invars]
    if ctx.outbox:
      state = outbox.flush(ctx, state, outbox.observed_sends(ctx, eqn, invals))
    key = None
    if (eqn.primitive not in _RULES and all(
        not getattr(v.aval, "shape", True) for v in eqn.outvars)
        and is_pure(eqn)):
      # Scalars only: an array reused across a fence (fences.py) would tie
      # the code on both sides together again.
      key = cse_key(eqn.primitive, eqn.params, invals)
    if key is not None and key in seen:
      outvals = seen[key][1]
    else:
      state, outvals = eval_eqn(ctx, state, eqn, invals)
      if key is not None:
        seen[key] = (invals, outvals)  # (invals: keeps their ids unique)
    for var, val in zip(eqn.outvars, outvals, strict=True):
      env[var] = val
    if ctx.ranges is not None and eqn.primitive in ranges.INFERRED:
      ranges.infer(ctx.ranges, eqn, invals, outvals[0])
    if eqn.primitive in constants.FOLDABLE:
      value = constants.fold(eqn, known)
      if value is not None:
        known[eqn.outvars[0]] = value
  if ctx.outbox and keep_sends is not None:
    keep_sends.extend(ctx.outbox)
  elif ctx.outbox:
    state = outbox.flush(ctx, state)
  return state, [read(v) for v in jaxpr.outvars]


def cse_key(what, params: Mapping[str, Any], operands: Sequence[Any]
            ) -> tuple | None:
  """A key equal for computations that give the same values, or None.

  ``what`` (a primitive, say) with ``params`` applied to the very same
  traced values, or equal Python scalars, as an earlier one gives its
  results again: a kernel computes the same index twice, say for the K and
  the V copy of a page. Reused (``RuleContext.reuse``), it is one traced
  value, and range checks on it are recorded once (``checks.Record.key``).
  Keys hold ids: the entry must keep the operands alive. ``operands`` is
  flat (pytree leaves); ``what`` must tell apart their structures.
  """
  parts = []
  for x in operands:
    if isinstance(x, jax.core.Tracer):
      parts.append(id(x))
    elif isinstance(x, (int, float, bool, np.number, np.bool_)):
      parts.append((type(x), x))
    elif isinstance(x, np.ndarray) and x.ndim == 0:  # A typed literal.
      parts.append((type(x), x.dtype, x.item()))
    else:
      return None
  try:
    key = (what, tuple(sorted(params.items())), tuple(parts))
    hash(key)
  except TypeError:
    return None
  return key


def mask_inactive(ctx: RuleContext, before: KernelState, after: KernelState
                  ) -> KernelState:
  """``after`` where ``ctx.active`` holds, else ``before`` (changed buffers)."""
  if ctx.active is None:
    return after
  kept = {}
  for bid, new in after.buffers.items():
    old = before.buffers.get(bid)
    if old is None or old is new:
      continue
    kept[bid] = lax.select(jnp.broadcast_to(ctx.active, new.shape), new, old)
  # Check records the rule added fail only where it ran.
  n = len(before.pending)
  pending = after.pending[:n] + tuple(
      r.gated(ctx.active) for r in after.pending[n:])
  return dataclasses.replace(after.with_buffers(kept), pending=pending)


def eval_eqn(ctx: RuleContext, state: KernelState, eqn: _jax.JaxprEqn,
             invals: Sequence[Any]) -> tuple[KernelState, list[Any]]:
  """Simulates one equation; returns the new state and its output list."""
  rule = _RULES.get(eqn.primitive)
  if rule is None and is_pure(eqn):
    outvals = bind_pure(eqn, invals)
  else:
    with _jax.user_context(eqn.source_info.traceback,
                           name_stack=eqn.source_info.name_stack):
      if rule is None:
        raise errors.UnsupportedPrimitiveError(eqn, ctx.kernel_name)
      before = state
      state, outvals = rule(dataclasses.replace(ctx, eqn=eqn), state,
                            *invals, **eqn.params)
      if eqn.primitive not in _PREDICATED:
        state = mask_inactive(ctx, before, state)
  if not eqn.primitive.multiple_results:
    outvals = [outvals]
  return state, outvals


def bind_pure(eqn: _jax.JaxprEqn, invals: Sequence[Any]) -> Any:
  """Binds a pure equation's primitive with its own parameters.

  Recorded as is where the operands are traced values of the equation's own
  types (``_jax.stage_as_is``): most equations of a kernel, and a third of
  the cost of binding them.
  """
  outs = _jax.stage_as_is(eqn, invals)
  if outs is not None:
    return outs if eqn.primitive.multiple_results else outs[0]
  with _jax.user_context(eqn.source_info.traceback,
                         name_stack=eqn.source_info.name_stack):
    return eqn.primitive.bind(*invals,
                              **eqn.primitive.get_bind_params(eqn.params))


# --- Which buffers does a jaxpr write? -------------------------------------


def written_inputs(jaxpr: _jax.Jaxpr) -> frozenset[int]:
  """Positions in ``constvars + invars`` of refs that ``jaxpr`` may change.

  Uses the jaxpr's ref effects; semaphore refs are counted as written whenever
  they are passed in, because semaphore primitives carry no per-input effect.
  """
  return _written_inputs_cached(jaxpr)


@functools.lru_cache(maxsize=4096)
def _written_inputs_cached(jaxpr: _jax.Jaxpr) -> frozenset[int]:
  written = set()
  all_vars = list(jaxpr.constvars) + list(jaxpr.invars)
  position = {v: i for i, v in enumerate(all_vars)}
  for eff in jaxpr.effects:
    if isinstance(eff, (_jax.WriteEffect, _jax.AccumEffect)):
      # Effects name their input by position, or by variable in open jaxprs.
      written.add(position[eff.input] if isinstance(eff.input, _jax.Var)
                  else eff.input)
  for i, var in enumerate(all_vars):
    aval = var.aval
    if isinstance(aval, _jax.AbstractRef) and is_semaphore_aval(aval.inner_aval):
      written.add(i)
  return frozenset(written)


def written_buffer_ids(jaxpr: _jax.Jaxpr, inputs: Sequence[Any]) -> set[int]:
  """Buffer ids of the handles among ``inputs`` that ``jaxpr`` may write.

  ``inputs`` line up with ``jaxpr.constvars + jaxpr.invars``.
  """
  ids = set()
  for i in written_inputs(jaxpr):
    val = inputs[i]
    if isinstance(val, RefHandle):
      ids.add(val.buffer_id)
  return ids


def check_carried(before: KernelState, after: KernelState, carried: set[int],
                  what: str) -> None:
  """Fails loudly if a traced body changed a buffer it does not carry."""
  for bid, value in after.buffers.items():
    if bid in carried:
      continue
    if bid in before.buffers and before.buffers[bid] is not value:
      raise errors.InternalError(
          f"{what} wrote buffer {bid}, which the write analysis missed.")
