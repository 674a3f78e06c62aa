"""The grid schedule: each step's coordinates, block indices and write-backs.

A TPU pipeline decides, for every grid step, which block of each operand to
fetch and whether an output block goes back to HBM after the step (when the
next step maps it to another block, or when the core's last step is done).
Those decisions depend only on the grid and the index maps, so we make them
once, before the grid loop, as one int32 table with a row per step:

  [grid coordinates | block indices of each operand | write-back flags]

Stages (``TableSchedule.build``):
  1. Evaluate every index map for all grid points in one vectorised pass
     (``jax.vmap`` over the steps). Index maps that read no ref are evaluated
     while tracing (``jax.ensure_compile_time_eval``), so the table is a
     constant of the program; index maps that read scalar-prefetch SMEM are
     evaluated at run time, once, before the loop (their SMEM reads are
     bounds-checked like any other).
  2. Derive the write-back flags from consecutive rows and each core's last
     step.
  3. Check block indices and output revisits over the whole table. With a
     constant table a failure raises while tracing; otherwise the first
     failing step is recorded in the error word.

The loop body then reads one row per step: no index-map evaluation, no
div/mod for the coordinates and no per-step checks. Grids with dynamic
bounds, grids of more than ``MAX_TABLE_STEPS`` steps, and index maps that read
SMEM the kernel writes use ``StepwiseSchedule``, which evaluates the index
maps inside the loop with the same checks per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import interpreter
from fast_interpret.state import KernelState

# A table row costs 4 bytes per column; beyond this many steps the table
# would outweigh what it saves, and index maps are evaluated per step.
MAX_TABLE_STEPS = 1 << 20
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


def _block_index_template(op) -> str:
  where = checks.placeholders(len(op.block_sizes))
  return (f"out of bounds: the index map of {op.name} selects block "
          f"[{where}], outside the array of shape "
          f"{op.mapping.array_aval.shape} in blocks of {op.block_sizes}")


def _revisit_template(op) -> str:
  where = checks.placeholders(len(op.block_sizes))
  return (f"output revisited: block [{where}] of {op.name} is written back "
          "a second time after the grid moved to another block; on TPU the "
          "second visit starts from a stale buffer")


def eval_index_map(ctx, state, op, coords, scalar_handles):
  """(state, block indices) of ``op`` at grid point ``coords``."""
  closed = op.mapping.index_map_jaxpr
  return interpreter.eval_jaxpr(ctx, state, closed.jaxpr, closed.consts,
                                [*coords, *scalar_handles])


def _reads_refs(op) -> bool:
  jaxpr = op.mapping.index_map_jaxpr.jaxpr
  refs = {v for v in jaxpr.invars if isinstance(v.aval, _jax.AbstractRef)}
  return any(v in refs for eqn in jaxpr.eqns for v in eqn.invars
             if isinstance(v, _jax.Var))


@dataclasses.dataclass(frozen=True)
class Row:
  """What the grid loop needs at one step.

  Attributes:
    coords: the grid coordinates.
    block_indices: one tuple of block indices per operand.
    writes: operand position -> whether its block goes back to HBM after the
      step (TableSchedule only; StepwiseSchedule decides after the kernel).
    coord_fn: None, or ``d -> coords[d]`` computed afresh from the table and
      the step in the trace it is called in (TableSchedule only), so that a
      conditional can read a coordinate itself instead of taking it as an
      operand (see ``RuleContext.remat``).
  """

  coords: tuple[Any, ...]
  block_indices: list[tuple[Any, ...]]
  writes: dict[int, Any] = dataclasses.field(default_factory=dict)
  coord_fn: Callable[[int], Any] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StaticRows:
  """Rows of a TableSchedule, column by column (NumPy, or JAX in a scan).

  Attributes:
    steps: [n] the flat grid step of each row.
    coords: [n, grid rank] the grid coordinates.
    block_indices: per operand, [n, ndim] its block indices.
    writes: output operand position -> [n] bool, whether its block goes
      back to HBM after the step.
  """

  steps: Any
  coords: Any
  block_indices: list[Any]
  writes: dict[int, Any]

  def __len__(self) -> int:
    return self.steps.shape[0]

  def take(self, rows) -> StaticRows:
    """The rows selected by ``rows`` (a slice or an index array)."""
    return jax.tree_util.tree_map(lambda c: c[rows], self)

  def as_row(self) -> Row:
    """This one row (columns without their leading axis, as under vmap)."""
    return Row(tuple(self.coords[d] for d in range(self.coords.shape[0])),
               [tuple(t[d] for d in range(t.shape[0]))
                for t in self.block_indices],
               dict(self.writes))


class TableSchedule:
  """Index maps evaluated once for the whole grid; one row lookup per step."""

  @property
  def buffers(self) -> dict[int, Any]:
    """Bookkeeping buffers the loop must carry: none."""
    return {}

  def __init__(self, table, num_coords: int, index_cols: list[slice],
               write_cols: dict[int, int]):
    self._table = table
    self._num_coords = num_coords
    self._index_cols = index_cols
    self._write_cols = write_cols

  @classmethod
  def build(cls, ctx, state: KernelState, grid: Sequence[int], operands,
            num_inputs: int, scalar_handles, last_of_core: np.ndarray,
            check_revisits: bool, permutations=()
            ) -> tuple[TableSchedule, KernelState]:
    """Evaluates the index maps for every step and checks them.

    Args:
      ctx: the kernel's RuleContext.
      state: the state before the grid (scalar-prefetch buffers, error word).
      grid: the static grid.
      operands: every operand (grid.Operand), inputs first.
      num_inputs: how many of ``operands`` are inputs.
      scalar_handles: the scalar-prefetch refs index maps may read.
      last_of_core: bool per step, True at each simulated core's last step.
      check_revisits: whether output write-backs are checked for revisits.
      permutations: per grid dimension, None or the order of its coordinates.

    Returns:
      The schedule and the state with any failed check recorded.
    """
    num_steps = len(last_of_core)
    steps = np.arange(num_steps, dtype=np.int32)
    coords = (np.stack(np.unravel_index(steps, tuple(grid)), axis=1)
              .astype(np.int32) if grid else np.zeros((1, 0), np.int32))
    for d, perm in enumerate(permutations):
      if perm is not None:
        coords[:, d] = np.asarray(perm)[coords[:, d]]
    indices, state = _eval_all(ctx, state, operands, steps, coords,
                               scalar_handles)
    xp = np if all(isinstance(t, np.ndarray) for t in indices) else jnp
    columns, index_cols, start = [coords], [], coords.shape[1]
    for t in indices:
      columns.append(t)
      index_cols.append(slice(start, start + t.shape[1]))
      start += t.shape[1]
    # (bad per step, message, values per step), bounds before revisits.
    failures = []
    if ctx.check_bounds:
      for k, op in enumerate(operands):
        if op.block_id is not None:
          t = indices[k]
          bad = xp.any((t < 0) | (t >= xp.asarray(block_limits(op))), axis=1)
          failures.append((bad, _block_index_template(op), t))
    write_cols = {}
    for k, op in enumerate(operands):
      if k < num_inputs or op.block_id is None:
        continue
      t = indices[k]
      changed = xp.concatenate([xp.any(t[:-1] != t[1:], axis=1),
                                xp.ones((1,), bool)])
      write = changed | last_of_core
      columns.append(write.astype(np.int32)[:, None])
      write_cols[k] = start
      start += 1
      if check_revisits and revisit_grid(op) is not None:
        failures.append((_revisits(t, revisit_grid(op), write, xp),
                         _revisit_template(op), t))
    state = _report(ctx, state, failures, xp)
    table = xp.concatenate([xp.asarray(c, np.int32) for c in columns], axis=1)
    return cls(table, coords.shape[1], index_cols, write_cols), state

  def static_rows(self) -> StaticRows | None:
    """The whole table as NumPy columns, or None when computed at run time."""
    if not isinstance(self._table, np.ndarray):
      return None
    t = self._table
    return StaticRows(
        steps=np.arange(t.shape[0], dtype=np.int32),
        coords=t[:, :self._num_coords],
        block_indices=[t[:, s] for s in self._index_cols],
        writes={k: t[:, c] > 0 for k, c in self._write_cols.items()})

  def fetch(self, ctx, state, step) -> tuple[KernelState, Row]:
    del ctx
    if isinstance(step, int) and isinstance(self._table, np.ndarray):
      # A step known while tracing (lock-step cores): ints known too.
      row = [int(v) for v in self._table[step]]
      return state, self._row(row)
    table = self._table

    def read_row():
      # Steps are never negative: no index wrap-around (a compare, add and
      # select, copied into every fusion that reads the row).
      return lax.dynamic_index_in_dim(jnp.asarray(table), step,
                                      keepdims=False,
                                      allow_negative_indices=False)

    # Only a constant table is read again inside a branch: a table computed
    # at run time would enter every such branch as an operand, which XLA
    # may copy (paged attention ran 2.5x slower per call).
    coord_fn = ((lambda d: read_row()[d])
                if isinstance(table, np.ndarray) else None)
    return state, self._row(read_row(), coord_fn)

  def _row(self, row, coord_fn=None) -> Row:
    coords = tuple(row[d] for d in range(self._num_coords))
    indices = [tuple(row[c] for c in range(s.start, s.stop))
               for s in self._index_cols]
    writes = {k: row[c] > 0 for k, c in self._write_cols.items()}
    return Row(coords, indices, writes, coord_fn)

  def write_backs(self, ctx, state, step, row: Row, is_last, flagged=None):
    """(state, output position -> write flag) for the outputs in ``flagged``.

    Outputs left out of ``flagged`` (default: none left out) are written
    back unconditionally by the caller.
    """
    del ctx, step, is_last
    if flagged is None:
      return state, row.writes
    return state, {k: w for k, w in row.writes.items() if k in flagged}


class StepwiseSchedule:
  """Index maps evaluated inside the loop, for the current and next step."""

  def __init__(self, ctx, grid, operands, num_inputs: int, scalar_handles,
               check_revisits: bool, permutations=()):
    self._grid = grid
    self._permutations = permutations
    self._operands = operands
    self._num_inputs = num_inputs
    self._scalars = scalar_handles
    # Revisits are found with a table of each output's blocks, marked at
    # every write-back (shared between simulated cores, like HBM).
    self.visited: dict[int, int] = {}
    self.buffers: dict[int, Any] = {}
    for k, op in enumerate(operands):
      if (check_revisits and k >= num_inputs and op.block_id is not None
          and revisit_grid(op) is not None):
        self.visited[k] = ctx.fresh_buffer_id()
        self.buffers[self.visited[k]] = jnp.zeros(revisit_grid(op), bool)

  def static_rows(self) -> None:
    """No table: the index maps run inside the loop."""
    return None

  def _indices(self, ctx, state, coords, positions=None):
    """Block indices of the operands at ``positions`` (default: all)."""
    indices = {}
    for k, op in enumerate(self._operands):
      if positions is None or k in positions:
        state, out = eval_index_map(ctx, state, op, coords, self._scalars)
        indices[k] = tuple(out)
    return state, indices

  def fetch(self, ctx, state, step) -> tuple[KernelState, Row]:
    coords = unravel(step, self._grid, self._permutations)
    state, found = self._indices(ctx, state, coords)
    indices = [found[k] for k in range(len(self._operands))]
    if ctx.check_bounds:
      for op, idx in zip(self._operands, indices, strict=True):
        if op.block_id is None:
          continue
        ranges = [(i, 0, limit - 1)
                  for i, limit in zip(idx, block_limits(op), strict=True)]
        state = checks.record_outside(state, ctx.sites, ctx.grid_step, ranges,
                                      _block_index_template(op), list(idx))
    return state, Row(coords, indices)

  def write_backs(self, ctx, state, step, row: Row, is_last, flagged=None):
    outputs = [k for k, op in enumerate(self._operands)
               if k >= self._num_inputs and op.block_id is not None
               and (flagged is None or k in flagged or k in self.visited)]
    if not outputs:
      # No flag needed: the next step's index maps are not evaluated at all.
      return state, {}
    next_coords = unravel(step + 1, self._grid, self._permutations)
    # Only the outputs' next blocks decide anything. After the last step the
    # next coordinates lie outside the grid: their index-map reads are not
    # checked (``is_last`` decides that write).
    _, nxt = self._indices(ctx, state, next_coords, set(outputs))
    writes = {}
    for k in outputs:
      op = self._operands[k]
      changed = False
      for a, b in zip(row.block_indices[k], nxt[k], strict=True):
        changed = changed | (jnp.asarray(a) != jnp.asarray(b))
      writes[k] = is_last | changed
      if k in self.visited:
        state = self._check_revisit(ctx, state, op, self.visited[k],
                                    row.block_indices[k], writes[k])
    return state, {k: w for k, w in writes.items()
                   if flagged is None or k in flagged}

  @staticmethod
  def _check_revisit(ctx, state, op, visited_id: int, block_indices, write):
    visited = state.read(visited_id)
    idx = [jnp.clip(jnp.asarray(i, jnp.int32), 0, n - 1)
           for i, n in zip(block_indices, visited.shape, strict=True)]
    for i, n in zip(block_indices, visited.shape, strict=True):
      # A block outside the array is no visit of the edge block.
      write = write & (jnp.asarray(i) >= 0) & (jnp.asarray(i) < n)
    seen = lax.dynamic_slice(visited, idx, (1,) * visited.ndim).reshape(())
    state = checks.record(state, ctx.sites, ctx.grid_step, write & seen,
                          _revisit_template(op), list(block_indices))
    new = lax.dynamic_update_slice(
        visited, jnp.reshape(seen | write, (1,) * visited.ndim), idx)
    return state.write(visited_id, new)


def unravel(step, grid: Sequence[Any], permutations=()) -> tuple[Any, ...]:
  """Grid coordinates of a flat step (row-major, then permuted)."""
  coords = []
  for size in reversed(grid):
    coords.append(lax.rem(step, jnp.asarray(size, jnp.int32)))
    step = lax.div(step, jnp.asarray(size, jnp.int32))
  coords = tuple(reversed(coords))
  return tuple(c if p is None else jnp.asarray(p)[c] for c, p in
               zip(coords, permutations or (None,) * len(coords), strict=True))


def make(ctx, state, grid, operands, num_inputs: int, scalar_handles,
         written: set[int], last_of_core: np.ndarray | None,
         check_revisits: bool, permutations=None):
  """The schedule for this call: a table where possible (see module doc).

  Args:
    last_of_core: bool per step, True at each core's last step; None when
      the number of steps is not static.
    permutations: per grid dimension, None or the order in which its
      coordinates run (``random_seed``, see cores.py).
  """
  permutations = tuple(permutations or (None,) * len(grid))
  static = (last_of_core is not None and len(last_of_core) <= MAX_TABLE_STEPS
            and all(isinstance(g, (int, np.integer)) for g in grid))
  reads_written = any(h.buffer_id in written for h in scalar_handles) and any(
      _reads_refs(op) for op in operands)
  if static and not reads_written:
    return TableSchedule.build(ctx, state, grid, operands, num_inputs,
                               scalar_handles, last_of_core, check_revisits,
                               permutations)
  schedule = StepwiseSchedule(ctx, grid, operands, num_inputs,
                              scalar_handles, check_revisits, permutations)
  return schedule, state


def _revisits(t, shape, write, xp):
  """bool per step: the block written back here was written back before."""
  clipped = [xp.clip(t[:, d], 0, n - 1) for d, n in enumerate(shape)]
  # A block outside the array (reported as such, or not checked) is no
  # visit of the edge block its index clips to.
  for d, n in enumerate(shape):
    write = write & (t[:, d] >= 0) & (t[:, d] < n)
  key = xp.zeros(t.shape[0], np.int32)
  for c, n in zip(clipped, shape, strict=True):
    key = key * n + c
  num_blocks = math.prod(shape)
  if xp is jnp and num_blocks <= _MAX_SCATTER_BLOCKS:
    # At run time a scatter-min (each block's first write-back step) and a
    # gather are far cheaper to compile than a sort.
    steps = jnp.arange(t.shape[0], dtype=jnp.int32)
    first = jnp.full((num_blocks,), t.shape[0], jnp.int32).at[key].min(
        jnp.where(write, steps, t.shape[0]))
    return write & (first[key] != steps)
  # Steps that write nothing get distinct keys that no block has.
  key = xp.where(write, key, -1 - xp.arange(t.shape[0], dtype=np.int32))
  order = (np.argsort(key, kind="stable") if xp is np
           else jnp.argsort(key, stable=True))
  ordered = key[order]
  repeat = xp.concatenate([xp.zeros((1,), bool), ordered[1:] == ordered[:-1]])
  bad = xp.zeros(t.shape[0], bool)
  if xp is np:
    bad[order] = repeat
    return bad
  return bad.at[order].set(repeat)


def _report(ctx, state, failures, xp):
  """Records, for each (bad, template, values), the first step ``bad`` holds.

  With constant tables the earliest failure raises now; on a tie the one
  listed first wins, as the error word does at run time.
  """
  if xp is np:
    found = [(int(np.argmax(bad)), k) for k, (bad, _, _) in
             enumerate(failures) if bad.any()]
    if found:
      step, k = min(found)
      _, template, values = failures[k]
      checks.raise_static(ctx.sites, template, list(values[step]), step)
    return state
  if not failures:
    return state
  # A pending run orders records by position, not by step: so only the
  # failures at the earliest failing step are recorded, and one flush folds
  # them (the first listed wins a tie, as above).
  never = jnp.int32(np.iinfo(np.int32).max)
  firsts = [jnp.where(jnp.any(bad), jnp.argmax(bad).astype(jnp.int32), never)
            for bad, _, _ in failures]
  earliest = firsts[0]
  for first in firsts[1:]:
    earliest = jnp.minimum(earliest, first)
  for (_, template, values), first in zip(failures, firsts, strict=True):
    row = lax.dynamic_index_in_dim(values, first, keepdims=False)
    state = checks.record(state, ctx.sites, first,
                          (first == earliest) & (first != never), template,
                          [row[i] for i in range(values.shape[1])])
  return checks.flush(state)


class _NotNumpy(Exception):
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


def _numpy_eval(jaxpr, consts, args):
  """Evaluates a ref-free integer index map on NumPy arrays (one per step).

  Eager JAX ops would compile one small XLA program per primitive on the
  first call (about 30 ms each); NumPy needs none. Raises _NotNumpy for
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
      outs = _numpy_eval(inner, getattr(closed, "consts", ()), invals)
    elif name == "convert_element_type":
      outs = [invals[0].astype(eqn.params["new_dtype"])]
    elif name in _NUMPY_RULES and not any(
        np.asarray(v).dtype.kind == "f" for v in invals):
      outs = [_NUMPY_RULES[name](*invals)]
    else:
      raise _NotNumpy(name)
    for var, val in zip(eqn.outvars, outs, strict=True):
      if np.shape(val) not in ((), np.shape(args[0]) if args and args[0]
                               is not None else ()):
        raise _NotNumpy(name)
      env[var] = np.asarray(val)
  return [read(v) for v in jaxpr.outvars]


