"""The pallas_call driver: operands to buffers, the grid loop, block pipelining.

Stages:
  1. Lay out memory: one HBM buffer per operand (aliased input/output pairs
     share one), padded up to whole blocks with the uninitialised value; one
     VMEM/SMEM block buffer per blocked operand; scratch and semaphores.
  2. Loop over the flattened grid with one ``lax.fori_loop``. Each step
     computes the grid coordinates, evaluates every index map, slices input
     blocks out of HBM, simulates the kernel body, and writes every output
     block back into HBM at its block index.
  3. Unpad the output HBM buffers and return them.

Only buffers the kernel can change are carried by the loop: output HBM and
block buffers, scratch, and HBM operands the kernel writes through DMAs.

TPU pipelining contract kept: an output block buffer is never re-read from
HBM, so it keeps its contents across steps (accumulators work, and a kernel
that reads an output block before writing it sees stale data, as on TPU). A
block is written back to HBM only when the next step maps the output to
another block, or after the last step, as the TPU pipeline does; so an input
aliased to that output still reads the old HBM contents in between.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import cores
from fast_interpret import errors
from fast_interpret import fences
from fast_interpret import grid_tables
from fast_interpret import inflight
from fast_interpret import interpreter
from fast_interpret import ranges
from fast_interpret import remote
from fast_interpret import schedule
from fast_interpret import vectorize
from fast_interpret import views
from fast_interpret.state import (BufferIds, KernelState, RefHandle,
                                  scoped_memory_space, storage_dtype,
                                  uninitialized)

# Register every rule module.
from fast_interpret import control_rules  # pylint: disable=unused-import
from fast_interpret import debug_rules  # pylint: disable=unused-import
from fast_interpret import dma_rules
from fast_interpret import memory_rules  # pylint: disable=unused-import
from fast_interpret import program_rules  # pylint: disable=unused-import
from fast_interpret import tpu_rules
from fast_interpret import vector_rules  # pylint: disable=unused-import

_HBM_SPACES = ("any", "hbm")


@dataclasses.dataclass(frozen=True)
class StepStart:
  """One grid step, set up and ready for the kernel body.

  Attributes:
    state: the kernel state with this step's input blocks in place.
    ctx: the RuleContext of the step (grid step, program ids).
    args: the kernel's ref arguments (windowed views of HBM operands).
    starts: per operand, the element start of its block in each dimension.
  """

  state: KernelState
  ctx: Any  # interpreter.RuleContext
  args: list[Any]
  starts: list[list[Any]]


@dataclasses.dataclass(frozen=True)
class Operand:
  """One input or output of the pallas_call, as the grid loop sees it."""

  name: str
  mapping: Any  # BlockMapping
  hbm_id: int
  block_id: int | None  # None: the kernel sees the whole HBM buffer.
  block_sizes: tuple[int, ...]
  squeezed: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]  # Element padding, low/high per dim.
  padded_shape: tuple[int, ...]
  trivial_window: bool
  bits: bool = False  # HBM kept as unsigned bits (see _bits_dtype).


def _is_hbm(space) -> bool:
  value = getattr(space, "value", space)
  return isinstance(value, str) and value.lower() in _HBM_SPACES


def _block_dim(dim, size: int) -> tuple[int, bool, tuple[int, int], int]:
  """(block size, squeezed, element padding, padded array size)."""
  if isinstance(dim, _jax.Squeezed):
    return 1, True, (0, 0), size
  if isinstance(dim, _jax.Element):
    lo, hi = dim.padding
    return dim.block_size, False, (lo, hi), size + lo + hi
  if isinstance(dim, _jax.Blocked):
    b = dim.block_size
    return b, False, (0, 0), -(-size // b) * b
  if dim is None:
    return 1, True, (0, 0), size
  raise errors.UnsupportedFeatureError(
      f"block dimension {dim!r}", "pallas_call",
      "Use Blocked, Element or Squeezed block dimensions.")


def _make_operand(name, mapping, hbm_id, block_id) -> Operand:
  shape = mapping.array_aval.shape
  sizes, squeezed, padding, padded = [], [], [], []
  for d, (dim, n) in enumerate(zip(mapping.block_shape, shape, strict=True)):
    b, sq, pad, p = _block_dim(dim, n)
    sizes.append(b)
    padding.append(pad)
    padded.append(p)
    if sq:
      squeezed.append(d)
  trivial = bool(mapping.has_trivial_window()) and not any(squeezed)
  bits = block_id is not None and _bits_dtype(mapping.array_aval.dtype) is not None
  return Operand(name, mapping, hbm_id, block_id, tuple(sizes),
                 tuple(squeezed), tuple(padding), tuple(padded), trivial, bits)


def _pad(x, op: Operand, fill: str):
  if tuple(x.shape) == op.padded_shape:
    return x
  value = uninitialized((), x.dtype, fill)
  config = [(lo, p - n - lo, 0) for (lo, _), n, p in
            zip(op.padding, x.shape, op.padded_shape, strict=True)]
  return lax.pad(x, value, config)


def _unpad(x, op: Operand):
  if tuple(x.shape) == tuple(op.mapping.array_aval.shape):
    return x
  starts = [lo for lo, _ in op.padding]
  limits = [s + n for s, n in zip(starts, op.mapping.array_aval.shape,
                                  strict=True)]
  return lax.slice(x, starts, limits)


def _block_starts(op: Operand, block_indices) -> list[Any]:
  starts = []
  for dim, idx, size in zip(op.mapping.block_shape, block_indices,
                            op.block_sizes, strict=True):
    if isinstance(dim, _jax.Blocked):
      # lax.mul, not ``*``: a jnp operator on a tracer costs a jitted
      # wrapper while tracing, for every block of every step.
      starts.append(lax.mul(idx, size) if isinstance(idx, jax.Array)
                    else idx * size)
    else:
      starts.append(idx)
  # A start known while tracing (a block index the same at every step)
  # stays a NumPy scalar: jnp.asarray of an int is an equation in the loop.
  return [np.int32(s) if isinstance(s, (int, np.integer))
          else jnp.asarray(s, jnp.int32) for s in starts]


def _bits_dtype(dtype):
  """The unsigned dtype that stores a narrow float HBM buffer, or None.

  XLA:CPU has no native bf16/f16/fp8 dynamic-update-slice: it converts the
  whole buffer to f32 and back around every block write, which costs a full
  pass over HBM per grid step. Keeping the bits in an unsigned integer
  buffer makes the write touch only the block.
  """
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(f"uint{dtype.itemsize * 8}")
  return None


def _to_storage(x, op: Operand):
  if not op.bits:
    return x
  return lax.bitcast_convert_type(x, _bits_dtype(x.dtype))


def _from_storage(x, op: Operand):
  dtype = op.mapping.array_aval.dtype
  if x.dtype == dtype:
    return x
  return lax.bitcast_convert_type(x, dtype)


def _read_block(hbm, op: Operand, starts, fill: str | None = None):
  """The block of ``hbm`` at ``starts``.

  With ``fill`` (``out_of_bounds_reads="uninitialized"``) the elements of a
  block that lies partly or wholly outside the padded array read as the
  uninitialised value, as ``pltpu.InterpretParams`` reads them; otherwise
  the start is clamped into range (``dynamic_slice``; a negative start
  clamps to 0 rather than counting from the end, which would also cost a
  compare and select per dimension in every fusion). Narrow floats are
  stored as unsigned bits, whose all-ones fill is their NaN.
  """
  if op.trivial_window:
    return _from_storage(hbm, op)
  if fill is not None:
    block = views.filled_window_read(hbm, starts, op.block_sizes, fill)
  else:
    block = lax.dynamic_slice(hbm, starts, op.block_sizes,
                              allow_negative_indices=False)
  block = lax.squeeze(block, op.squeezed) if op.squeezed else block
  return _from_storage(block, op)


def _write_block(hbm, op: Operand, starts, block, write,
                 fill: str | None = None):
  """Writes ``block`` back at ``starts`` where ``write`` (a bool) holds.

  Done as slice + select + update, touching only the block, instead of a
  conditional. ``write=None`` writes unconditionally: a plain update, which
  XLA:CPU emits without a fusion kernel of its own (see ``step_steps``).
  With ``fill`` (``out_of_bounds_reads="uninitialized"``) the parts of a
  block outside the padded array are dropped rather than the start clamped
  (``pltpu.InterpretParams`` raises there).
  """
  block = _to_storage(block, op)
  if op.trivial_window:
    return block if write is None else lax.select(write, block, hbm)
  if op.squeezed:
    block = lax.expand_dims(block, op.squeezed)
  if write is not None:
    if fill is not None:
      current = views.filled_window_read(hbm, starts, block.shape, fill)
    else:
      current = lax.dynamic_slice(hbm, starts, block.shape,
                                  allow_negative_indices=False)
    block = lax.select(jnp.broadcast_to(write, block.shape), block, current)
  if fill is not None:
    return views.filled_window_write(hbm, starts, block.shape, block, fill)
  return lax.dynamic_update_slice(hbm, block, starts,
                                  allow_negative_indices=False)


def interpret_pallas_call(
    *args,
    jaxpr: _jax.Jaxpr,
    grid_mapping,
    input_output_aliases: tuple[tuple[int, int], ...],
    interpret_params,
    compiler_params=None,
    mesh=None,
    name: str | None = None,
    debug: bool = False,
    device_mesh=None,
    **unused_params,
):
  """Simulates one pallas_call; returns its outputs. Traceable, no callbacks.

  ``device_mesh`` (a remote.DeviceMesh) names the devices of the enclosing
  shard_map, which remote DMAs and signals address.
  """
  del unused_params
  gm = grid_mapping
  kernel_name = name or (jaxpr.debug_info.func_name if jaxpr.debug_info
                         else "kernel")
  if debug:
    print(f"fast_interpret: kernel {kernel_name} jaxpr:\n{jaxpr}")
  fill = interpret_params.uninitialized_memory
  ids = BufferIds()
  n_dyn = gm.num_dynamic_grid_bounds
  dynamic_bounds, args = args[:n_dyn], args[n_dyn:]
  dyn_iter = iter(dynamic_bounds)
  grid = tuple(next(dyn_iter) if isinstance(g, _jax.DynamicGridDim) or g is
               None else g for g in gm.grid)
  scalars = args[:gm.num_index_operands]
  inputs = args[gm.num_index_operands:]
  if len(inputs) != gm.num_inputs:
    raise errors.InternalError(
        f"expected {gm.num_inputs} inputs, got {len(inputs)}.")

  buffers: dict[int, Any] = {}
  scalar_handles = []
  for i, s in enumerate(scalars):
    bid = ids.fresh()
    buffers[bid] = s
    scalar_handles.append(RefHandle(bid, _jax.TPUMemorySpace.SMEM,
                                    f"scalar_prefetch[{i}]"))

  in_maps = gm.block_mappings[:gm.num_inputs]
  out_maps = gm.block_mappings[gm.num_inputs:]
  # Alias indices count the scalar-prefetch operands first.
  out_to_in = {o: i - gm.num_index_operands for i, o in input_output_aliases}
  if any(i < 0 for i in out_to_in.values()):
    raise errors.UnsupportedFeatureError(
        "input_output_aliases on a scalar-prefetch operand", kernel_name)
  operands: list[Operand] = []
  for i, (x, bm) in enumerate(zip(inputs, in_maps, strict=True)):
    op = _make_operand(bm.origin, bm, ids.fresh(), _block_id(bm, ids))
    buffers[op.hbm_id] = _to_storage(_pad(x, op, fill), op)
    operands.append(op)
  for o, bm in enumerate(out_maps):
    if o in out_to_in:
      hbm_id = operands[out_to_in[o]].hbm_id
    else:
      hbm_id = ids.fresh()
    op = _make_operand(bm.origin, bm, hbm_id, _block_id(bm, ids))
    if o in out_to_in:
      # Both sides of an alias must agree on how the shared HBM is stored.
      i = out_to_in[o]
      both_bits = op.bits and operands[i].bits
      op = dataclasses.replace(op, bits=both_bits)
      if operands[i].bits and not both_bits:
        operands[i] = dataclasses.replace(operands[i], bits=False)
        buffers[hbm_id] = _pad(inputs[i], operands[i], fill)
    if o not in out_to_in:
      buffers[hbm_id] = _to_storage(uninitialized(
          op.padded_shape, bm.array_aval.dtype, fill), op)
    elif buffers[hbm_id].shape != op.padded_shape:
      raise errors.UnsupportedFeatureError(
          f"aliased output {bm.origin} with block padding that differs from "
          "its input", kernel_name)
    if op.block_id is not None:
      buffers[op.block_id] = uninitialized(
          bm.block_aval.shape, bm.block_aval.dtype, fill)
    operands.append(op)
  in_ops, out_ops = operands[:gm.num_inputs], operands[gm.num_inputs:]

  num_steps = math.prod(grid) if grid else 1
  core_plan = cores.plan(grid, num_steps, compiler_params, interpret_params,
                         mesh, jaxpr, kernel_name)
  # In lock step every semaphore has one row per core (cores.py).
  sem_rows = (core_plan.num_cores,) if core_plan.lockstep else ()
  scratch_handles = []
  for k, aval in enumerate(gm.scratch_avals):
    inner = getattr(aval, "inner_aval", aval)
    space = scoped_memory_space(aval)
    if space == "semaphore":
      scratch_handles.append(None)  # Allocated below.
      continue
    bid = ids.fresh()
    buffers[bid] = uninitialized(inner.shape, storage_dtype(inner), fill)
    scratch_handles.append(RefHandle(bid, space, f"scratch[{k}]"))
  _allocate_semaphores(
      gm.scratch_avals, scratch_handles, buffers, ids, sem_rows,
      merge=(interpret_params.check_semaphores
             and not remote.has_remote_ops(jaxpr)))

  def handle(op: Operand) -> RefHandle:
    space = op.mapping.block_aval.memory_space
    if op.block_id is None:
      return RefHandle(op.hbm_id, space, op.name)
    return RefHandle(op.block_id, space, op.name)

  def windowed(op: Operand, handle: RefHandle, block_indices) -> RefHandle:
    """An HBM operand with a window (e.g. a vmapped dimension) is a view."""
    if op.block_id is not None or op.trivial_window:
      return handle
    indices = []
    for dim, idx, size in zip(op.mapping.block_shape, block_indices,
                              op.block_sizes, strict=True):
      start = jnp.asarray(idx, jnp.int32)
      if isinstance(dim, _jax.Squeezed) or dim is None:
        indices.append(start)
      else:
        if isinstance(dim, _jax.Blocked):
          start = start * size
        indices.append(_jax.Slice(start, size, 1))
    return handle.with_transforms([_jax.NDIndexer.from_indices_shape(
        tuple(indices), op.padded_shape)])

  kernel_args = [*scalar_handles, *map(handle, operands), *scratch_handles]
  written = interpreter.written_buffer_ids(jaxpr, kernel_args)
  input_block_ids = {op.block_id for op in in_ops if op.block_id is not None}
  check_bounds = interpret_params.out_of_bounds_reads == "raise"
  # Blocks outside the array: uninitialised values, as JAX's mode reads them.
  block_fill = (fill if interpret_params.out_of_bounds_reads == "uninitialized"
                else None)
  check_semaphores = interpret_params.check_semaphores
  sites = checks.Sites(kernel_name)
  if interpret_params.checks_enabled:
    buffers[checks.ERROR_ID] = checks.initial_word()
  if _jax.uses_primitives(jaxpr, {_jax.prng_seed_p, _jax.prng_random_bits_p,
                                  _jax.random_bits_p}):
    buffers[tpu_rules.PRNG_ID] = tpu_rules.initial_prng_state()
  if _jax.uses_primitives(jaxpr, {_jax.get_barrier_semaphore_p}):
    _check_collective_id(compiler_params, kernel_name)
    buffers[dma_rules.BARRIER_ID] = jnp.zeros((), jnp.int32)
    checked_handles = [*scratch_handles, RefHandle(
        dma_rules.BARRIER_ID, "semaphore", "barrier_semaphore")]
  else:
    checked_handles = scratch_handles
  if remote.has_remote_ops(jaxpr) and n_dyn:
    raise errors.UnsupportedFeatureError(
        "remote DMAs or signals with a dynamic grid", kernel_name,
        "Every device must run the same number of grid steps; use a static "
        "grid.")
  in_flight = {}
  if inflight.enabled(interpret_params):
    n_const = len(jaxpr.constvars)
    with_companions, in_flight = inflight.allocate(
        KernelState(buffers), kernel_args,
        [p - n_const for p in inflight.destinations(jaxpr) if p >= n_const],
        ids.fresh)
    buffers = dict(with_companions.buffers)
  visible = [d for d in range(len(grid)) if d not in gm.vmapped_dims]
  ctx = interpreter.RuleContext(
      params=interpret_params, kernel_name=kernel_name, buffer_ids=ids,
      num_programs=tuple(grid[d] for d in visible), grid_names=gm.grid_names,
      opaque_true=fences.opaque_true(*scalars, *inputs), sites=sites,
      check_bounds=check_bounds, check_semaphores=check_semaphores,
      ranges=ranges.Ranges() if check_bounds else None,
      wait_code_bits=dma_rules.wait_code_bits(num_steps),
      mesh=device_mesh, in_flight=in_flight,
      in_loop=not (isinstance(num_steps, int) and num_steps == 1))
  per_core = core_plan.per_core
  # With one core the last step's revisit check waits for the loop's end
  # (``plan.finish``), ahead of the semaphores' end check made there too.
  plan, state = schedule.make(
      ctx, KernelState(buffers), grid, operands, len(in_ops),
      scalar_handles, written, _last_of_core(num_steps, per_core),
      interpret_params.check_output_revisits, core_plan.permutations,
      last_after_loop=per_core is None)
  buffers = {**checks.flush(state).buffers, **plan.buffers}
  buffers.update(_covered_outputs(plan.static_rows(), operands, len(in_ops),
                                  out_to_in, written, in_flight, buffers))
  carried = ({op.hbm_id for op in out_ops}
             | {op.block_id for op in out_ops if op.block_id is not None}
             | {h.buffer_id for h in scratch_handles}
             | (written - input_block_ids)
             | set(plan.buffers)
             | {i for e in in_flight.values() for i in (e.shadow_id, e.tag_id)}
             | {k for k in buffers if k < 0})
  invariant = {k: v for k, v in buffers.items() if k not in carried}

  has_remote = remote.has_remote_ops(jaxpr)

  def begin_step(state, step, row: schedule.Row, blocks=None,
                 core=None) -> StepStart:
    """Sets up one grid step: input blocks, program ids, the kernel's refs.

    Shared by the grid loop and vectorize.py. ``blocks`` (block buffer id ->
    array) gives the input blocks already read; otherwise they are sliced
    out of HBM at the row's block indices.
    """
    starts = [_block_starts(op, idx)
              for op, idx in zip(operands, row.block_indices, strict=True)]
    for op, st in zip(in_ops, starts[:len(in_ops)], strict=True):
      if op.block_id is not None:
        block = (blocks[op.block_id] if blocks is not None
                 else _read_block(state.read(op.hbm_id), op, st,
                                  block_fill))
        state = state.add(op.block_id, block)
    program_ids = tuple(row.coords[d] for d in visible)
    remat = {}
    if row.coord_fn is not None and not has_remote:
      # (Remote ops recognise program ids by identity: they keep theirs.)
      remat = {id(p): (p, functools.partial(row.coord_fn, d))
               for p, d in zip(program_ids, visible, strict=True)}
    step_ctx = dataclasses.replace(
        ctx, grid_step=step, program_ids=program_ids,
        pending_waits=[], core_index=core, lockstep=lockstep, remat=remat)
    n_scalar = len(scalar_handles)
    step_args = list(kernel_args)
    for k, (op, idx) in enumerate(zip(operands, row.block_indices,
                                      strict=True)):
      step_args[n_scalar + k] = windowed(op, kernel_args[n_scalar + k], idx)
    return StepStart(state, step_ctx, step_args, starts)

  # An output block written back at every step, rather than when the next
  # step moves to another block, leaves HBM the same once its last step is
  # done: each step writes the block at its own index, and the last write
  # of every block comes at the step the flag picks. Only an input aliased
  # to the output, or another core, could see HBM in between; elsewhere the
  # unconditional update drops a slice + select per step and, on XLA:CPU,
  # a fusion kernel (about 40 ms of compile time each).
  written_back = [k for k, op in enumerate(out_ops, start=len(in_ops))
                  if op.block_id is not None]
  input_hbm = {op.hbm_id for op in in_ops}
  flagged = {k for k in written_back
             if per_core is not None or core_plan.lockstep
             or operands[k].hbm_id in input_hbm}

  def step_steps(step, carry: dict[int, Any], last_step, core=None):
    """One grid step of one core, as a generator (see cores.py)."""
    state = KernelState({**invariant, **carry})
    ctx_here = dataclasses.replace(ctx, grid_step=step)
    state, row = plan.fetch(ctx_here, state, step)
    start = begin_step(state, step, row, core=core)
    state, step_ctx, starts = start.state, start.ctx, start.starts
    before = state
    state, _ = yield from cores.eval_body(step_ctx, state, jaxpr, start.args)
    state = dma_rules.check_pending_waits(step_ctx, state)
    # (In lock step, other cores change the shared buffers in between.)
    interpreter.check_carried(
        before, state, carried | input_block_ids
        | (lockstep.shared_ids if lockstep else set()),
        f"kernel {kernel_name}")
    # As on TPU, an output block goes back to HBM when the next step maps it
    # to another block, or when this core's last step is done.
    # lax.eq, not ``==``: a jnp operator is a jitted call while tracing.
    is_last = (step == last_step if isinstance(step, int)
               and isinstance(last_step, int) else lax.eq(step, last_step))
    state, writes = plan.write_backs(ctx_here, state, step, row, is_last,
                                     flagged)
    for k in written_back:
      op = operands[k]
      state = state.write(op.hbm_id, _write_block(
          state.read(op.hbm_id), op, starts[k], state.read(op.block_id),
          writes.get(k), block_fill))
    if check_semaphores and per_core is not None:
      state = _check_semaphores_released(step_ctx, state, checked_handles,
                                         is_last)
    return checks.flush(state).subset(carried)

  def step_fn(step, carry: dict[int, Any], last_step) -> dict[int, Any]:
    return cores.run_alone(step_steps(step, carry, last_step))

  carry = {k: v for k, v in buffers.items() if k in carried}
  multi_device = (has_remote and device_mesh is not None
                  and device_mesh.size > 1)
  host_check = None
  shared_ids = ({op.hbm_id for op in operands}
                | (set(plan.buffers) - plan.private_ids)
                | {h.buffer_id for h in scratch_handles
                   if cores.is_shared_memory(h.memory_space)}
                | ({checks.ERROR_ID} & carry.keys()))
  lockstep = None
  if core_plan.lockstep:
    lockstep = cores.Lockstep(core_plan.num_cores, shared_ids | {
        h.buffer_id for h in scratch_handles if h.per_core})
  kernel = vectorize.Kernel(
      jaxpr, operands, len(in_ops), begin_step,
      lambda hbm, op, idx: _read_block(hbm, op, _block_starts(op, idx),
                                       block_fill),
      _to_storage)
  vplan = vectorize.plan(
      kernel, plan, num_scalars=len(scalar_handles),
      num_scratch=len(scratch_handles), written=written, out_to_in=out_to_in,
      num_cores=core_plan.num_cores, kernel_name=kernel_name)
  if vplan is not None:
    carry.update(vectorize.run(vplan, kernel, KernelState(
        {**invariant, **carry}), ctx.sites))
  elif per_core is None:
    if isinstance(num_steps, int) and num_steps == 1:
      last = jnp.int32(0)
      carry = step_fn(last, carry, last)
    else:
      last = lax.sub(jnp.asarray(num_steps, jnp.int32), np.int32(1))
      carry = lax.fori_loop(jnp.int32(0), lax.add(last, np.int32(1)),
                            lambda i, c: step_fn(i, c, last), carry)
    # The last step's write-backs, where the schedule checks them now, then
    # the semaphores the last step left (the order of a step's own checks),
    # decoded by the callback that raises (with several devices, the
    # counts travel with the error word in its exchange).
    state = plan.finish(ctx, KernelState(carry), last)
    if check_semaphores:
      end_ctx = dataclasses.replace(ctx, grid_step=last)
      host_check = dma_rules.end_host_check(end_ctx, state, checked_handles)
    carry = checks.flush(state).subset(carry.keys())
  elif lockstep is not None:
    carry = cores.run_lockstep(step_steps, carry, buffers, per_core, lockstep)
  else:
    carry = cores.run_sequential(step_fn, carry, buffers, per_core,
                                 num_steps, core_plan.num_cores, shared_ids)
  if checks.ERROR_ID in carry:
    # Only a kernel that already communicates may add a collective: the
    # call itself could sit under a device-varying condition otherwise.
    if multi_device:
      checks.raise_if_failed(carry[checks.ERROR_ID], sites, host_check,
                             gather=device_mesh.gather,
                             reporter=device_mesh.my_id() == 0)
    else:
      checks.raise_if_failed(carry[checks.ERROR_ID], sites, host_check)
  return [_from_storage(_unpad(carry[op.hbm_id], op), op) for op in out_ops]


def _covered_outputs(rows, operands, num_inputs, out_to_in, written,
                     in_flight, buffers) -> dict[int, Any]:
  """Output HBM buffers whose initial contents nobody can see: new starts.

  An output whose blocks the grid writes back, every one of them at least
  once (read off a schedule known while tracing), and that nothing else
  reads or writes (no alias, no DMA), ends up overwritten entirely: its
  uninitialised fill is never seen. Its loop carry may then start from any
  array of its shape and dtype: an input's HBM buffer, which costs XLA a
  copy, where the fill is a broadcast, a fusion kernel of its own on
  XLA:CPU (about 20-40 ms of compile time).
  """
  if rows is None:
    return {}
  inputs = [buffers[op.hbm_id] for op in operands[:num_inputs]]
  starts = {}
  for k, op in enumerate(operands[num_inputs:], start=num_inputs):
    if (op.block_id is None or (k - num_inputs) in out_to_in
        or op.hbm_id in written or op.hbm_id in in_flight
        or not all(isinstance(d, _jax.Blocked) or isinstance(d, _jax.Squeezed)
                   or d is None for d in op.mapping.block_shape)):
      continue
    current = buffers[op.hbm_id]
    donor = next((x for x in inputs if x.shape == current.shape
                  and x.dtype == current.dtype), None)
    if donor is None:
      continue
    limits = grid_tables.block_limits(op)
    indices = np.asarray(rows.block_indices[k])
    inside = np.all((indices >= 0) & (indices < np.asarray(limits)), axis=1)
    if len({tuple(i) for i in indices[inside]}) == math.prod(limits):
      starts[op.hbm_id] = donor
  return starts


def _allocate_semaphores(avals, handles: list, buffers: dict, ids: BufferIds,
                         rows: tuple[int, ...], merge: bool) -> None:
  """Fills the semaphore slots (None) of ``handles`` with zeroed counters.

  With ``merge`` every semaphore array of the kernel is a view of one int32
  buffer (``rows`` + the total count): the updates of a grid step to
  different semaphores then fuse into one XLA kernel, where one buffer
  each costs a kernel each. On XLA:CPU that matters beyond its own cost: a
  loop body of more than eight kernels runs through a dataflow executor
  that is set up again at every iteration (a double-buffered DMA kernel's
  checked step went from 9 thunks to 8, as unchecked, and from 1.3x to the
  unchecked time). It is done when semaphores are checked: unchecked, the
  counts of a semaphore that only waits read are dead code XLA removes,
  which one shared buffer would keep alive. Kernels with remote ops keep
  one buffer per array (remote signals and deferred waits name buffers).
  """
  slots = [k for k, h in enumerate(handles) if h is None]
  shapes = [getattr(avals[k], "inner_aval", avals[k]).shape for k in slots]
  if not merge or len(slots) < 2:
    for k, shape in zip(slots, shapes, strict=True):
      bid = ids.fresh()
      buffers[bid] = jnp.zeros(rows + shape, jnp.int32)
      handles[k] = RefHandle(bid, "semaphore", f"scratch[{k}]",
                             per_core=bool(rows))
    return
  bid = ids.fresh()
  sizes = [math.prod(shape) for shape in shapes]
  total = sum(sizes)
  buffers[bid] = jnp.zeros(rows + (total,), jnp.int32)
  for k, shape, size, offset in zip(slots, shapes, sizes,
                                    np.cumsum([0, *sizes[:-1]]), strict=True):
    view = [_jax.NDIndexer.from_indices_shape(
        (_jax.Slice(int(offset), size, 1),), (total,))]
    if shape != (size,):
      view.append(_jax.ReshapeTransform(shape))
    handles[k] = RefHandle(bid, "semaphore", f"scratch[{k}]",
                           per_core=bool(rows)).with_transforms(view)


def _check_semaphores_released(ctx, state, scratch_handles, is_last):
  """Semaphores left non-zero, or poisoned by a wait, when a core's last
  step ends are an error (``dma_rules.end_records``).

  Checked at each core's last grid step, so that every simulated core's own
  semaphores are seen (they are private to the core, or its row of them in
  lock step); with one core, after the grid loop instead of in every step
  (gated), which keeps the check's kernels out of the loop body.
  """
  return checks.add_records(state, dma_rules.end_records(
      ctx, state, scratch_handles, is_last))


def _last_of_core(num_steps, per_core: int | None):
  """bool per step: True at each simulated core's last step (None: dynamic)."""
  if not isinstance(num_steps, (int, np.integer)):
    return None
  steps = np.arange(num_steps)
  last = steps == num_steps - 1
  if per_core is not None:
    last |= steps % per_core == per_core - 1
  return last


def _check_collective_id(compiler_params, kernel_name: str) -> None:
  """A TPU kernel that uses its barrier semaphore must name a collective_id."""
  if getattr(compiler_params, "collective_id", None) is None:
    raise errors.UnsupportedFeatureError(
        "pltpu.get_barrier_semaphore() without a collective_id", kernel_name,
        "Mosaic needs one to pick the barrier semaphore: pass "
        "compiler_params=pltpu.CompilerParams(collective_id=0).")


def _block_id(mapping, ids: BufferIds) -> int | None:
  if _is_hbm(mapping.block_aval.memory_space):
    return None
  return ids.fresh()


