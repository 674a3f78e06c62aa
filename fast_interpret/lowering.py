"""Hooks fast interpret into ``pallas_call``'s lowering.

We wrap the registered MLIR lowering rule(s) of ``pallas_call_p``: when the
call's ``interpret`` is a ``FastInterpretParams`` we lower our own traceable
simulation with ``mlir.lower_fun``; any other value goes to JAX's own rule
unchanged. We also tell Pallas that our mode has no host-callback effects
(``pltpu.InterpretParams`` declares IO effects, which we do not have).
"""

from __future__ import annotations

import functools

from fast_interpret import _jax
from fast_interpret.params import FastInterpretParams

_installed = False


def _make_lowering(jax_rule):
  def rule(ctx, *in_nodes, interpret, **params):
    if isinstance(interpret, FastInterpretParams):
      from fast_interpret import grid  # pylint: disable=g-import-not-at-top
      from fast_interpret import remote  # pylint: disable=g-import-not-at-top
      impl = functools.partial(grid.interpret_pallas_call,
                               interpret_params=interpret,
                               device_mesh=remote.mesh_of(ctx), **params)
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
  _installed = True
