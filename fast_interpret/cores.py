"""Several simulated TensorCores: how the grid is split, and how cores run.

A TPU chip may have several TensorCores. A ``pallas_call`` with
``num_cores_or_threads > 1`` splits its leading ``parallel`` /
``core_parallel`` grid dimensions into one contiguous chunk per core; a
``pl.core_map`` / ``pl.kernel`` over ``pltpu.create_tensorcore_mesh(...,
num_cores=N)`` runs its body once on each of N cores. Each core has private
VMEM, SMEM, scratch and semaphores; HBM and ``pltpu.VMEM_SHARED`` are shared.

Cores run on one of two schedules, chosen while tracing:

* **Sequential** (kernels whose cores never signal each other): core 0 runs
  its whole chunk, then core 1, ... in one ``fori_loop`` over cores. Cheap
  to compile: the kernel body is emitted once.
* **Lock step** (kernels that signal another core's semaphore, e.g.
  ``pltpu.core_barrier``, or share a collective ``run_scoped`` allocation):
  every core's body is traced separately, as a Python generator that yields
  before each semaphore wait. The generators are resumed round-robin
  in core order, so in each round every core runs up to its next wait, and
  all state goes from one core to the next. A wait therefore sees every
  signal that other cores sent before their own next wait. Waits nested in
  ``pl.when`` on the core index, ``pl.run_scoped``, ``jax.jit`` and loops of
  static length (up to ``MAX_UNROLL`` steps, unrolled) are switch points too;
  waits inside other loops and data-dependent conditionals run without a
  switch. A wait that is not yet satisfied when its turn comes is an error
  (``fast_interpret: semaphore:`` with check_semaphores on), never a hang.
  Semaphores then hold one row per core, so that ``core_index=`` signals can
  reach another core's copy.

``random_seed`` shuffles the coordinates of the parallel dimensions (with a
fixed permutation per seed), as ``pltpu.InterpretParams`` does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Generator

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import control_rules
from fast_interpret import errors
from fast_interpret import interpreter
from fast_interpret.interpreter import RuleContext
from fast_interpret.state import (KernelState, RefHandle, scoped_memory_space,
                                  storage_dtype, uninitialized)

# Loops of static length with a wait inside are unrolled in lock step up to
# this many steps; longer ones run without switching cores inside.
MAX_UNROLL = 64
# Pure equations on concrete operands up to this size are folded while
# tracing in lock step, so that ``pl.when(core == k)`` picks its branch.
_MAX_FOLDED_SIZE = 64
# Only waits on REGULAR semaphores can depend on another core: DMAs are
# local and complete when started, so a DMA wait is never a switch point.
_WAITS = frozenset({_jax.semaphore_wait_p})
_PARALLEL = ("parallel", "core_parallel")

Steps = Generator[KernelState, KernelState, Any]


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the grid of one call runs on the simulated cores.

  Attributes:
    num_cores: simulated TensorCores.
    per_core: grid steps each core runs, or None for one core.
    lockstep: whether the cores run in lock step (see the module docstring).
    permutations: per grid dimension, the order in which its coordinates are
      visited (``random_seed``), or None for the natural order.
  """

  num_cores: int
  per_core: int | None
  lockstep: bool
  permutations: tuple[np.ndarray | None, ...]


