"""Whole-grid tables of block indices, and the checks made over them.

For ``schedule.TableSchedule``: every index map evaluated at every grid
step at once (``eval_all``: in NumPy while tracing where the index map reads
no ref and uses only the primitives ``numpy_eval`` knows, else with
``jax.vmap``), the write-back flags derived from consecutive rows
(``write_flags``), and the block-bounds and output-revisit checks of the
whole table in one boolean matrix (``check_table``). Also the per-operand
pieces both schedules share: block limits, message templates and the
evaluation of one index map.
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import interpreter
from fast_interpret.state import KernelState, as_int32

# Run-time revisit checks scatter into a table of an output's blocks up to
# this size; beyond it they sort the steps' block keys instead.
_MAX_SCATTER_BLOCKS = 1 << 22


def block_limits(op) -> tuple[int, ...]:
  """Per dimension, one past the largest valid block index of ``op``."""
  limits = []
  for dim, size, padded in zip(op.mapping.block_shape, op.block_sizes,
                               op.padded_shape, strict=True):
    if isinstance(dim, _jax.Blocked):
      limits.append(padded // size)
    elif isinstance(dim, _jax.Element):
      limits.append(padded - size + 1)
    else:
      limits.append(padded)
  return tuple(limits)


def revisit_grid(op) -> tuple[int, ...] | None:
  """Shape of the table of an output's blocks, or None (Element dims)."""
  shape = []
  for dim, size, padded in zip(op.mapping.block_shape, op.block_sizes,
                               op.padded_shape, strict=True):
    if isinstance(dim, _jax.Element):
      return None
    shape.append(padded // size)
  return tuple(shape)


def block_index_template(op) -> str:
  where = checks.placeholders(len(op.block_sizes))
  return (f"out of bounds: the index map of {op.name} selects block "
          f"[{where}], outside the array of shape "
          f"{op.mapping.array_aval.shape} in blocks of {op.block_sizes}")


def revisit_template(op) -> str:
  where = checks.placeholders(len(op.block_sizes))
  return (f"output revisited: block [{where}] of {op.name} is written back "
          "a second time after the grid moved to another block; on TPU the "
          "second visit starts from a stale buffer")


def eval_index_map(ctx, state, op, coords, scalar_handles):
  """(state, block indices) of ``op`` at grid point ``coords``."""
  closed = op.mapping.index_map_jaxpr
  return interpreter.eval_jaxpr(ctx, state, closed.jaxpr, closed.consts,
                                [*coords, *scalar_handles])


def reads_refs(op) -> bool:
  jaxpr = op.mapping.index_map_jaxpr.jaxpr
  refs = {v for v in jaxpr.invars if isinstance(v.aval, _jax.AbstractRef)}
  return any(v in refs for eqn in jaxpr.eqns for v in eqn.invars
             if isinstance(v, _jax.Var))


def starts(operands) -> list[int]:
  """Where each operand's block indices start in the block table (and end)."""
  widths = [len(op.mapping.index_map_jaxpr.jaxpr.outvars) for op in operands]
  return [0, *np.cumsum(widths).tolist()]


def padded_blocks(xp, blocks, starts, outputs):
  """[num_steps, len(outputs), max ndim] block indices of ``outputs``.

  Outputs of fewer dimensions are padded with zeros (a block index that
  never changes and is in bounds), so that one op serves all outputs.
  """
  width = max(starts[k + 1] - starts[k] for k in outputs)
  zero = blocks.shape[1]
  cols = np.asarray([list(range(starts[k], starts[k + 1]))
                     + [zero] * (width - starts[k + 1] + starts[k])
                     for k in outputs], np.int32).reshape(len(outputs), width)
  zeros = np.zeros((blocks.shape[0], 1), np.int32)
  if xp is np:
    return np.concatenate([blocks, zeros], axis=1)[:, cols]
  with_zero = lax.concatenate([blocks, zeros], 1)
  return lax.gather(
      with_zero, cols[..., None],
      lax.GatherDimensionNumbers(offset_dims=(0,), collapsed_slice_dims=(1,),
                                 start_index_map=(1,)),
      slice_sizes=(blocks.shape[0], 1),
      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def write_flags(xp, padded, last_of_core):
  """[num_steps, outputs] bool: the output's block goes back to HBM here.

  That is when the next step maps the output to another block, at the
  last step, and at each core's last step. ``padded``: ``padded_blocks``.
  """
  ends = np.ones((1, padded.shape[1]), bool)
  if xp is np:
    changed = np.any(padded[:-1] != padded[1:], axis=2)
    return np.concatenate([changed, ends], axis=0) | last_of_core[:, None]
  n = padded.shape[0]
  changed = lax.reduce_or(lax.ne(lax.slice_in_dim(padded, 0, n - 1),
                                 lax.slice_in_dim(padded, 1, n)), (2,))
  flags = lax.concatenate([changed, ends], 0)
  return lax.bitwise_or(flags, lax.broadcast_in_dim(last_of_core, flags.shape,
                                                    (0,)))


def check_table(ctx, state, operands, blocks, starts, outputs, padded,
                 writes, check_revisits, xp):
  """Records (or, for a constant table, raises) the first failing check.

  Every check of the table is a column of one boolean matrix with a row per
  step, in report order: each operand's block indices against their limits,
  then each output's revisit flag. Its first True in row-major order is the
  earliest failing step's first listed check (the one a tie goes to, as in
  the error word): at run time one reduction finds it for all the checks,
  and one record reports it.

  Args:
    blocks: [num_steps, all operands' block dims] every block index.
    starts: where each operand's columns of ``blocks`` start (and end).
    outputs: the output positions with a block mapping, in order.
    padded: their block indices (``padded_blocks``), or None.
    writes: [num_steps, len(outputs)] the write-back flags, or None.
  """
  bounded = [k for k, op in enumerate(operands)
             if ctx.check_bounds and op.block_id is not None
             and starts[k + 1] > starts[k]]
  revisited = [i for i, k in enumerate(outputs) if check_revisits
               and revisit_grid(operands[k]) is not None]
  if not bounded and not revisited:
    return state
  if xp is jnp and checks.ERROR_ID not in state.buffers:
    return state
  # Per column of the matrix: its message and the block table columns it
  # reports (the block indices of its operand).
  reports, parts = [], []
  if bounded:
    lo = np.full(starts[-1], np.iinfo(np.int32).min, np.int32)
    hi = np.full(starts[-1], np.iinfo(np.int32).max, np.int32)
    for k, op in enumerate(operands):
      cols = list(range(starts[k], starts[k + 1]))
      if k in bounded:
        lo[cols] = 0
        hi[cols] = np.asarray(block_limits(op)) - 1
      reports.extend([(block_index_template(op), cols)] * len(cols))
    if xp is np:
      parts.append((blocks < lo) | (blocks > hi))
    else:
      row = lambda v: lax.broadcast_in_dim(v, blocks.shape, (1,))
      parts.append(lax.bitwise_or(lax.lt(blocks, row(lo)),
                                  lax.gt(blocks, row(hi))))
  if revisited:
    parts.append(_revisits(xp, operands, outputs, padded, writes,
                           revisited))
    reports.extend((revisit_template(operands[outputs[i]]),
                    list(range(starts[outputs[i]], starts[outputs[i] + 1])))
                   for i in revisited)
  num_checks = sum(p.shape[1] for p in parts)
  if xp is np:
    bad = np.concatenate(parts, axis=1)
    failing = np.flatnonzero(bad)
    if failing.size:
      step, col = divmod(int(failing[0]), num_checks)
      template, cols = reports[col]
      checks.raise_static(ctx.sites, template, list(blocks[step, cols]), step)
    return state
  # A message is registered once, for all its columns.
  site_of = {}
  for template, _ in reports:
    if template not in site_of:
      site_of[template] = ctx.sites.add(template)
  num_values = max(len(cols) for _, cols in reports)
  # Columns of the reported values, padded with the report's first column
  # (the template does not read the padding).
  value_cols = np.asarray(
      [[cols[min(j, len(cols) - 1)] if cols else 0
        for j in range(num_values)] for _, cols in reports], np.int32)
  # lax calls throughout: jnp operators and lax.dynamic_index_in_dim are
  # jitted calls while tracing, each traced afresh in a new process.
  bad = parts[0] if len(parts) == 1 else lax.concatenate(parts, 1)
  size = bad.size
  first = lax.reduce_min(
      lax.select(lax.reshape(bad, (size,)), lax.iota(jnp.int32, size),
                 lax.full((size,), size, jnp.int32)), (0,))
  col = lax.rem(first, np.int32(num_checks))
  step = lax.div(first, np.int32(num_checks))
  site = _at(np.asarray([site_of[t] for t, _ in reports], np.int32), col)
  values = []
  if num_values:
    picked = _gather(_at(blocks, step), _at(value_cols, col))
    values = [lax.index_in_dim(picked, j, keepdims=False)
              for j in range(num_values)]
  state = checks.add_records(state, [checks.Record(
      site, step, tuple(values), lax.lt(first, np.int32(size)))])
  return checks.flush(state)


def _at(x, i):
  """``x[i]`` along the first axis, for a traced ``i`` that is never
  negative (a step past the end clamps, as ``dynamic_slice`` does)."""
  return lax.squeeze(lax.dynamic_slice_in_dim(x, i, 1,
                                              allow_negative_indices=False),
                     (0,))


def _gather(vector, positions):
  """``vector[positions]`` for in-bounds int32 ``positions``."""
  return lax.gather(
      vector, positions[:, None],
      lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                 start_index_map=(0,)),
      slice_sizes=(1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _revisits(xp, operands, outputs, padded, writes, revisited):
  """[num_steps, len(revisited)] bool: this write-back's block was before.

  ``revisited`` are positions in ``outputs`` (and in the second axis of
  ``padded`` and ``writes``). Their blocks are numbered in one key space
  (each output's blocks after the previous output's), so that one
  scatter-min (or one sort) finds every output's first write-back of each
  block.
  """
  chosen = [outputs[i] for i in revisited]
  if len(chosen) < len(outputs):
    padded = padded[:, np.asarray(revisited)]
    writes = writes[:, np.asarray(revisited)]
  width = padded.shape[2]
  # Per output and dimension: the number of blocks and the key's stride
  # (padding: one block, stride 0).
  counts = np.ones((len(chosen), width), np.int32)
  strides = np.zeros((len(chosen), width), np.int32)
  bases, base = [], 0
  for i, k in enumerate(chosen):
    shape = revisit_grid(operands[k])
    counts[i, :len(shape)] = shape
    strides[i, :len(shape)] = [math.prod(shape[d + 1:])
                               for d in range(len(shape))]
    bases.append(base)
    base += math.prod(shape)
  # A block outside the array (reported as such, or not checked) is no
  # visit of the edge block its index clips to.
  bases = np.asarray(bases, np.int32)
  if xp is np:
    inside = np.all((padded >= 0) & (padded < counts), axis=2)
    key = (np.sum(np.clip(padded, 0, counts - 1) * strides, axis=2)
           + bases).astype(np.int32)
    write = writes & inside
  else:
    # lax calls: jnp operators are jitted calls while tracing.
    per_block = lambda v: lax.broadcast_in_dim(v, padded.shape, (1, 2))
    inside = lax.reduce_and(
        lax.bitwise_and(lax.ge(padded, np.int32(0)),
                        lax.lt(padded, per_block(counts))), (2,))
    clipped = lax.clamp(np.int32(0), padded, per_block(counts - 1))
    key = lax.add(
        lax.reduce(lax.mul(clipped, per_block(strides)), np.int32(0),
                   lax.add, (2,)),
        lax.broadcast_in_dim(bases, inside.shape, (1,)))
    write = lax.bitwise_and(writes, inside)
  # Step-major: a flat position's order is its step's order.
  shape = key.shape
  size = math.prod(shape)
  key, write = ((key.reshape(size), write.reshape(size)) if xp is np
                else (lax.reshape(key, (size,)), lax.reshape(write, (size,))))
  if xp is jnp and base <= _MAX_SCATTER_BLOCKS:
    # At run time a scatter-min (each block's first write-back position) and
    # a gather are far cheaper to compile than a sort.
    positions = lax.iota(jnp.int32, size)
    first = lax.scatter_min(
        lax.full((base,), size, jnp.int32), lax.expand_dims(key, (1,)),
        lax.select(write, positions, lax.full((size,), size, jnp.int32)),
        lax.ScatterDimensionNumbers(update_window_dims=(),
                                    inserted_window_dims=(0,),
                                    scatter_dims_to_operand_dims=(0,)),
        mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)
    return lax.reshape(lax.bitwise_and(
        write, lax.ne(_gather(first, key), positions)), shape)
  # Positions that write nothing get distinct keys that no block has.
  key = xp.where(write, key, -1 - xp.arange(size, dtype=np.int32))
  order = (np.argsort(key, kind="stable") if xp is np
           else jnp.argsort(key, stable=True))
  ordered = key[order]
  repeat = xp.concatenate([xp.zeros((1,), bool), ordered[1:] == ordered[:-1]])
  if xp is np:
    bad = np.zeros(size, bool)
    bad[order] = repeat
    return bad.reshape(shape)
  return jnp.zeros(size, bool).at[order].set(repeat).reshape(shape)


class NotNumpy(Exception):
  """An index map uses a primitive the NumPy evaluator does not know."""


def _trunc_div(a, b):
  """``lax.div`` on integers: rounds toward zero, like C."""
  q = np.abs(a) // np.abs(b)
  return np.where((a < 0) != (b < 0), -q, q)


def _select_n(which, *cases):
  which = np.asarray(which).astype(np.int64)
  return np.choose(which, np.broadcast_arrays(*cases))


_NUMPY_RULES = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply,
    "neg": np.negative, "abs": np.abs, "sign": np.sign,
    "max": np.maximum, "min": np.minimum,
    "div": _trunc_div, "rem": np.fmod,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
    "gt": np.greater, "ge": np.greater_equal,
    "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
    "not": np.invert, "select_n": _select_n,
    "clamp": lambda lo, x, hi: np.clip(x, lo, hi),
}


def numpy_eval(jaxpr, consts, args):
  """Evaluates a ref-free integer index map on NumPy arrays (one per step).

  Eager JAX ops would compile one small XLA program per primitive on the
  first call (about 30 ms each); NumPy needs none. Raises NotNumpy for
  anything but elementwise integer arithmetic.
  """
  env = {}

  def read(atom):
    return np.asarray(atom.val) if isinstance(atom, _jax.Literal) else env[atom]

  for var, val in zip(jaxpr.constvars, consts, strict=True):
    env[var] = np.asarray(val)
  for var, val in zip(jaxpr.invars, args, strict=True):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in ("jit", "pjit", "closed_call", "core_call") and "jaxpr" in eqn.params:
      closed = eqn.params["jaxpr"]
      inner = getattr(closed, "jaxpr", closed)
      outs = numpy_eval(inner, getattr(closed, "consts", ()), invals)
    elif name == "convert_element_type":
      outs = [invals[0].astype(eqn.params["new_dtype"])]
    elif name in _NUMPY_RULES and not any(
        np.asarray(v).dtype.kind == "f" for v in invals):
      outs = [_NUMPY_RULES[name](*invals)]
    else:
      raise NotNumpy(name)
    for var, val in zip(eqn.outvars, outs, strict=True):
      if np.shape(val) not in ((), np.shape(args[0]) if args and args[0]
                               is not None else ()):
        raise NotNumpy(name)
      env[var] = np.asarray(val)
  return [read(v) for v in jaxpr.outvars]


def _numpy_tables(operands, coords):
  """The block table of ref-free index maps, computed with NumPy."""
  n = coords.shape[0]
  columns = [coords[:, d] for d in range(coords.shape[1])]
  outs = []
  for op in operands:
    closed = op.mapping.index_map_jaxpr
    # Scalar-prefetch refs follow the coordinates; these maps never read them.
    unused = [None] * (len(closed.jaxpr.invars) - len(columns))
    outs.extend(numpy_eval(closed.jaxpr, closed.consts, columns + unused))
  return (np.stack([np.broadcast_to(o, (n,)).astype(np.int32) for o in outs],
                   axis=1) if outs else np.zeros((n, 0), np.int32))


def eval_all(ctx, state, operands, grid, steps, coords, scalar_handles):
  """Every block index at every step: [num_steps, all operands' block dims].

  The columns of each operand follow those of the one before (``starts``).
  """
  # Index maps see only the scalar-prefetch buffers and a fresh error word,
  # so maps that read no ref give concrete tables.
  buffers = {h.buffer_id: state.read(h.buffer_id) for h in scalar_handles}
  checked = checks.ERROR_ID in state.buffers
  num_sites = len(ctx.sites.templates) if ctx.sites else 0

  def one(step, row):
    local = KernelState(
        {**buffers, **({checks.ERROR_ID: checks.initial_word()}
                       if checked else {})})
    coords_here = [lax.index_in_dim(row, d, keepdims=False)
                   for d in range(row.shape[0])]
    # Each coordinate lies in its grid axis at every step: SMEM reads at it
    # need no check where the table spans the axis (ranges.py).
    scope = None if ctx.ranges is None else ctx.ranges.child()
    for c, n in zip(coords_here, grid, strict=True):
      if scope is not None and isinstance(n, (int, np.integer)):
        scope.set(c, 0, int(n) - 1)
    here = dataclasses.replace(ctx, grid_step=step, ranges=scope)
    outs = []
    for op in operands:
      local, out = eval_index_map(here, local, op, coords_here,
                                  scalar_handles)
      outs.extend(out)
    table = (lax.stack([as_int32(o) for o in outs]) if outs
             else jnp.zeros((0,), jnp.int32))
    return table, checks.flush(local).buffers.get(checks.ERROR_ID)

  if any(reads_refs(op) for op in operands):
    table, words = jax.vmap(one)(jnp.asarray(steps), jnp.asarray(coords))
  else:
    try:
      return _numpy_tables(operands, coords), state
    except NotNumpy:
      pass
    # Evaluated now, on concrete values. Outside any enclosing mesh: inside
    # a shard_map body the manual mesh would be given to the eager arrays.
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), ())):
      table, words = jax.vmap(one)(np.asarray(steps), np.asarray(coords))
    table = np.asarray(table)
  if checked and ctx.sites and len(ctx.sites.templates) > num_sites:
    state = checks.merge_first(state, words)
  return table, state
