"""Rules for where the kernel is: program ids, grid sizes, named axes."""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret.interpreter import RuleContext, bind_pure, register_rule
from fast_interpret.state import KernelState


def _program_id(ctx: RuleContext, axis: int):
  """The coordinate on grid axis ``axis``, within ``[0, size)`` (ranges.py).
  """
  value = jnp.asarray(ctx.program_ids[axis], jnp.int32)
  size = ctx.num_programs[axis] if axis < len(ctx.num_programs) else None
  if ctx.ranges is not None and isinstance(size, (int, np.integer)):
    ctx.ranges.set(value, 0, int(size) - 1)
  return value


@register_rule(_jax.program_id_p)
def _program_id_rule(ctx: RuleContext, state: KernelState, *, axis):
  """``pl.program_id``: the coordinate of the current grid step."""
  return state, _program_id(ctx, axis)


@register_rule(_jax.num_programs_p)
def _num_programs_rule(ctx: RuleContext, state: KernelState, *, axis):
  """``pl.num_programs``: the grid size (static or dynamic)."""
  return state, jnp.asarray(ctx.num_programs[axis], jnp.int32)


@register_rule(lax.axis_index_p)
def _axis_index_rule(ctx: RuleContext, state: KernelState, *, axis_name,
                     **params):
  """``lax.axis_index`` of a named grid axis is that axis' program id.

  Other axis names (e.g. of an enclosing ``shard_map``) bind as usual.
  """
  names = ctx.grid_names or ()
  if axis_name in names:
    return state, _program_id(ctx, names.index(axis_name))
  return state, bind_pure(ctx.eqn, ())
