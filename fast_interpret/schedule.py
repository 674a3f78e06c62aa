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
     one boolean matrix (``grid_tables.check_table``). With a constant
     table a failure raises while tracing; otherwise one reduction finds the
     first failing step's first check, and one record puts it in the error
     word.

Stages 1 to 3 live in ``grid_tables``; this module holds the two schedules
and the choice between them (``make``).

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

from fast_interpret import checks
from fast_interpret import grid_tables
from fast_interpret.state import KernelState, as_int32

# A table row costs 4 bytes per column; beyond this many steps the table
# would outweigh what it saves, and index maps are evaluated per step.
MAX_TABLE_STEPS = 1 << 20
# Per-step revisit checks of an output of up to this many blocks keep its
# table as a bit set, updated with a mask over the whole of it; larger ones
# as one bool per block, with a dynamic update.
_MAX_BIT_SET_BLOCKS = 1 << 10


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
    blocks, state = grid_tables.eval_all(ctx, state, operands, grid, steps,
                                         coords, scalar_handles)
    xp = np if isinstance(blocks, np.ndarray) else jnp
    starts = grid_tables.starts(operands)
    index_cols = [slice(coords.shape[1] + starts[k],
                        coords.shape[1] + starts[k + 1])
                  for k in range(len(operands))]
    outputs = [k for k in range(num_inputs, len(operands))
               if operands[k].block_id is not None]
    columns, write_cols, writes, padded = [coords, blocks], {}, None, None
    if outputs:
      # An output's block goes back to HBM when the next step maps it to
      # another block, and at each core's last step.
      padded = grid_tables.padded_blocks(xp, blocks, starts, outputs)
      writes = grid_tables.write_flags(xp, padded, last_of_core)
      columns.append(writes.astype(np.int32) if xp is np
                     else lax.convert_element_type(writes, np.int32))
      start = coords.shape[1] + starts[-1]
      write_cols = {k: start + i for i, k in enumerate(outputs)}
    state = grid_tables.check_table(ctx, state, operands, blocks, starts,
                                    outputs, padded, writes, check_revisits,
                                    xp)
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
          and grid_tables.revisit_grid(op) is not None):
        self.visited[k] = ctx.fresh_buffer_id()
        self.buffers[self.visited[k]] = _visited_table(
            math.prod(grid_tables.revisit_grid(op)))
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
        state, out = grid_tables.eval_index_map(ctx, state, op, coords,
                                                self._scalars)
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
                  for i, limit in zip(idx, grid_tables.block_limits(op),
                                      strict=True)
                  if ctx.ranges is None or not ctx.ranges.within(
                      i, 0, limit - 1)]
        state = checks.record_outside(
            state, ctx.sites, ctx.grid_step, ranges,
            grid_tables.block_index_template(op), list(idx))
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
    shape = grid_tables.revisit_grid(op)
    values = [lax.rem(lax.div(key, np.int32(math.prod(shape[d + 1:]))),
                      np.int32(n)) for d, n in enumerate(shape)]
    state = checks.record(state, ctx.sites, step, write & seen,
                          grid_tables.revisit_template(op), values)
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
  shape = grid_tables.revisit_grid(op)
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
      grid_tables.reads_refs(op) for op in operands)
  if static and not reads_written:
    return TableSchedule.build(ctx, state, grid, operands, num_inputs,
                               scalar_handles, last_of_core, check_revisits,
                               permutations)
  schedule = StepwiseSchedule(ctx, grid, operands, num_inputs,
                              scalar_handles, check_revisits, permutations,
                              last_after_loop)
  return schedule, state

