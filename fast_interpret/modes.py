"""Switching existing code to fast interpret without editing it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from fast_interpret import _jax
from fast_interpret.params import FastInterpretParams


@contextlib.contextmanager
def force_fast_interpret_mode(
    params: FastInterpretParams | None = None) -> Iterator[FastInterpretParams]:
  """Runs every ``pallas_call``/``core_map`` traced inside under fast interpret.

  This is ``pltpu.force_tpu_interpret_mode`` with a ``FastInterpretParams``:
  calls that pass their own ``interpret=`` value are overridden too, as with
  JAX's context manager. Only calls *traced* inside the context are affected:
  a function jitted and cached before entering keeps its compiled form.

  Args:
    params: the parameters to use; ``FastInterpretParams()`` by default.

  Yields:
    The parameters in force.

  Example::

    with fast_interpret.force_fast_interpret_mode():
      out = flash_attention(q, k, v)
  """
  params = FastInterpretParams() if params is None else params
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


def _check(params) -> None:
  if not isinstance(params, FastInterpretParams):
    raise TypeError(
        "fast_interpret: expected FastInterpretParams, got "
        f"{type(params).__name__}. For JAX's own modes use "
        "pltpu.force_tpu_interpret_mode.")