def _numpy_tables(operands, coords):
  """The block index tables of ref-free index maps, computed with NumPy."""
  n = coords.shape[0]
  columns = [coords[:, d] for d in range(coords.shape[1])]
  tables = []
  for op in operands:
    closed = op.mapping.index_map_jaxpr
    # Scalar-prefetch refs follow the coordinates; these maps never read them.
    unused = [None] * (len(closed.jaxpr.invars) - len(columns))
    outs = _numpy_eval(closed.jaxpr, closed.consts, columns + unused)
    tables.append(np.stack([np.broadcast_to(o, (n,)).astype(np.int32)
                            for o in outs], axis=1) if outs
                  else np.zeros((n, 0), np.int32))
  return tables


def _eval_all(ctx, state, operands, steps, coords, scalar_handles):
  """Every operand's block indices at every step: [num_steps, ndim] each."""
  # Index maps see only the scalar-prefetch buffers and a fresh error word,
  # so maps that read no ref give concrete tables.
  buffers = {h.buffer_id: state.read(h.buffer_id) for h in scalar_handles}
  checked = checks.ERROR_ID in state.buffers
  num_sites = len(ctx.sites.templates) if ctx.sites else 0

  def one(step, row):
    local = KernelState(
        {**buffers, **({checks.ERROR_ID: checks.initial_word()}
                       if checked else {})})
    here = dataclasses.replace(ctx, grid_step=step)
    coords_here = [row[d] for d in range(row.shape[0])]
    outs = []
    for op in operands:
      local, out = eval_index_map(here, local, op, coords_here,
                                  scalar_handles)
      outs.append(jnp.stack([jnp.asarray(o, jnp.int32) for o in out])
                  if out else jnp.zeros((0,), jnp.int32))
    return outs, checks.flush(local).buffers.get(checks.ERROR_ID)

  if any(_reads_refs(op) for op in operands):
    tables, words = jax.vmap(one)(jnp.asarray(steps), jnp.asarray(coords))
  else:
    try:
      return _numpy_tables(operands, coords), state
    except _NotNumpy:
      pass
    # Evaluated now, on concrete values. Outside any enclosing mesh: inside
    # a shard_map body the manual mesh would be given to the eager arrays.
    with jax.ensure_compile_time_eval(), jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((), ())):
      tables, words = jax.vmap(one)(np.asarray(steps), np.asarray(coords))
    tables = [np.asarray(t) for t in tables]
  if checked and ctx.sites and len(ctx.sites.templates) > num_sites:
    state = checks.merge_first(state, words)
  return tables, state