def plan(grid, num_steps, compiler_params, interpret_params, mesh, jaxpr,
         kernel_name: str) -> Plan:
  """Decides how many cores run the call, their chunks and their schedule."""
  if isinstance(mesh, _jax.TensorCoreMesh):
    # As in pltpu.InterpretParams: a core_map runs one grid point per core
    # of its mesh, in a fixed order.
    num_cores = math.prod(mesh.devices.shape)
    parallel = [True] + [False] * (len(grid) - 1)
    seed = None
  else:
    num_cores = interpret_params.num_cores_or_threads
    parallel = _parallel_dims(grid, compiler_params, kernel_name)
    seed = interpret_params.random_seed
  permutations = _permutations(grid, parallel, seed, kernel_name)
  if num_cores == 1:
    return Plan(1, None, False, permutations)
  sizes = [g for g, p in zip(grid, parallel, strict=True) if p]
  if not all(isinstance(g, int) for g in sizes) or not isinstance(
      num_steps, int):
    raise errors.UnsupportedFeatureError(
        "several cores with a dynamic grid", kernel_name,
        "Use num_cores_or_threads=1 with dynamic grid bounds.")
  subgrid = math.prod(sizes)
  per_core = -(-subgrid // num_cores) * (num_steps // subgrid)
  lockstep = needs_lockstep(jaxpr)
  if lockstep and per_core * num_cores != num_steps:
    raise errors.UnsupportedFeatureError(
        f"cores that signal each other with {num_steps} grid steps split "
        f"unevenly over {num_cores} cores", kernel_name,
        "Make the parallel grid dimensions a multiple of the number of cores.")
  return Plan(num_cores, per_core, lockstep, permutations)


def _parallel_dims(grid, compiler_params, kernel_name: str) -> list[bool]:
  semantics = tuple(getattr(compiler_params, "dimension_semantics", None)
                    or ())
  parallel = [str(getattr(s, "value", s)).lower() in _PARALLEL
              for s in semantics]
  parallel += [False] * (len(grid) - len(parallel))
  if any(p and not q for p, q in zip(parallel[1:], parallel, strict=False)):
    raise errors.UnsupportedFeatureError(
        f"parallel dimensions {semantics} that are not a prefix of the grid",
        kernel_name, "Put the 'parallel' grid dimensions first.")
  return parallel


def _permutations(grid, parallel, seed, kernel_name: str):
  if seed is None:
    return (None,) * len(grid)
  rng = np.random.default_rng(seed)
  out = []
  for size, par in zip(grid, parallel, strict=True):
    if not par:
      out.append(None)
    elif not isinstance(size, int):
      raise errors.UnsupportedFeatureError(
          "random_seed with a dynamic parallel grid dimension", kernel_name,
          "Leave random_seed=None.")
    else:
      out.append(rng.permutation(size).astype(np.int32))
  return tuple(out)


def grid_coords(step, grid, permutations) -> tuple[Any, ...]:
  """Grid coordinates of a flat step (row-major, then shuffled).

  A Python int step on a static grid gives Python ints, so that a lock-step
  core's program ids are known while tracing.
  """
  if isinstance(step, int) and all(isinstance(g, int) for g in grid):
    # Like the traced form, a step past the end wraps around.
    coords = ([int(c) for c in np.unravel_index(step % math.prod(grid), grid)]
              if grid else [])
    return tuple(c if p is None else int(p[c])
                 for c, p in zip(coords, permutations, strict=True))
  coords = []
  for size in reversed(grid):
    coords.append(lax.rem(step, jnp.asarray(size, jnp.int32)))
    step = lax.div(step, jnp.asarray(size, jnp.int32))
  return tuple(c if p is None else jnp.asarray(p)[c]
               for c, p in zip(reversed(coords), permutations, strict=True))


def needs_lockstep(jaxpr: _jax.Jaxpr) -> bool:
  """Whether cores of this kernel signal each other or share allocations."""
  for eqn in jaxpr.eqns:
    if eqn.primitive is _jax.semaphore_signal_p:
      *_, core_index = _jax.tree_unflatten(eqn.params["args_tree"],
                                           eqn.invars)
      if core_index is not None:
        return True
    if eqn.primitive is _jax.run_scoped_p and eqn.params.get(
        "collective_axes"):
      return True
    for sub in _jax.jaxprs_in_params(eqn.params):
      if needs_lockstep(sub):
        return True
  return False


def is_shared_memory(space) -> bool:
  """Whether a memory space is shared by the cores of a chip (VMEM_SHARED)."""
  return getattr(space, "value", space) == "vmem_shared"


# --- Running the cores -------------------------------------------------------


def run_alone(steps: Steps) -> Any:
  """Runs one core's generator to the end, with no other core in between."""
  try:
    state = next(steps)
    while True:
      state = steps.send(state)
  except StopIteration as stop:
    return stop.value


def run_sequential(step_fn, carry, initial, per_core: int, num_steps: int,
                   num_cores: int, shared_ids) -> dict[int, Any]:
  """Runs the cores one after another; only shared memory is shared.

  (The error word and the revisit tables are shared too: they describe the
  whole call, not one core.) Each core starts with fresh copies of its
  VMEM/SMEM buffers, scratch and semaphores (scalar-prefetch operands are
  copied to every core's SMEM).
  """
  shared = {k: v for k, v in carry.items() if k in shared_ids}
  private = {k: initial[k] for k in carry if k not in shared_ids}

  def core_fn(core, shared):
    start = core * per_core
    stop = jnp.minimum(start + per_core, num_steps)
    out = lax.fori_loop(start, stop, lambda i, c: step_fn(i, c, stop - 1),
                        {**shared, **private})
    return {k: out[k] for k in shared}

  shared = lax.fori_loop(jnp.int32(0), jnp.int32(num_cores), core_fn, shared)
  return {**carry, **shared}


@dataclasses.dataclass
class Lockstep:
  """Trace-time bookkeeping shared by the cores of one lock-step run.

  Attributes:
    num_cores: simulated cores.
    shared_ids: buffers every core sees (HBM, VMEM_SHARED, semaphores, the
      error word, and shared ``run_scoped`` allocations while alive).
    scoped_ids: buffer id of each ``run_scoped`` allocation site, so that
      every core's copy of it gets the same id.
    users: cores inside the scope of each live shared allocation.
  """

  num_cores: int
  shared_ids: set[int]
  scoped_ids: dict[tuple[int, int], int] = dataclasses.field(
      default_factory=dict)
  users: dict[int, int] = dataclasses.field(default_factory=dict)


def run_lockstep(step_steps: Callable[..., Steps], carry, initial,
                 per_core: int, lockstep: Lockstep) -> dict[int, Any]:
  """Runs the cores' grid steps in lock step (see the module docstring).

  ``step_steps(step, carry, last_step, core)`` is one grid step of one core
  as a generator. Local step ``i`` of every core runs before local step
  ``i + 1`` of any; inside a step the cores switch at waits.
  """
  num_cores = lockstep.num_cores
  shared = {k: v for k, v in carry.items() if k in lockstep.shared_ids}
  private = {k: initial[k] for k in carry if k not in lockstep.shared_ids}

  def local_step(i, loop_carry):
    shared, privates = loop_carry
    privates = list(privates)
    gens: list[Steps | None] = [None] * num_cores
    pending = list(range(num_cores))
    while pending:
      still = []
      for core in pending:
        view = {**shared, **privates[core]}
        try:
          if gens[core] is None:
            start = core * per_core
            gens[core] = step_steps(start + i, view, start + per_core - 1,
                                    core)
            out = next(gens[core]).buffers
          else:
            out = gens[core].send(KernelState(view)).buffers
          still.append(core)
        except StopIteration as stop:
          out = stop.value
        merged = {**shared, **out}
        shared = {k: v for k, v in merged.items()
                  if k in lockstep.shared_ids}
        privates[core] = {k: v for k, v in out.items()
                          if k not in lockstep.shared_ids}
      pending = still
    return shared, privates

  loop_carry = (shared, [dict(private) for _ in range(num_cores)])
  if per_core == 1:
    shared, _ = local_step(0, loop_carry)
  else:
    shared, _ = lax.fori_loop(jnp.int32(0), jnp.int32(per_core), local_step,
                              loop_carry)
  return {**carry, **shared}


# --- The lock-step evaluator -------------------------------------------------


def eval_body(ctx: RuleContext, state: KernelState, jaxpr: _jax.Jaxpr,
              args) -> Steps:
  """The kernel body as a generator: switch points only in lock step."""
  if ctx.lockstep is None:
    return interpreter.eval_jaxpr(ctx, state, jaxpr, (), args)
  return (yield from _eval_steps(ctx, state, jaxpr, (), args))


def _eval_steps(ctx: RuleContext, state: KernelState, jaxpr: _jax.Jaxpr,
                consts, args) -> Steps:
  """``interpreter.eval_jaxpr`` for one lock-step core, yielding at waits."""
  env: dict[_jax.Var, Any] = {}

  def read(atom):
    return atom.val if isinstance(atom, _jax.Literal) else env[atom]

  for var, val in zip(jaxpr.constvars, consts, strict=True):
    env[var] = val
  for var, val in zip(jaxpr.invars, args, strict=True):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive in _WAITS:
      # Pending check records would not survive the switch to another core.
      state = yield checks.flush(state)
    handler = _HANDLERS.get(eqn.primitive)
    outvals = None
    if handler is not None:
      result = yield from handler(dataclasses.replace(ctx, eqn=eqn), state,
                                  eqn, invals)
      if result is not None:
        state, outvals = result
    if outvals is None:
      if _foldable(ctx, eqn, invals):
        with jax.ensure_compile_time_eval():
          state, outvals = interpreter.eval_eqn(ctx, state, eqn, invals)
        # NumPy values stay static wherever rules test for static indices.
        outvals = [np.asarray(v) for v in outvals]
      else:
        state, outvals = interpreter.eval_eqn(ctx, state, eqn, invals)
    for var, val in zip(eqn.outvars, outvals, strict=True):
      env[var] = val
  return state, [read(v) for v in jaxpr.outvars]


def _concrete(x) -> bool:
  return (not isinstance(x, (jax.core.Tracer, RefHandle))
          and np.size(x) <= _MAX_FOLDED_SIZE)


def _foldable(ctx: RuleContext, eqn, invals) -> bool:
  """Whether ``eqn`` can be computed while tracing (core ids and the like)."""
  prim = eqn.primitive
  if prim is _jax.program_id_p:
    return _concrete(ctx.program_ids[eqn.params["axis"]])
  if prim is lax.axis_index_p:
    names = ctx.grid_names or ()
    return (eqn.params["axis_name"] in names and _concrete(
        ctx.program_ids[names.index(eqn.params["axis_name"])]))
  return (interpreter.is_pure(eqn) and all(_concrete(x) for x in invals)
          and all(_small_array(v.aval) for v in eqn.outvars))


def _small_array(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return (dtype is not None and not jax.dtypes.issubdtype(
      dtype, jax.dtypes.extended)
          and math.prod(getattr(aval, "shape", ())) <= _MAX_FOLDED_SIZE)


def _cond_steps(ctx, state, eqn, invals):
  """A conditional whose branch is known while tracing is inlined."""
  index, *ops = invals
  if not _concrete(index):
    return None
  branches = eqn.params["branches"]
  branch = branches[int(np.clip(int(index), 0, len(branches) - 1))]
  return (yield from _eval_steps(ctx, state, branch.jaxpr, branch.consts,
                                 ops))


def _jit_steps(ctx, state, eqn, invals):
  closed = eqn.params["jaxpr"]
  return (yield from _eval_steps(ctx, state, closed.jaxpr, closed.consts,
                                 invals))


def _scan_steps(ctx, state, eqn, invals):
  """A short static loop with a wait inside is unrolled, so cores switch."""
  p = eqn.params
  closed = p["jaxpr"]
  if p["length"] > MAX_UNROLL or not _jax.uses_primitives(closed.jaxpr,
                                                          _WAITS):
    return None
  consts = invals[:p["num_consts"]]
  carry = invals[p["num_consts"]:p["num_consts"] + p["num_carry"]]
  xs = invals[p["num_consts"] + p["num_carry"]:]
  ys = []
  order = range(p["length"])
  for i in (reversed(order) if p["reverse"] else order):
    state, outs = yield from _eval_steps(
        ctx, state, closed.jaxpr, closed.consts,
        [*consts, *carry, *[x[i] for x in xs]])
    carry, y = outs[:p["num_carry"]], outs[p["num_carry"]:]
    ys.append(y)
  if p["reverse"]:
    ys.reverse()
  stacked = [jnp.stack(col) for col in zip(*ys)] if ys else [
      jnp.zeros((0, *v.aval.shape), v.aval.dtype)
      for v in eqn.outvars[p["num_carry"]:]]
  return state, [*carry, *stacked]


def _run_scoped_steps(ctx, state, eqn, invals):
  """``pl.run_scoped`` in lock step: one id per allocation site.

  Every core's copy of an allocation has the same id, so a semaphore that one
  core signals with ``core_index=`` is the one the other core waits on.
  Semaphores, VMEM_SHARED and collective allocations are shared buffers
  (semaphores with one row per core), alive while any core is in the scope.
  """
  lockstep: Lockstep = ctx.lockstep
  body = eqn.params["jaxpr"]
  collective = bool(eqn.params.get("collective_axes"))
  handles, private, shared = [], [], []
  for k, var in enumerate(body.invars):
    aval = var.aval
    inner = getattr(aval, "inner_aval", aval)
    space = scoped_memory_space(aval)
    control_rules.check_scoped_space(ctx, space)
    bid = lockstep.scoped_ids.setdefault((id(eqn), k), ctx.fresh_buffer_id())
    is_sem = space == "semaphore"
    if is_sem or collective or is_shared_memory(space):
      shared.append(bid)
      if bid not in lockstep.users or lockstep.users[bid] == 0:
        shape = ((lockstep.num_cores,) if is_sem else ()) + inner.shape
        state = state.add(bid, _fresh(shape, inner, is_sem, ctx))
        lockstep.shared_ids.add(bid)
        lockstep.users[bid] = 0
      lockstep.users[bid] += 1
    else:
      private.append(bid)
      state = state.add(bid, _fresh(inner.shape, inner, is_sem, ctx))
    handles.append(RefHandle(bid, space, f"run_scoped[{k}]", per_core=is_sem))
  state, outs = yield from _eval_steps(ctx, state, body, invals, handles)
  gone = list(private)
  for bid in shared:
    lockstep.users[bid] -= 1
    if lockstep.users[bid] == 0:
      lockstep.shared_ids.discard(bid)
      gone.append(bid)
  return state.drop(gone), outs


def _fresh(shape, inner, is_sem: bool, ctx: RuleContext):
  if is_sem:
    return jnp.zeros(shape, jnp.int32)
  return uninitialized(shape, storage_dtype(inner),
                       ctx.params.uninitialized_memory)


_HANDLERS = {
    _jax.cond_p: _cond_steps,
    _jax.jit_p: _jit_steps,
    _jax.scan_p: _scan_steps,
    _jax.run_scoped_p: _run_scoped_steps,
}
