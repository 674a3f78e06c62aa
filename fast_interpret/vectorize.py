"""Vectorised grids: every grid step at once, with ``jax.vmap``, when safe.

The grid loop (grid.py) runs one step after another, because a step may see
what an earlier one left behind: an accumulator in an output block, scratch,
a semaphore, an aliased HBM block. Many kernels need none of that: each step
reads its input blocks and overwrites its output blocks. For those, the
loop costs far more than the work (about 0.3 ms for 4096 steps of ``x + 1``
on 32 KB, where XLA takes 0.01 ms). Here such a grid runs as one ``vmap`` of
the step body over the steps.

Stages:
  1. ``plan`` decides, while tracing, whether the grid is step-independent
     (conditions below) and which steps matter. It logs its decision on the
     ``fast_interpret.vectorize`` logger (DEBUG) and returns None to keep the
     loop.
  2. ``run`` gathers every step's input blocks from HBM with the static
     block-index table, vmaps the step body (the same ``begin_step`` set-up
     as the loop), and scatters each output block to HBM at the step that
     writes it back. Steps run in chunks whose blocks take at most
     ``CHUNK_BYTES`` (a ``lax.scan`` over chunks, when there are many).
  3. Steps whose outputs are overwritten before any write-back are run
     again, outputs dropped, only when the body records runtime checks: their
     errors count, their results do not (XLA removes that dead work). Errors
     of all steps merge so that the earliest grid step wins, as in the loop.

A grid is vectorised only when all of these hold (anything else keeps the
loop, so the answer never changes):
  * the schedule is a table known while tracing, of two steps or more, on
    one core;
  * no scratch operands, and the kernel writes no buffer but its blocks;
  * the body uses only loads, stores, program ids, control flow and pure
    primitives (no DMA, semaphore, PRNG, barrier, remote op or print);
  * every operand is blocked (no ``pl.ANY``/HBM memory space);
  * each output is stored only by whole-block stores at the top level of the
    body (so unconditionally), never read, and written back at most once;
    its blocks use no ``pl.Element`` dimension and lie inside the array;
  * an input aliased to an output never reads a block that an earlier step
    wrote back;
  * the body has no big matmul (``BIG_DOT_MACS`` per step): vmap of a dot is
    slower than the loop.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import interpreter
from fast_interpret import schedule as schedule_lib
from fast_interpret.state import KernelState

logger = logging.getLogger("fast_interpret.vectorize")

# Blocks gathered for one chunk of steps stay under this many bytes.
CHUNK_BYTES = 16 << 20
# A body with this many multiply-adds per step in dots keeps the loop.
BIG_DOT_MACS = 1 << 20

# Primitives with rules that are safe to batch: they touch only the step's
# own blocks. Pure primitives without a rule are safe too.
_BATCHABLE = frozenset({
    _jax.get_p, _jax.swap_p, _jax.addupdate_p, _jax.masked_load_p,
    _jax.masked_swap_p, _jax.program_id_p, _jax.num_programs_p,
    _jax.multiple_of_p, _jax.cond_p, _jax.while_p, _jax.scan_p, _jax.jit_p,
    _jax.delay_p, _jax.roll_p, _jax.tpu_bitcast_p, _jax.pack_elementwise_p,
    _jax.unpack_elementwise_p,
})


@dataclasses.dataclass(frozen=True)
class Kernel:
  """What ``run`` needs from the grid driver (grid.py).

  Attributes:
    jaxpr: the kernel body.
    operands: every operand (grid.Operand), inputs first.
    num_inputs: how many of ``operands`` are inputs.
    begin_step: ``(state, step, row, blocks) -> grid.StepStart``.
    read_block: ``(hbm, op, block indices) -> block``, as the loop reads it.
    to_storage: ``(block, op) -> block`` as HBM stores it.
  """

  jaxpr: _jax.Jaxpr
  operands: list[Any]
  num_inputs: int
  begin_step: Callable[..., Any]
  read_block: Callable[..., Any]
  to_storage: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  """A vectorised grid.

  Attributes:
    rows: the steps whose outputs are written back (schedule.StaticRows).
    others: the remaining steps, run for their checks only.
    chunk: steps per chunk.
  """

  rows: schedule_lib.StaticRows
  others: schedule_lib.StaticRows
  chunk: int


def plan(kernel: Kernel, schedule, *, num_scalars: int, num_scratch: int,
         written: set[int], out_to_in: dict[int, int], num_cores: int,
         kernel_name: str) -> Plan | None:
  """The vectorised plan of a call, or None to keep the grid loop.

  Args:
    kernel: the kernel and its operands.
    schedule: the call's schedule (schedule.make).
    num_scalars: scalar-prefetch operands (the body's first refs).
    num_scratch: scratch operands.
    written: buffer ids the body may write.
    out_to_in: output position -> aliased input position.
    num_cores: simulated cores.
    kernel_name: for the log line.

  Returns:
    The plan, or None (the reason is logged at DEBUG level).
  """
  rows = schedule.static_rows()
  why = _why_not(kernel, rows, num_scalars, num_scratch, written, out_to_in,
                 num_cores)
  if why is not None:
    logger.debug("kernel %r: grid loop, not vectorised: %s", kernel_name, why)
    return None
  outs = kernel.operands[kernel.num_inputs:]
  write_any = np.zeros(len(rows), bool)
  for w in rows.writes.values():
    write_any |= w
  per_step = sum(math.prod(op.mapping.block_aval.shape)
                 * np.dtype(op.mapping.block_aval.dtype).itemsize
                 for op in kernel.operands[:kernel.num_inputs])
  chunk = max(1, CHUNK_BYTES // max(per_step, 1))
  vplan = Plan(rows.take(np.nonzero(write_any)[0]),
               rows.take(np.nonzero(~write_any)[0]), chunk)
  logger.debug(
      "kernel %r: vectorised %d grid steps (%d write %d output(s) back), "
      "in chunks of up to %d steps", kernel_name, len(rows),
      len(vplan.rows), len(outs), chunk)
  return vplan


def _why_not(kernel, rows, num_scalars, num_scratch, written, out_to_in,
             num_cores) -> str | None:
  """Why the grid must keep the loop; None when it can be vectorised."""
  ops = kernel.operands
  outs = ops[kernel.num_inputs:]
  if rows is None:
    return "the schedule is not a table known while tracing"
  if len(rows) < 2:
    return "a single grid step runs without a loop already"
  if num_cores != 1:
    return f"{num_cores} simulated cores"
  if num_scratch:
    return "scratch operands carry state between steps"
  for op in ops:
    if op.block_id is None:
      return f"operand {op.name} is not blocked (memory space ANY/HBM)"
  if written - {op.block_id for op in ops}:
    return "the body writes a buffer other than its blocks"
  why = _body_why_not(kernel.jaxpr)
  if why is None:
    why = _stores_why_not(kernel.jaxpr, num_scalars + kernel.num_inputs, outs)
  if why is not None:
    return why
  for k, op in enumerate(outs, start=kernel.num_inputs):
    if not _viewable(op):
      return f"output {op.name} has a pl.Element block dimension"
    t, w = rows.block_indices[k], rows.writes[k]
    if not _in_range(op, t):
      return f"output {op.name} has block indices outside the array"
    keys = _keys(op, t[w])
    if len(np.unique(keys)) != len(keys):
      return f"output {op.name} is written back twice to the same block"
  for o, i in out_to_in.items():
    if not _alias_safe(ops[i], kernel.operands[kernel.num_inputs + o],
                       rows.block_indices[i],
                       rows.block_indices[kernel.num_inputs + o],
                       rows.writes[kernel.num_inputs + o]):
      return (f"input {ops[i].name} reads a block its aliased output wrote "
              "back at an earlier step")
  return None


def _body_why_not(jaxpr, macs: list[int] | None = None) -> str | None:
  """Why the body cannot be batched (a primitive, a big dot), or None."""
  top = macs is None
  macs = [0] if top else macs
  for eqn in jaxpr.eqns:
    prim = eqn.primitive
    if prim not in _BATCHABLE and (interpreter.has_rule(prim)
                                   or not interpreter.is_pure(eqn)):
      return f"the body uses {prim.name}"
    if prim.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      macs[0] += math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in contract)
    for sub in _jax.jaxprs_in_params(eqn.params):
      why = _body_why_not(sub, macs)
      if why is not None:
        return why
  if top and macs[0] >= BIG_DOT_MACS:
    return (f"the body has dots of {macs[0]} multiply-adds per step (a "
            "batched dot is slower than the loop)")
  return None


def _stores_why_not(jaxpr, first_out: int, outs) -> str | None:
  """Whether each output is only stored whole, at the top level, unread."""
  out_vars = {jaxpr.invars[first_out + k]: op for k, op in enumerate(outs)}
  used = collections.Counter(v for eqn in jaxpr.eqns for v in eqn.invars
                             if isinstance(v, _jax.Var))
  used.update(v for v in jaxpr.outvars if isinstance(v, _jax.Var))
  stores = collections.Counter()
  for eqn in jaxpr.eqns:
    for pos, v in enumerate(eqn.invars):
      if not isinstance(v, _jax.Var) or v not in out_vars:
        continue
      name = out_vars[v].name
      if eqn.primitive is not _jax.swap_p or pos != 0:
        return (f"output {name} is used by {eqn.primitive.name} (read, "
                "stored in part, or under control flow)")
      if not _whole(eqn) or used[eqn.outvars[0]]:
        return f"output {name} is read, or stored in part"
      stores[v] += 1
  for v, op in out_vars.items():
    if not stores[v]:
      return f"output {op.name} is not stored at every step"
  return None


def _whole(eqn) -> bool:
  """Whether a swap equation stores its ref's whole block."""
  shape = eqn.invars[0].aval.inner_aval.shape
  for t in _jax.tree_unflatten(eqn.params["tree"], eqn.invars[2:]):
    if not isinstance(t, _jax.NDIndexer) or tuple(t.shape) != tuple(shape):
      return False
    for idx, n in zip(t.indices, shape, strict=True):
      start = idx.start.val if isinstance(idx, _jax.Slice) and isinstance(
          idx.start, _jax.Literal) else getattr(idx, "start", None)
      if not (isinstance(idx, _jax.Slice) and isinstance(start, int)
              and start == 0 and idx.size == n and idx.stride == 1):
        return False
  return True


def _alias_safe(inp, out, t_in, t_out, write) -> bool:
  """No step reads an input block its aliased output wrote back earlier."""
  if not (_viewable(inp) and _viewable(out) and inp.block_sizes
          == out.block_sizes and _in_range(inp, t_in)):
    return False
  first = np.full(_num_blocks(out), np.iinfo(np.int64).max)
  steps = np.arange(len(write))
  np.minimum.at(first, _keys(out, t_out[write]), steps[write])
  return not np.any(first[_keys(inp, t_in)] < steps)


# --- Blocks as rows: HBM viewed as [number of blocks, *block] --------------


def _grid_shape(op) -> tuple[int, ...]:
  return tuple(p // b for p, b in zip(op.padded_shape, op.block_sizes,
                                      strict=True))


