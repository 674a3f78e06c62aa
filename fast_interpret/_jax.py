"""The one place where fast_interpret touches JAX internals.

Everything under ``jax._src`` that the package needs is imported here and
re-exported under a stable local name, so that a JAX upgrade changes this file
and nothing else. Other modules import ``from fast_interpret import _jax``.

Pinned to jax 0.10.2.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax._src import api_util
from jax._src import config
from jax._src import checkify
from jax._src import core
from jax._src import debugging
from jax._src import dtypes
from jax._src import effects
from jax._src import linear_util
from jax._src import pjit
from jax._src import sharding_impls
from jax._src.random import prng
from jax._src import source_info_util
from jax._src import tree_util
from jax._src.interpreters import mlir
from jax._src.interpreters import partial_eval
from jax._src.lax.control_flow import conditionals as lax_conditionals
from jax._src.lax.control_flow import loops as lax_loops
from jax._src.pallas import core as pallas_core
from jax._src.pallas import pallas_call as pallas_call_module
from jax._src.pallas import primitives as pallas_primitives
from jax._src.pallas import utils as pallas_utils
from jax._src.pallas.mosaic import core as tpu_core
from jax._src.pallas.mosaic import primitives as tpu_primitives
from jax._src.pallas.mosaic import tpu_info
from jax._src.pallas.mosaic.interpret import params as tpu_interpret_params
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing
from jax._src.state import primitives as state_primitives
from jax._src.state import types as state_types
from jax._src.state import utils as state_utils

# Types and values used across the package.
Jaxpr = core.Jaxpr
ClosedJaxpr = core.ClosedJaxpr
JaxprEqn = core.JaxprEqn
Literal = core.Literal
Var = core.Var
Primitive = core.Primitive
ShapedArray = core.ShapedArray
AbstractRef = state_types.AbstractRef
NDIndexer = indexing.NDIndexer
Slice = indexing.Slice
BitcastTransform = state_types.BitcastTransform
ReshapeTransform = state_types.ReshapeTransform
TransposeTransform = getattr(state_types, "TransposeTransform", None)
ReadEffect = state_types.ReadEffect
WriteEffect = state_types.WriteEffect
AccumEffect = state_types.AccumEffect

InterpretParams = tpu_interpret_params.InterpretParams
GridMapping = pallas_core.GridMapping
BlockMapping = pallas_core.BlockMapping
Blocked = pallas_core.Blocked
Squeezed = pallas_core.Squeezed
Element = pallas_core.Element
BoundedSlice = pallas_core.BoundedSlice
DynamicGridDim = pallas_core.DynamicGridDim
PallasMemorySpace = pallas_core.MemorySpace
TPUMemorySpace = tpu_core.MemorySpace
SemaphoreDtype = pallas_core.semaphore_dtype
TPUCompilerParams = tpu_core.CompilerParams
TensorCoreMesh = tpu_core.TensorCoreMesh
jaxprs_in_params = core.jaxprs_in_params

# Primitives with rules of our own.
get_p = state_primitives.get_p
swap_p = state_primitives.swap_p
addupdate_p = state_primitives.addupdate_p
masked_load_p = pallas_primitives.load_p
masked_swap_p = pallas_primitives.swap_p
program_id_p = pallas_primitives.program_id_p
num_programs_p = pallas_primitives.num_programs_p
multiple_of_p = pallas_primitives.multiple_of_p
run_scoped_p = pallas_primitives.run_scoped_p
semaphore_read_p = pallas_primitives.semaphore_read_p
semaphore_signal_p = pallas_primitives.semaphore_signal_p
semaphore_wait_p = pallas_primitives.semaphore_wait_p
delay_p = pallas_primitives.delay_p
dma_start_p = tpu_primitives.dma_start_p
dma_wait_p = tpu_primitives.dma_wait_p
tpu_bitcast_p = tpu_primitives.bitcast_p
roll_p = tpu_primitives.roll_p
get_barrier_semaphore_p = tpu_primitives.get_barrier_semaphore_p
prng_seed_p = tpu_primitives.prng_seed_p
prng_random_bits_p = tpu_primitives.prng_random_bits_p
trace_value_p = tpu_primitives.trace_value_p
touch_p = tpu_primitives.touch_p
random_bits_p = prng.random_bits_p
stochastic_round_p = tpu_primitives.stochastic_round_p
pack_elementwise_p = tpu_primitives.pack_elementwise_p
unpack_elementwise_p = tpu_primitives.unpack_elementwise_p
itemsize_bits = dtypes.itemsize_bits
debug_print_p = debugging.debug_print_p
debug_callback_p = debugging.debug_callback_p
check_p = checkify.check_p
checkify_rules = checkify.error_checks
checkify_jaxpr = checkify.checkify_jaxpr
debug_checks_enabled = pallas_core.debug_checks_enabled
random_unwrap = prng.random_unwrap


def pallas_prng_impls():
  """(seeded key impl, stateful placeholder impl) of Pallas TPU's PRNG."""
  from jax._src.pallas.mosaic import random as tpu_random  # pylint: disable=g-import-not-at-top
  return tpu_random.tpu_key_impl, tpu_random.tpu_internal_stateful_impl
