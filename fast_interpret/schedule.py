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
     bounds-checked like any other, except reads at a grid coordinate of a
     table that spans its axis: those cannot fail).
  2. Derive the write-back flags from consecutive rows and each core's last
     step.
  3. Check block indices and output revisits over the whole table, all in
     one boolean matrix (``_check_table``). With a constant table a failure
     raises while tracing; otherwise one reduction finds the first failing
     step's first check, and one record puts it in the error word.

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
from fast_interpret.state import KernelState, as_int32

# A table row costs 4 bytes per column; beyond this many steps the table
# would outweigh what it saves, and index maps are evaluated per step.
MAX_TABLE_STEPS = 1 << 20
# Run-time revisit checks scatter into a table of an output's blocks up to
# this size; beyond it they sort the steps' block keys instead.
_MAX_SCATTER_BLOCKS = 1 << 22
# Per-step revisit checks of an output of up to this many blocks keep its
# table as a bit set, updated with a mask over the whole of it; larger ones
# as one bool per block, with a dynamic update.
_MAX_BIT_SET_BLOCKS = 1 << 10


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

  @property
  def private_ids(self) -> set[int]:
    """Ids in ``buffers`` each simulated core holds its own copy of: none."""
    return set()

  def finish(self, ctx, state, last_step):
    """Checks after a one-core loop: none (the table was checked)."""
    del ctx, last_step
    return state

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
    blocks, state = _eval_all(ctx, state, operands, grid, steps, coords,
                              scalar_handles)
    xp = np if isinstance(blocks, np.ndarray) else jnp
    starts = _starts(operands)
    index_cols = [slice(coords.shape[1] + starts[k],
                        coords.shape[1] + starts[k + 1])
                  for k in range(len(operands))]
    outputs = [k for k in range(num_inputs, len(operands))
               if operands[k].block_id is not None]
    columns, write_cols, writes, padded = [coords, blocks], {}, None, None
    if outputs:
      # An output's block goes back to HBM when the next step maps it to
      # another block, and at each core's last step.
      padded = _padded_blocks(xp, blocks, starts, outputs)
      writes = _write_flags(xp, padded, last_of_core)
      columns.append(writes.astype(np.int32) if xp is np
                     else lax.convert_element_type(writes, np.int32))
      start = coords.shape[1] + starts[-1]
      write_cols = {k: start + i for i, k in enumerate(outputs)}
    state = _check_table(ctx, state, operands, blocks, starts, outputs,
                         padded, writes, check_revisits, xp)
    table = (np.concatenate(columns, axis=1) if xp is np
             else lax.concatenate([as_int32(c) for c in columns], 1))
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
    if isinstance(table, np.ndarray):
      table = jnp.asarray(table)  # One constant for every read below.
    width = table.shape[1]

    # lax.dynamic_slice, not dynamic_index_in_dim (a jitted call while
    # tracing, with a jaxpr of its own to lower). Steps are never negative:
    # no index wrap-around (a compare, add and select, copied into every
    # fusion that reads the row).
    def read_row():
      return lax.squeeze(
          lax.dynamic_slice(table, (step, 0), (1, width),
                            allow_negative_indices=False), (0,))

    def read_entry(d):
      return lax.reshape(
          lax.dynamic_slice(table, (step, np.int32(d)), (1, 1),
                            allow_negative_indices=False), ())

    if not isinstance(self._table, np.ndarray):
      return state, self._row(read_row())
    # Only a constant table is read again inside a branch: a table computed
    # at run time would enter every such branch as an operand, which XLA
    # may copy (paged attention ran 2.5x slower per call).
    return state, self._row(read_row(), read_entry, self._fixed_columns())

  def _fixed_columns(self) -> dict[int, int]:
    """Block-index and write-flag columns of a constant table that hold
    one value at every step, and that value.

    Those entries are ints, as known while tracing: half the block indices
    of the attention kernels (a head-dimension block, an operand's whole
    window). Coordinates stay traced: conditionals recognise program ids by
    identity (``RuleContext.remat``).
    """
    t = self._table
    same = np.all(t == t[:1], axis=0)
    return {int(c): int(t[0, c]) for c in np.flatnonzero(same)
            if c >= self._num_coords}

  def _row(self, row, coord_fn=None, fixed=None) -> Row:
    """The Row of one step's table row: a list of ints, or a traced vector
    (``fixed``: the columns known while tracing, ``_fixed_columns``).

    A traced row's entries are taken with ``lax`` calls: ``row[c]`` and
    ``row[c] > 0`` are jitted wrappers each while tracing.
    """
    if isinstance(row, list):
      entry, positive = row.__getitem__, lambda x: x > 0
    else:
      fixed = fixed or {}
      entries = {**_entries(row, [c for c in range(row.shape[0])
                                  if c not in fixed]), **fixed}
      entry = entries.__getitem__
      positive = lambda x: (x > 0 if isinstance(x, int)
                            else lax.gt(x, np.int32(0)))
    coords = tuple(entry(d) for d in range(self._num_coords))
    indices = [tuple(entry(c) for c in range(s.start, s.stop))
               for s in self._index_cols]
    writes = {k: positive(entry(c)) for k, c in self._write_cols.items()}
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