def _num_blocks(op) -> int:
  return math.prod(_grid_shape(op))


def _viewable(op) -> bool:
  return not any(isinstance(d, _jax.Element) for d in op.mapping.block_shape)


def _in_range(op, t) -> bool:
  return bool(np.all((t >= 0) & (t < np.asarray(_grid_shape(op)))))


def _keys(op, t):
  """The flat block number of each row of block indices ``t``."""
  key = 0
  for d, n in enumerate(_grid_shape(op)):
    key = key * n + t[:, d]
  return key


def _view(x, op):
  g, b = _grid_shape(op), op.block_sizes
  nd = len(g)
  x = x.reshape([n for pair in zip(g, b) for n in pair])
  x = x.transpose([*range(0, 2 * nd, 2), *range(1, 2 * nd, 2)])
  return x.reshape((math.prod(g), *b))


def _unview(x, op):
  g, b = _grid_shape(op), op.block_sizes
  nd = len(g)
  x = x.reshape((*g, *b))
  x = x.transpose([i for d in range(nd) for i in (d, nd + d)])
  return x.reshape(op.padded_shape)


def _gather(kernel: Kernel, hbm, op, t):
  """(blocks of ``op`` at rows ``t``, vmap axis): None when all are one."""
  if isinstance(t, np.ndarray) and np.all(t == t[:1]):
    return kernel.read_block(hbm, op, tuple(int(i) for i in t[0])), None
  if not (_viewable(op) and isinstance(t, np.ndarray) and _in_range(op, t)):
    # The loop's own read, batched: it clamps, or fills the parts outside
    # the array (out_of_bounds_reads="uninitialized"), as the loop does.
    return jax.vmap(lambda idx: kernel.read_block(
        hbm, op, tuple(idx[d] for d in range(idx.shape[0]))))(
            jnp.asarray(t)), 0
  keys = _keys(op, t)
  view = _view(hbm, op)
  if not np.array_equal(keys, np.arange(view.shape[0])):
    view = view[keys]
  if op.squeezed:
    view = lax.squeeze(view, [d + 1 for d in op.squeezed])
  dtype = op.mapping.array_aval.dtype
  if view.dtype != dtype:
    view = lax.bitcast_convert_type(view, dtype)
  return view, 0