cond_p = lax_conditionals.cond_p
while_p = lax_loops.while_p
scan_p = lax_loops.scan_p
jit_p = pjit.jit_p
pallas_call_p = pallas_call_module.pallas_call_p

transform_array = state_discharge.transform_array
ref_bitcast = state_utils.bitcast
index_array = state_discharge._index_array  # pylint: disable=protected-access
transform_swap_array = state_discharge.transform_swap_array
uninitialized_value = pallas_primitives.uninitialized_value
get_block_shape = pallas_core._get_block_shape  # pylint: disable=protected-access
user_context = source_info_util.user_context
tree_unflatten = tree_util.tree_unflatten
lower_fun = mlir.lower_fun
interpret_mode_config = config.pallas_tpu_interpret_mode_context_manager


def pallas_primitive_modules() -> list[object]:
  """The Pallas modules whose primitives we track."""
  modules = [pallas_primitives, tpu_primitives, pallas_core]
  try:
    from jax._src.pallas.mosaic import random as tpu_random  # pylint: disable=g-import-not-at-top
    modules.append(tpu_random)
  except ImportError:  # pragma: no cover - depends on the jax build.
    pass
  return modules


def pallas_primitive_set() -> frozenset[Primitive]:
  """Every primitive defined by the Pallas modules we know of.

  Such primitives never fall through to ``bind``: they need a rule, or they are
  reported as unsupported.
  """
  prims = set()
  for module in pallas_primitive_modules():
    for value in vars(module).values():
      if isinstance(value, core.Primitive):
        prims.add(value)
  return frozenset(prims)


def uses_primitives(jaxpr: Jaxpr, prims) -> bool:
  """Whether ``jaxpr`` or any jaxpr nested in it binds one of ``prims``.

  A nested jaxpr is looked at once, however many equations call it (an
  unrolled kernel calls the same few helpers hundreds of times).
  """
  seen = {jaxpr}
  todo = [jaxpr]
  while todo:
    for eqn in todo.pop().eqns:
      if eqn.primitive in prims:
        return True
      for sub in core.jaxprs_in_params(eqn.params):
        if sub not in seen:
          seen.add(sub)
          todo.append(sub)
  return False


def has_discharge_rule(prim: Primitive) -> bool:
  """Whether JAX's state discharge (used by interpret=True) handles ``prim``."""
  return (prim in state_discharge._discharge_rules  # pylint: disable=protected-access
          or prim in state_discharge._partial_discharge_rules)  # pylint: disable=protected-access


def has_generic_lowering(prim: Primitive) -> bool:
  """Whether ``prim`` lowers on every platform (e.g. ``pltpu.bitcast``)."""
  return prim in mlir._lowerings  # pylint: disable=protected-access


def wrap_lowering(prim: Primitive, make_rule) -> None:
  """Replaces every registered lowering ``rule`` of ``prim`` by ``make_rule(rule)``.

  Idempotent: a rule already made by ``make_rule`` is left alone.
  """
  if prim is pallas_call_p and not getattr(
      pallas_call_module._pallas_call_lowering, "_fast_interpret_rule", False):  # pylint: disable=protected-access
    # core_map's fallback lowering (mpmd.py) calls this function directly.
    wrapped = make_rule(pallas_call_module._pallas_call_lowering)  # pylint: disable=protected-access
    wrapped._fast_interpret_rule = True  # pylint: disable=protected-access
    pallas_call_module._pallas_call_lowering = wrapped  # pylint: disable=protected-access
  tables = [mlir._lowerings] + list(  # pylint: disable=protected-access
      mlir._platform_specific_lowerings.values())  # pylint: disable=protected-access
  for table in tables:
    entry = table.get(prim)
    if entry is None or getattr(entry.rule, "_fast_interpret_rule", False):
      continue
    new_rule = make_rule(entry.rule)
    new_rule._fast_interpret_rule = True  # pylint: disable=protected-access
    table[prim] = dataclasses.replace(entry, rule=new_rule)