def _entries(row, columns: list[int]) -> dict[int, Any]:
  """``{c: row[c]}`` (scalars) for the increasing ``columns`` of ``row``.

  One ``lax.split`` of the row and a reshape per entry: half the equations
  of a slice and a squeeze per entry, for the same slices in the HLO.
  """
  if not columns:
    return {}
  sizes, pieces, end = [], [], 0
  for c in columns:
    if c > end:  # Columns between: a piece nothing reads.
      sizes.append(c - end)
    pieces.append(len(sizes))
    sizes.append(1)
    end = c + 1
  if end < row.shape[0]:
    sizes.append(row.shape[0] - end)
  parts = lax.split(row, sizes)
  return {c: lax.reshape(parts[k], ()) for c, k in zip(columns, pieces,
                                                      strict=True)}


class StepwiseSchedule:
  """Index maps evaluated inside the loop, at each step for that step.

  An output block goes back to HBM after a step when the next step maps it
  to another block, or after the core's last step. For the revisit check,
  each step compares its output blocks with the previous step's, carried in
  the loop state, and so decides the previous step's write-back, rather
  than evaluate the next step's index maps (coordinates and all). Only
  flagged write-backs (``write_backs``) still read the next step's maps.
  """

  def __init__(self, ctx, grid, operands, num_inputs: int, scalar_handles,
               check_revisits: bool, permutations=(),
               last_after_loop: bool = False):
    self._grid = grid
    self._permutations = permutations
    self._operands = operands
    self._num_inputs = num_inputs
    self._scalars = scalar_handles
    self._last_after_loop = last_after_loop
    # Revisits are found with a table of each output's blocks (flat,
    # row-major), marked at every write-back (shared between simulated
    # cores, like HBM).
    self.visited: dict[int, int] = {}
    # Per checked output, a scalar: the previous step's block as a position
    # in its table, -1 for none (a core's first step) or a block outside
    # the array (no visit). Private to each simulated core.
    self._previous: dict[int, int] = {}
    self.buffers: dict[int, Any] = {}
    for k, op in enumerate(operands):
      if (check_revisits and k >= num_inputs and op.block_id is not None
          and revisit_grid(op) is not None):
        self.visited[k] = ctx.fresh_buffer_id()
        self.buffers[self.visited[k]] = _visited_table(
            math.prod(revisit_grid(op)))
        self._previous[k] = ctx.fresh_buffer_id()
        self.buffers[self._previous[k]] = jnp.int32(-1)
    # With one core (no per-core copies to keep apart), the scalars of every
    # checked output live in one int32 vector (``_Packed``) when the
    # tables are bit sets of one word: one carried buffer, updated by one
    # fused kernel, where separate scalars cost a copy each at the top of
    # the loop body (the old value is read after the new one is made).
    self._packed = None
    if (last_after_loop and self._previous
        and all(self.buffers[v].shape == () for v in self.visited.values())):
      self._packed = _Packed(ctx.fresh_buffer_id(), self._previous,
                             self.visited)
      self.buffers = {self._packed.buffer_id: self._packed.initial()}

  def _read(self, state, slot_id):
    if self._packed is None:
      return state.read(slot_id)
    return self._packed.read(state, slot_id)

  def _write(self, state, slot_id, value):
    if self._packed is None:
      return state.write(slot_id, value)
    return self._packed.write(state, slot_id, value)

  @property
  def private_ids(self) -> set[int]:
    """Ids in ``buffers`` that each simulated core holds its own copy of."""
    if self._packed is not None:
      return set()
    return set(self._previous.values())

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
    if ctx.ranges is not None:
      # Each coordinate lies in its grid axis (as a program id does): a
      # block index that is a coordinate, or an SMEM read at one, needs no
      # check where the axis fits (ranges.py).
      for c, n in zip(coords, self._grid, strict=True):
        if isinstance(n, (int, np.integer)):
          ctx.ranges.set(c, 0, int(n) - 1)
    # Records pending before the index maps (none: each step ends with a
    # flush) stay ahead of the previous step's revisits.
    num_pending = len(state.pending)
    state, found = self._indices(ctx, state, coords)
    indices = [found[k] for k in range(len(self._operands))]
    state = self._check_previous(ctx, state, step, indices, num_pending)
    if ctx.check_bounds:
      for op, idx in zip(self._operands, indices, strict=True):
        if op.block_id is None:
          continue
        ranges = [(i, 0, limit - 1)
                  for i, limit in zip(idx, block_limits(op), strict=True)
                  if ctx.ranges is None or not ctx.ranges.within(
                      i, 0, limit - 1)]
        state = checks.record_outside(state, ctx.sites, ctx.grid_step, ranges,
                                      _block_index_template(op), list(idx))
    return state, Row(coords, indices)

  def _check_previous(self, ctx, state, step, indices, num_pending):
    """Decides the previous step's write-backs and checks their revisits.

    The previous step wrote an output block back if this step maps the
    output to another block. Its revisit is recorded as an error of the
    previous step, ahead of this step's own records (the index maps' SMEM
    reads), so that it wins over them as it did when recorded at that step.
    """
    if not self._previous:
      return state
    if state.deferred is not None:
      state = checks.flush(state)
      num_pending = 0
    ours = state.pending[num_pending:]
    state = dataclasses.replace(state, pending=state.pending[:num_pending])
    for k, prev_id in self._previous.items():
      previous = self._read(state, prev_id)
      key = _block_key(self._operands[k], indices[k])
      state = self._check_revisit(ctx, state, step - 1, k, previous,
                                  previous != key)
      state = self._write(state, prev_id, key)
    return dataclasses.replace(state, pending=(*state.pending, *ours))

  def finish(self, ctx, state, last_step):
    """Checks the last step's write-backs, after a one-core loop."""
    if not self._last_after_loop:
      return state
    for k, prev_id in self._previous.items():
      state = self._check_revisit(ctx, state, last_step, k,
                                  self._read(state, prev_id), True)
    return checks.flush(state)

  def write_backs(self, ctx, state, step, row: Row, is_last, flagged=None):
    if not self._last_after_loop:
      # A core's last step writes its blocks back: checked now, ahead of
      # the checks that end the core (semaphores), as at every step.
      for k in self._previous:
        state = self._check_revisit(
            ctx, state, step, k,
            _block_key(self._operands[k], row.block_indices[k]), is_last)
    outputs = [k for k, op in enumerate(self._operands)
               if k >= self._num_inputs and op.block_id is not None
               and (flagged is None or k in flagged)]
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
      changed = False
      for a, b in zip(row.block_indices[k], nxt[k], strict=True):
        changed = changed | (jnp.asarray(a) != jnp.asarray(b))
      writes[k] = is_last | changed
    return state, writes

  def _check_revisit(self, ctx, state, step, k: int, key, write):
    """Records a write-back at ``step`` of block ``key`` written before.

    ``key`` is the block's position in the table (``_block_key``); -1
    (none, or outside the array) is no visit.
    """
    op = self._operands[k]
    visited = self._read(state, self.visited[k])
    write = write & (key >= 0)
    if visited.dtype == jnp.int32:
      # A bit set: scalar code, which XLA fuses with the step's other
      # scalar code (and one word, for up to 32 blocks, is a scalar),
      # where a dynamic slice and update of the carried table are kernels
      # (and copies of the table) of their own on XLA:CPU.
      words = np.arange(max(visited.size, 1), dtype=np.int32).reshape(
          visited.shape)
      here = words == lax.shift_right_arithmetic(key, np.int32(5))
      bit = lax.shift_left(np.int32(1), lax.bitwise_and(key, np.int32(31)))
      seen = jnp.any(here & (lax.bitwise_and(visited, bit) != 0))
      new = lax.bitwise_or(visited, lax.select(
          here & write, lax.broadcast(bit, visited.shape),
          np.zeros(visited.shape, np.int32)))
    else:
      at = jnp.maximum(key, 0)
      seen = lax.dynamic_index_in_dim(visited, at, keepdims=False)
      new = lax.dynamic_update_index_in_dim(visited, seen | write, at, 0)
    shape = revisit_grid(op)
    values = [lax.rem(lax.div(key, np.int32(math.prod(shape[d + 1:]))),
                      np.int32(n)) for d, n in enumerate(shape)]
    state = checks.record(state, ctx.sites, step, write & seen,
                          _revisit_template(op), values)
    return self._write(state, self.visited[k], new)


