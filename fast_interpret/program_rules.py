"""Rules for where the kernel is: program ids, grid sizes, named axes."""

from __future__ import annotations

from jax import lax
import jax.numpy as jnp

from fast_interpret import _jax
from fast_interpret.interpreter import RuleContext, bind_pure, register_rule
from fast_interpret.state import KernelState


@register_rule(_jax.program_id_p)
def _program_id_rule(ctx: RuleContext, state: KernelState, *, axis):
  """``pl.program_id``: the coordinate of the current grid step."""
  return state, jnp.asarray(ctx.program_ids[axis], jnp.int32)


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
    return state, jnp.asarray(ctx.program_ids[names.index(axis_name)],
                              jnp.int32)
  return state, bind_pure(ctx.eqn, ())
