"""Switching existing code to fast interpret without editing it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fast_interpret import _jax
from fast_interpret import flags
from fast_interpret.params import FastInterpretParams


@contextlib.contextmanager
def force_fast_interpret_mode(
    params: FastInterpretParams | None = None) -> Iterator[FastInterpretParams]:
  """Runs every ``pallas_call``/``core_map`` traced inside under fast interpret.

  This is ``pltpu.force_tpu_interpret_mode`` with a ``FastInterpretParams``:
  calls that pass their own ``interpret=`` value are overridden too, as with
  JAX's context manager. The mode is read when a call is traced; it is part of
  jit's cache key, so a function jitted before entering is traced again
  inside.

  Args:
    params: the parameters to use; by default those of the fidelity level in
      force (``--fast_interpret_fidelity``): ``FastInterpretParams()``, or
      ``pltpu.InterpretParams()`` for level ``tpu``.

  Yields:
    The parameters in force.

  Example::

    with fast_interpret.force_fast_interpret_mode():
      out = flash_attention(q, k, v)
  """
  params = params_for_level() if params is None else params
  _check(params)
  prev = _jax.interpret_mode_config.swap_local(params)
  try:
    yield params
  finally:
    _jax.interpret_mode_config.set_local(prev)


def set_fast_interpret_mode(params: FastInterpretParams | None = None) -> None:
  """Makes fast interpret the process-wide default for Pallas calls.

  Like ``pltpu.set_tpu_interpret_mode``. Pass ``None`` to switch the global
  default off again (back to each call's own ``interpret`` argument).

  Args:
    params: the parameters to use, or None to unset.
  """
  if params is not None:
    _check(params)
  _jax.interpret_mode_config.set_global(params)


def params_for_level(level: str | None = None):
  """Interpret params for a fidelity level (default: the level in force).

  ``fast`` and ``checked`` give ``FastInterpretParams``; ``tpu`` gives
  ``pltpu.InterpretParams()`` (full simulation, race detection included).
  """
  if level is None:
    if flags.fidelity_level() == "tpu":
      return _jax.InterpretParams(detect_races=True)
    return FastInterpretParams()  # Field flags and variables apply.
  if level == "tpu":
    return _jax.InterpretParams(detect_races=True)
  return FastInterpretParams(**flags.preset_fields(level))


def _check(params) -> None:
  # pltpu.InterpretParams is allowed too: it is what fidelity level tpu means.
  if not isinstance(params, _jax.InterpretParams):
    raise TypeError(
        "fast_interpret: expected FastInterpretParams, got "
        f"{type(params).__name__}. For interpret=True use "
        "pltpu.force_tpu_interpret_mode(True).")
