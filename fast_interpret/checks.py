"""Runtime checks: an error word in the kernel state, raised after the call.

When a check is enabled, ``KernelState.buffers[ERROR_ID]`` holds an int32
vector ``[site + 1, grid step, v0, v1, ...]``; 0 in the first slot means no
error. A check that fails at run time records its *site* (a static message
template registered while tracing) and the offending values, unless an
error of an earlier (or the same) grid step is already recorded: the first
error wins, as on hardware where the first fault stops the kernel. (Checks
of the whole grid made before the loop, see schedule.py, record the step they
concern, so a kernel error at an earlier step still wins over them.)

After the grid loop, one host callback reads the word and raises
``KernelCheckError`` with the kernel name, the operand, the grid step and the
values. That callback is emitted only when some check is enabled and the
kernel has a dynamic check site; with every check off the program holds no
callback at all. A check whose outcome is known while tracing (a static index
out of bounds) raises at trace time instead.

Errors leave no global state behind: the next call starts clean.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
from jax import lax
from jax.experimental import io_callback
import jax.numpy as jnp
import numpy as np

from fast_interpret import errors

ERROR_ID = -1
_NUM_VALUES = 6
_WORD = 2 + _NUM_VALUES


class KernelCheckError(errors.FastInterpretError, RuntimeError):
  """A runtime check failed inside a fast-interpreted kernel."""


@dataclasses.dataclass
class Sites:
  """Message templates of the checks in one kernel, indexed by site id."""

  kernel_name: str
  templates: list[str] = dataclasses.field(default_factory=list)

  def add(self, template: str) -> int:
    self.templates.append(template)
    return len(self.templates) - 1

  def message(self, word: np.ndarray, device: int | None = None) -> str:
    site, step = int(word[0]) - 1, int(word[1])
    values = [int(v) for v in word[2:]]
    where = "" if device is None else f", device {device}"
    return (f"fast_interpret: {self.templates[site].format(*values)} "
            f"(kernel {self.kernel_name!r}, grid step {step}{where})")


def initial_word() -> jax.Array:
  return jnp.zeros((_WORD,), jnp.int32)


def record(state, sites: Sites, step, failed, template: str,
           values: Sequence[Any] = ()):
  """Returns ``state`` with an error recorded where ``failed`` holds.

  ``template`` is formatted with ``values`` (up to six ints) when the error is
  reported. A ``failed`` known to be True while tracing raises now.
  """
  if failed is None or failed is False:
    return state
  if failed is True:
    static = [int(v) if _is_static(v) else "?" for v in values]
    raise KernelCheckError(
        f"fast_interpret: {template.format(*static)} "
        f"(kernel {sites.kernel_name!r}, found while tracing)")
  if ERROR_ID not in state.buffers:
    return state
  site = sites.add(template)
  vals = [jnp.asarray(v, jnp.int32).reshape(()) for v in values][:_NUM_VALUES]
  vals += [jnp.int32(0)] * (_NUM_VALUES - len(vals))
  new = jnp.stack([jnp.int32(site + 1), jnp.asarray(step, jnp.int32), *vals])
  return dataclasses.replace(state, pending=(*state.pending, (failed, new)))


def flush(state):
  """Folds the pending records into the error word: one update for many.

  Updating the word at every check site costs a separate tiny XLA kernel
  each; folding a straight-line run of records into one select chain lets
  XLA fuse them. Called at the end of every traced body and before control
  flow, so records stay in program order.
  """
  if not state.pending:
    return state
  entries = state.pending
  failed_any = entries[0][0]
  for failed, _ in entries[1:]:
    failed_any = failed_any | failed
  new = entries[-1][1]
  for failed, candidate in reversed(entries[:-1]):
    new = jnp.where(failed, candidate, new)
  word = _first(state.read(ERROR_ID), new, failed_any)
  return dataclasses.replace(state, pending=()).write(ERROR_ID, word)


def _first(word, new, failed):
  """The error of the earlier grid step; the one recorded first on a tie."""
  keep_old = (word[0] != 0) & (word[1] <= new[1])
  return jnp.where(keep_old | ~failed, word, new)


def merge_first(state, words):
  """Records the first error among ``words`` ([n, word] from a vmap)."""
  failed = words[:, 0] != 0
  new = words[jnp.argmax(failed)]
  return state.write(ERROR_ID, _first(state.read(ERROR_ID), new,
                                      jnp.any(failed)))


def raise_static(sites: Sites, template: str, values: Sequence[Any],
                 step: int):
  """Raises, while tracing, an error known to happen at grid step ``step``."""
  raise KernelCheckError(
      f"fast_interpret: {template.format(*[int(v) for v in values])} "
      f"(kernel {sites.kernel_name!r}, grid step {step}, found while "
      "tracing)")


def placeholders(n: int) -> str:
  """``"{0}, {1}, ..."`` for the first ``n`` reported values (at most six)."""
  return ", ".join(f"{{{i}}}" for i in range(min(n, _NUM_VALUES)))


def _is_static(v) -> bool:
  return isinstance(v, (int, np.integer)) or (
      isinstance(v, np.ndarray) and v.shape == ())


def raise_if_failed(word, sites: Sites, device=None, reporter=True) -> None:
  """Emits the one host callback that raises a recorded error.

  In a multi-device kernel, ``word`` and ``device`` are those of the first
  device that failed (see ``remote.first_error``) and only the ``reporter``
  device raises, so that one error comes back, naming that device.
  """
  if not sites.templates:
    return

  def check(word, *device):
    word = np.asarray(word)
    if word[0] != 0:
      raise KernelCheckError(sites.message(
          word, int(device[0]) if device else None))

  args = (word,) if device is None else (word, device)
  # The host is called only when an error was recorded: a host callback
  # costs about 2 ms per call on CPU, far more than the checks themselves.
  lax.cond((word[0] != 0) & reporter,
           lambda *a: io_callback(check, None, *a), lambda *a: None, *args)


def bounds_report(ctx) -> list | None:
  """A list to collect bounds records in, or None when bounds are unchecked."""
  return [] if ctx.check_bounds else None


def record_bounds(ctx, state, report, name: str, what: str):
  """Records an error for every out-of-bounds indexer in ``report``."""
  for bad, starts, shape in report or ():
    starts = list(starts)[:_NUM_VALUES]
    where = placeholders(len(starts))
    template = (f"out of bounds: {what} of {name} at index [{where}] (the "
                f"start of each dimension) in a view of shape {shape}")
    state = record(state, ctx.sites, ctx.grid_step, bad, template, starts)
  return state