def in_device_memory(x):
  """``x`` typed as plain device memory.

  ``pltpu.with_memory_space_constraint`` types a pallas_call operand as
  VMEM/SMEM/HBM; the simulation keeps every buffer in one memory, and JAX
  refuses to mix differently typed operands in one op.
  """
  space = getattr(core.typeof(x), "memory_space", core.MemorySpace.Device)
  if space == core.MemorySpace.Device:
    return x
  return pallas_core.with_memory_space_constraint_p.bind(
      x, memory_space=core.MemorySpace.Device)


def register_simulated_tpu(device_kind: str, chip: str) -> None:
  """Lets ``pltpu.get_tpu_info()`` answer on a non-TPU ``device_kind``.

  ``pltpu.emit_pipeline`` asks for the TPU's tiling while the kernel is
  traced, before any interpret mode is involved; on CPU that raises
  ``Unsupported TPU device kind``. A registered kind answers with the
  description of ``chip`` (one TensorCore). A kind already registered, by
  the user or by JAX, is left alone.
  """
  version = tpu_info.ChipVersion(chip)
  tpu_info.registry.setdefault(
      device_kind, lambda: tpu_info.get_tpu_info_for_chip(version, 1))


def interpret_effects_hook():
  """Returns (getter, setter) for Pallas' interpret-effects function."""
  def get():
    return pallas_core.get_interpret_effects

  def set_(fn):
    pallas_core.get_interpret_effects = fn

  return get, set_


no_effects = effects.no_effects


# Multi-device kernels (remote DMAs and signals; see remote.py).
DeviceIdType = pallas_primitives.DeviceIdType
MeshInfo = pallas_utils.MeshInfo
device_id_to_logical = pallas_primitives.device_id_to_logical


def spmd_mesh_axes(lowering_ctx) -> tuple[tuple[tuple[str, int], ...],
                                          frozenset] | None:
  """((axis name, size) in mesh order, manual axes) of a lowering, or None.

  Set inside ``jax.shard_map``, whose body is lowered with an SPMD axis
  context naming the mesh and the axes it has made manual.
  """
  axis_ctx = lowering_ctx.module_context.axis_context
  if not isinstance(axis_ctx, sharding_impls.SPMDAxisContext):
    return None
  mesh = axis_ctx.mesh
  return (tuple((name, int(mesh.shape[name])) for name in mesh.axis_names),
          frozenset(axis_ctx.manual_axes))




def traced_origin(x):
  """How the traced value ``x`` was computed, for a short look back.

  Returns ``("value", v)`` for a value known while tracing (a literal, a
  constant); ``("eqn", primitive, params, operands, k)`` when ``x`` is output
  ``k`` of an equation already recorded in the trace (``operands``: its
  input tracers, to look further back; the jaxprs of higher-order primitives
  are in ``params``); None for an argument of the function being traced (a
  loop carry, say) or a value not traced to a jaxpr (e.g. under ``vmap``).
  A constant that a nested trace (a loop body) closed over is followed into
  the enclosing trace.
  """
  while True:
    if not isinstance(x, core.Tracer):
      return "value", x
    if not isinstance(x, partial_eval.DynamicJaxprTracer):
      return None
    atom = x.val
    if isinstance(atom, core.Literal):
      return "value", atom.val
    const = x._trace.frame.constvar_to_val.get(atom)  # pylint: disable=protected-access
    if const is not None:
      x = const
      continue
    eqn = x.parent
    if eqn is None:
      return None
    k = next(i for i, v in enumerate(eqn.outvars) if v is atom)
    return "eqn", eqn.primitive, eqn.params, list(eqn.in_tracers), k


_DynamicJaxprTrace = partial_eval.DynamicJaxprTrace
_DynamicJaxprTracer = partial_eval.DynamicJaxprTracer


