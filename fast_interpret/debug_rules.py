"""Rules for printing and checking from inside a kernel.

* ``pl.debug_print`` / ``jax.debug.print``: printed on the host at every
  grid step that reaches them, through JAX's own debug callback. This is the
  one rule that puts a host callback into the program, and only because the
  kernel asks for it.
* ``checkify.check`` with ``checkify.checkify`` around the call: a checkify
  rule for ``pallas_call`` traces our simulation of the kernel and lets
  checkify functionalize the checks in it, so the error comes back as
  checkify's ``Error`` value, as for any other JAX function.
* ``pl.debug_check`` (``checkify.debug_check``): functionalized the same way
  under ``checkify.checkify``; otherwise, with ``pl.enable_debug_checks()``,
  a failure raises ``KernelCheckError`` after the call (like a TPU assert),
  provided some runtime check is enabled (the error word carries it).
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

from fast_interpret import _jax
from fast_interpret import checks
from fast_interpret import errors
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.params import FastInterpretParams
from fast_interpret.state import KernelState

# Whether the kernel being simulated is traced by our checkify rule: its
# checks are then left for checkify to functionalize.
_UNDER_CHECKIFY = contextvars.ContextVar("fast_interpret_under_checkify",
                                         default=False)


@register_rule(_jax.debug_print_p)
def _debug_print_rule(ctx: RuleContext, state: KernelState, *args, **params):
  """``pl.debug_print`` / ``jax.debug.print``: a host print per grid step.

  Fidelity lost: none for the values; the TPU's own print formats vectors
  differently and orders prints by core.
  """
  del ctx
  return state, _jax.debug_print_p.bind(*args, **params)


@register_rule(_jax.debug_callback_p)
def _debug_callback_rule(ctx: RuleContext, state: KernelState, *args,
                         **params):
  """``jax.debug.callback``: called on the host at every grid step."""
  del ctx
  return state, _jax.debug_callback_p.bind(*args, **params)


@register_rule(_jax.check_p)
def _check_rule(ctx: RuleContext, state: KernelState, *err_args, err_tree,
                debug):
  """``checkify.check`` / ``pl.debug_check`` inside a kernel."""
  if _UNDER_CHECKIFY.get():
    return state, _jax.check_p.bind(*err_args, err_tree=err_tree, debug=debug)
  if not debug:
    raise errors.UnsupportedFeatureError(
        "checkify.check outside checkify.checkify", ctx.kernel_name,
        "Wrap the pallas_call (or a function calling it) in "
        "jax.experimental.checkify.checkify, or use pl.debug_check with "
        "pl.enable_debug_checks().")
  if not _jax.debug_checks_enabled():
    return state, []
  error = jax.tree.unflatten(err_tree, err_args)
  [failed] = error._pred.values()  # pylint: disable=protected-access
  [exception_tree] = error._metadata.values()  # pylint: disable=protected-access
  [payload] = error._payload.values()  # pylint: disable=protected-access
  message = jax.tree.unflatten(exception_tree, payload).fmt_string
  template = "debug check failed: " + message.replace("{", "{{").replace(
      "}", "}}")
  return checks.record(state, ctx.sites, ctx.grid_step, failed, template), []


@contextlib.contextmanager
def _functionalizing_checks():
  token = _UNDER_CHECKIFY.set(True)
  try:
    yield
  finally:
    _UNDER_CHECKIFY.reset(token)


def _pallas_call_checkify_rule(error, enabled_errors, *args, interpret,
                               **params):
  """checkify of a pallas_call: functionalizes the checks of its kernel.

  Only fast-interpreted calls are handled; others are bound unchanged, as
  checkify does for a primitive without a rule.
  """
  if not isinstance(interpret, FastInterpretParams):
    return error, _jax.pallas_call_p.bind(*args, interpret=interpret,
                                          **params)
  from fast_interpret import lowering  # pylint: disable=g-import-not-at-top
  impl = lowering.simulation(interpret, params)
  with _functionalizing_checks():
    simulation = jax.make_jaxpr(impl)(*args)
  return _jax.checkify_jaxpr(simulation, enabled_errors, error, *args)


def install() -> None:
  """Registers the checkify rule of ``pallas_call`` (idempotent)."""
  _jax.checkify_rules.setdefault(_jax.pallas_call_p,
                                 _pallas_call_checkify_rule)