class _Packed:
  """The revisit check's scalars (see ``StepwiseSchedule``) in one vector.

  Each scalar buffer id of the schedule (an output's previous block, or
  its one-word bit set) names a slot of one carried int32 vector: the
  previous blocks first, then the bit sets.
  """

  def __init__(self, buffer_id: int, previous: dict[int, int],
               visited: dict[int, int]):
    self.buffer_id = buffer_id
    self._slots = {b: i for i, b in enumerate(
        [*previous.values(), *visited.values()])}
    self._num_previous = len(previous)

  def initial(self):
    """No previous block (-1), no block visited (0)."""
    return jnp.asarray(np.array(
        [-1] * self._num_previous + [0] * (len(self._slots)
                                           - self._num_previous), np.int32))

  def read(self, state, slot_id):
    return lax.index_in_dim(state.read(self.buffer_id), self._slots[slot_id],
                            keepdims=False)

  def write(self, state, slot_id, value):
    vector, i = state.read(self.buffer_id), self._slots[slot_id]
    value = lax.broadcast(jnp.asarray(value, jnp.int32), (1,))
    return state.write(self.buffer_id, lax.concatenate(
        [lax.slice_in_dim(vector, 0, i), value,
         lax.slice_in_dim(vector, i + 1, vector.shape[0])], 0))