def _gather_dynamic(kernel: Kernel, hbm, op, t):
  """``_gather`` for rows known only at run time (inside the chunk scan)."""
  return jax.vmap(lambda idx: kernel.read_block(
      hbm, op, tuple(idx[d] for d in range(idx.shape[0]))))(t), 0


def _scatter(kernel: Kernel, hbm, op, blocks, t, write):
  """``hbm`` with ``blocks`` written at the rows where ``write`` holds."""
  blocks = kernel.to_storage(blocks, op)
  if op.squeezed:
    blocks = lax.expand_dims(blocks, [d + 1 for d in op.squeezed])
  n = _num_blocks(op)
  if isinstance(t, np.ndarray):
    rows = np.nonzero(write)[0]
    if not len(rows):
      return hbm
    keys = _keys(op, t[rows])
    if len(rows) != len(write):
      blocks = blocks[rows]
    if np.array_equal(np.sort(keys), np.arange(n)):
      # Every block written once: the blocks, reordered, are the array.
      order = np.argsort(keys)
      return _unview(blocks if np.array_equal(order, np.arange(n))
                     else blocks[order], op)
    return _unview(_view(hbm, op).at[keys].set(blocks, unique_indices=True),
                   op)
  keys = jnp.where(write, _keys(op, t), n)
  return _unview(_view(hbm, op).at[keys].set(blocks, mode="drop"), op)


