"""Hooks fast interpret into ``pallas_call``'s lowering.

We wrap the registered MLIR lowering rule(s) of ``pallas_call_p``: when the
call's ``interpret`` is a ``FastInterpretParams`` we lower our own traceable
simulation with ``mlir.lower_fun``; any other value goes to JAX's own rule
unchanged. We also tell Pallas that our mode has no host-callback effects
(``pltpu.InterpretParams`` declares IO effects, which we do not have).

Kernels that ask for the TPU's description while they are traced
(``pltpu.emit_pipeline`` does, for its tiling) would fail on a CPU host;
we register a simulated TPU (``SIMULATED_CHIP``) for the ``cpu`` device kind.
"""

from __future__ import annotations

from fast_interpret import _jax
from fast_interpret.params import FastInterpretParams

_installed = False

# The chip whose description `pltpu.get_tpu_info()` returns on CPU hosts: a
# common single-TensorCore chip (its (8, 128) tiling is what pipelines use).
SIMULATED_CHIP = "v5e"


def simulation(interpret: FastInterpretParams, params, device_mesh=None):
  """The traceable simulation of a pallas_call with these parameters.

  ``device_mesh`` is the mesh of the enclosing ``shard_map`` (remote.py), if
  any.
  """
  from fast_interpret import grid  # pylint: disable=g-import-not-at-top

  def impl(*args):
    args = [_jax.in_device_memory(a) for a in args]
    return grid.interpret_pallas_call(*args, interpret_params=interpret,
                                      device_mesh=device_mesh, **params)
  return impl


def _make_lowering(jax_rule):
  def rule(ctx, *in_nodes, interpret, **params):
    if isinstance(interpret, FastInterpretParams):
      from fast_interpret import remote  # pylint: disable=g-import-not-at-top
      impl = simulation(interpret, params, remote.mesh_of(ctx))
      return _jax.lower_fun(impl, multiple_results=True)(ctx, *in_nodes)
    return jax_rule(ctx, *in_nodes, interpret=interpret, **params)
  return rule


def install() -> None:
  """Idempotently installs the lowering and effects hooks."""
  global _installed
  if _installed:
    return
  _jax.wrap_lowering(_jax.pallas_call_p, _make_lowering)
  get_effects, set_effects = _jax.interpret_effects_hook()
  jax_effects = get_effects()

  def effects(interpret):
    if isinstance(interpret, FastInterpretParams):
      return _jax.no_effects
    return jax_effects(interpret)

  set_effects(effects)
  _jax.register_simulated_tpu("cpu", SIMULATED_CHIP)
  # The interpreter and its rule modules are imported here, with the
  # package, rather than at the first kernel: their import (and, without
  # cached bytecode, their compilation) then does not land in the first
  # call's time. grid.py imports every rule module.
  from fast_interpret import debug_rules  # pylint: disable=g-import-not-at-top
  from fast_interpret import grid  # pylint: disable=g-import-not-at-top,unused-import
  debug_rules.install()
  _installed = True