def _visited_table(num_blocks: int):
  """A table of ``num_blocks`` flags, none set (see ``_check_revisit``).

  Up to ``_MAX_BIT_SET_BLOCKS`` blocks: a bit set of int32 words, a scalar
  for one word; beyond: one bool per block.
  """
  if num_blocks > _MAX_BIT_SET_BLOCKS:
    return jnp.zeros(num_blocks, bool)
  words = -(-num_blocks // 32)
  return jnp.int32(0) if words == 1 else jnp.zeros(words, jnp.int32)


def _block_key(op, block_indices):
  """The block's position in ``op``'s revisit table; -1 outside the array."""
  shape = revisit_grid(op)
  key, inside = jnp.int32(0), True
  for i, n in zip(block_indices, shape, strict=True):
    i = jnp.asarray(i, jnp.int32)
    inside = inside & (i >= 0) & (i < n)
    key = key * np.int32(n) + i
  return jnp.where(inside, key, np.int32(-1))


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
         check_revisits: bool, permutations=None,
         last_after_loop: bool = False):
  """The schedule for this call: a table where possible (see module doc).

  Args:
    last_of_core: bool per step, True at each core's last step; None when
      the number of steps is not static.
    permutations: per grid dimension, None or the order in which its
      coordinates run (``random_seed``, see cores.py).
    last_after_loop: whether the caller runs one core and calls
      ``finish`` after the loop, and nothing is recorded after a step's
      write-backs: the last step's revisit check can then wait for it.
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
                              scalar_handles, check_revisits, permutations,
                              last_after_loop)
  return schedule, state


def _starts(operands) -> list[int]:
  """Where each operand's block indices start in the block table (and end)."""
  widths = [len(op.mapping.index_map_jaxpr.jaxpr.outvars) for op in operands]
  return [0, *np.cumsum(widths).tolist()]


def _padded_blocks(xp, blocks, starts, outputs):
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


def _write_flags(xp, padded, last_of_core):
  """[num_steps, outputs] bool: the output's block goes back to HBM here.

  That is when the next step maps the output to another block, at the
  last step, and at each core's last step. ``padded``: ``_padded_blocks``.
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


def _check_table(ctx, state, operands, blocks, starts, outputs, padded,
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
    padded: their block indices (``_padded_blocks``), or None.
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
      reports.extend([(_block_index_template(op), cols)] * len(cols))
    if xp is np:
      parts.append((blocks < lo) | (blocks > hi))
    else:
      row = lambda v: lax.broadcast_in_dim(v, blocks.shape, (1,))
      parts.append(lax.bitwise_or(lax.lt(blocks, row(lo)),
                                  lax.gt(blocks, row(hi))))
  if revisited:
    parts.append(_revisits(xp, operands, outputs, padded, writes,
                           revisited))
    reports.extend((_revisit_template(operands[outputs[i]]),
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
  """The block table of ref-free index maps, computed with NumPy."""
  n = coords.shape[0]
  columns = [coords[:, d] for d in range(coords.shape[1])]
  outs = []
  for op in operands:
    closed = op.mapping.index_map_jaxpr
    # Scalar-prefetch refs follow the coordinates; these maps never read them.
    unused = [None] * (len(closed.jaxpr.invars) - len(columns))
    outs.extend(_numpy_eval(closed.jaxpr, closed.consts, columns + unused))
  return (np.stack([np.broadcast_to(o, (n,)).astype(np.int32) for o in outs],
                   axis=1) if outs else np.zeros((n, 0), np.int32))


def _eval_all(ctx, state, operands, grid, steps, coords, scalar_handles):
  """Every block index at every step: [num_steps, all operands' block dims].

  The columns of each operand follow those of the one before (``_starts``).
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

  if any(_reads_refs(op) for op in operands):
    table, words = jax.vmap(one)(jnp.asarray(steps), jnp.asarray(coords))
  else:
    try:
      return _numpy_tables(operands, coords), state
    except _NotNumpy:
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