def stage_as_is(eqn: JaxprEqn, invals) -> list[Any] | None:
  """Records the pure ``eqn`` on ``invals`` in the jaxpr being traced, as is.

  What ``bind`` would record, without its per-call work (finding the trace,
  the abstract evaluation, the parameter round trip): the equation keeps its
  parameters and output types, as when JAX inlines a jaxpr into a trace
  (``partial_eval.inline_jaxpr_into_trace``). Literal operands stay
  literals. Returns the output tracers, or None where that would not be
  what ``bind`` records: when no jaxpr is being traced here (under ``vmap``,
  say), or an operand is not a traced value of the operand's exact type.
  """
  trace = core.trace_ctx.trace
  if type(trace) is not _DynamicJaxprTrace:
    return None
  src = eqn.source_info
  tracers = _operand_tracers(trace, eqn.invars, invals,
                             [v.aval for v in eqn.invars], src)
  if tracers is None:
    return None
  out_avals = [v.aval for v in eqn.outvars]
  folded = partial_eval.try_constant_folding(eqn.primitive, tracers,
                                             eqn.params, out_avals)
  if folded is not None:
    return [trace.new_const(c, source_info=src, aval=aval)
            for c, aval in zip(folded, out_avals, strict=True)]
  return trace.emit_eqn(tracers, out_avals, eqn.primitive, eqn.params,
                        eqn.effects, src, eqn.ctx)


def inline_call(eqn: JaxprEqn, closed: ClosedJaxpr, invals
                ) -> list[Any] | None:
  """Records the equations of ``closed``, called by ``eqn``, in the trace.

  JAX's own inlining of a ``jax.jit(..., inline=True)``
  (``partial_eval.inline_jaxpr_into_trace``), for a call of pure
  equations. None where it does not apply, as for ``stage_as_is``.
  """
  trace = core.trace_ctx.trace
  if type(trace) is not _DynamicJaxprTrace:
    return None
  src = eqn.source_info
  tracers = _operand_tracers(trace, eqn.invars, invals, closed.in_avals, src)
  if tracers is None:
    return None
  return partial_eval.inline_jaxpr_into_trace(trace, src, closed.jaxpr,
                                              closed.consts, *tracers)


def trace_jaxpr(fn, avals) -> ClosedJaxpr:
  """The jaxpr of ``fn`` (arrays in, a list of arrays out) on ``avals``.

  ``jax.make_jaxpr`` without its pytree and caching layers, a few times
  cheaper; for small helpers traced once and inlined many times.
  """
  wrapped = linear_util.wrap_init(
      fn, debug_info=api_util.debug_info("fast_interpret", fn, avals, {}))
  jaxpr, _, consts = partial_eval.trace_to_jaxpr_dynamic(wrapped, list(avals))
  return ClosedJaxpr(jaxpr, consts)


def inline_jaxpr(closed: ClosedJaxpr, args) -> list[Any]:
  """Evaluates ``closed`` on ``args``, its equations recorded as they are.

  Inlined into the jaxpr being traced (``partial_eval.
  inline_jaxpr_into_trace``) when every argument is a traced value of its
  parameter's exact type; otherwise each equation is bound
  (``core.eval_jaxpr``).
  """
  trace = core.trace_ctx.trace
  if type(trace) is _DynamicJaxprTrace:
    src = source_info_util.current()
    tracers = _operand_tracers(trace, [None] * len(args), args,
                               closed.in_avals, src)
    if tracers is not None:
      return partial_eval.inline_jaxpr_into_trace(trace, src, closed.jaxpr,
                                                  closed.consts, *tracers)
  return core.eval_jaxpr(closed.jaxpr, closed.consts, *args)


def _operand_tracers(trace, atoms, invals, avals, src) -> list[Any] | None:
  """Tracers of ``trace`` for operands ``invals`` (of ``atoms``), or None.

  None unless each is a literal or a traced value of type ``avals[i]``.
  """
  tracers = []
  for atom, x, aval in zip(atoms, invals, avals, strict=True):
    if type(atom) is core.Literal:
      if atom.aval != aval:
        return None
      tracers.append(_DynamicJaxprTracer(trace, aval, atom, src))
      continue
    if type(x) is not _DynamicJaxprTracer or x.aval != aval:
      return None
    if x._trace is not trace:  # pylint: disable=protected-access
      x = trace.to_jaxpr_tracer(x, src)
    tracers.append(x)
  return tracers


def bound_axis_names() -> frozenset:
  """Axis names bound while tracing (e.g. by an enclosing shard_map)."""
  return frozenset(core.get_axis_env().axis_sizes)


def jaxprs_in_params(params):
  """The jaxprs nested in an equation's parameters."""
  return core.jaxprs_in_params(params)


def tpu_interpret_source() -> str:
  """Source of JAX's TPU interpret mode evaluator (for the support table)."""
  import inspect  # pylint: disable=g-import-not-at-top
  from jax._src.pallas.mosaic.interpret import interpret_pallas_call  # pylint: disable=g-import-not-at-top
  return inspect.getsource(interpret_pallas_call)
