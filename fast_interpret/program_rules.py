"""Rules for where the kernel is: program ids, grid sizes, named axes."""

from __future__ import annotations

import math

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

  Other axis names (e.g. of an enclosing ``shard_map``) bind as usual; on
  axes of the shard_map's mesh the value lies in ``[0, devices)``, a range
  that drops bounds checks on device-indexed views (ranges.py).
  """
  names = ctx.grid_names or ()
  if axis_name in names:
    return state, _program_id(ctx, names.index(axis_name))
  out = bind_pure(ctx.eqn, ())
  size = _mesh_size(ctx.mesh, axis_name)
  if ctx.ranges is not None and size is not None:
    ctx.ranges.set(out, 0, size - 1)  # A device of the shard_map's mesh.
  return state, out


def _mesh_size(mesh, axis_name) -> int | None:
  """How many devices ``axis_name`` (a mesh axis or a tuple of them) spans,
  or None where it is not an axis of the enclosing shard_map's mesh."""
  if mesh is None:
    return None
  names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
  if not names or any(n not in sizes for n in names):
    return None
  return math.prod(sizes[n] for n in names)