# --- Running the steps -----------------------------------------------------


def run(vplan: Plan, kernel: Kernel, state: KernelState, sites
        ) -> dict[int, Any]:
  """Runs the vectorised grid; returns the output HBM buffers and error word.

  Args:
    vplan: from ``plan``.
    kernel: the kernel and its operands.
    state: the state before the grid (HBM, initial blocks, error word).
    sites: the kernel's check sites, or None.
  """
  outs = kernel.operands[kernel.num_inputs:]
  hbm = {op.hbm_id: state.read(op.hbm_id) for op in outs}
  word = state.buffers.get(checks.ERROR_ID)
  # Each step starts from a fresh error word; the merge orders them by step.
  base = state if word is None else state.write(checks.ERROR_ID,
                                                checks.initial_word())
  num_sites = len(sites.templates) if sites else 0
  hbm, word = _run_rows(vplan.rows, vplan.chunk, kernel, base, hbm, word,
                        keep=True)
  if word is not None and len(sites.templates) > num_sites and len(
      vplan.others):
    _, word = _run_rows(vplan.others, vplan.chunk, kernel, base, {}, word,
                        keep=False)
  return {**hbm, **({} if word is None else {checks.ERROR_ID: word})}


def _run_rows(rows, chunk: int, kernel, base, hbm, word, keep: bool):
  """Runs ``rows`` in chunks: a scan over whole chunks, then the rest."""
  n = len(rows)
  full = n // chunk if n > 2 * chunk else 0
  if full:
    xs = jax.tree_util.tree_map(
        lambda c: jnp.asarray(c[:full * chunk]).reshape(
            (full, chunk, *c.shape[1:])), rows)

    def body(carry, xs):
      hbm, word = carry
      return _chunk(kernel, base, hbm, word, xs, keep), None

    (hbm, word), _ = lax.scan(body, (hbm, word), xs)
  for start in range(full * chunk, n, chunk):
    hbm, word = _chunk(kernel, base, hbm, word,
                       rows.take(slice(start, start + chunk)), keep)
  return hbm, word


def _chunk(kernel: Kernel, base: KernelState, hbm, word, rows, keep: bool):
  """One chunk of steps: gather, vmapped body, scatter, error merge."""
  ins = kernel.operands[:kernel.num_inputs]
  outs = kernel.operands[kernel.num_inputs:]
  gather = _gather if isinstance(rows.steps, np.ndarray) else _gather_dynamic
  blocks, axes = {}, {}
  for k, op in enumerate(ins):
    blocks[op.block_id], axes[op.block_id] = gather(
        kernel, base.read(op.hbm_id), op, rows.block_indices[k])

  def one(row, blocks):
    start = kernel.begin_step(base, row.steps, row.as_row(), blocks)
    state, _ = interpreter.eval_jaxpr(start.ctx, start.state, kernel.jaxpr,
                                      (), start.args)
    state = checks.flush(state)
    return ([state.read(op.block_id) for op in outs],
            state.buffers.get(checks.ERROR_ID))

  row_axes = jax.tree_util.tree_map(lambda _: 0, rows)
  results, words = jax.vmap(one, in_axes=(row_axes, axes))(rows, blocks)
  if keep:
    hbm = dict(hbm)
    for k, (op, out) in enumerate(zip(outs, results, strict=True),
                                  start=kernel.num_inputs):
      hbm[op.hbm_id] = _scatter(kernel, hbm[op.hbm_id], op, out,
                                rows.block_indices[k], rows.writes[k])
  if word is not None:
    word = checks.merge_first(KernelState({checks.ERROR_ID: word}),
                              words).read(checks.ERROR_ID)
  return hbm, word
