"""Runtime checks: an error word in the kernel state, raised after the call.

When a check is enabled, ``KernelState.buffers[ERROR_ID]`` holds an int32
vector ``[site + 1, grid step, v0, v1, ...]``; 0 in the first slot means no
error. A check that fails at run time records its *site* (a static message
template registered while tracing) and the offending values, unless an
error of an earlier (or the same) grid step is already recorded: the first
error wins, as on hardware where the first fault stops the kernel. (Checks
of the whole grid made before the loop, see schedule.py, record the step they
concern, so a kernel error at an earlier step still wins over them.)

Stages of a check:
  1. ``record_outside`` (a value against static limits, one range per
     dimension of an index) or ``record`` (a boolean, the range [0, 0] of
     its predicate) adds a pending ``Record`` to the state; a value known
     while tracing is checked now. ``Record.gated`` masks records of
     predicated code.
  2. ``flush``, at the end of each straight run of code, keeps one record
     per (value, limits, gate, step), and folds the run into the word with
     one scalar select chain per word slot (one fused XLA kernel for the
     run, not one per check).
  3. ``raise_if_failed``, after the grid, raises through one host callback
     reached only when the word holds an error. Checks of the kernel's end
     may instead be a ``HostCheck``: values handed to that callback and
     decoded there, after every record of the word (no kernels of their
     own beyond a reduction that says whether any failed). With several
     devices, every device's word and values are gathered and the
     callback picks the first device that failed.

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
from fast_interpret.state import as_int32

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
  """No error yet: site 0; the step slot holds -1 (no step).

  Not all zeros on purpose: XLA turns a constant of equal elements into a
  broadcast, a fusion kernel of its own on XLA:CPU (about 20 ms of compile
  time); this constant stays a constant. Only the site slot is read while
  it is 0.
  """
  word = np.zeros((_WORD,), np.int32)
  word[1] = -1
  return jnp.asarray(word)


@dataclasses.dataclass(frozen=True)
class Record:
  """A pending check: it fails when ``value`` lies outside ``[lo, hi]``.

  A range, not a boolean: limits are static, so a check costs a compare
  against constants inside the flush's one fused kernel, and records of
  the same value against the same limits (the same SMEM value read by
  several accesses) are folded once. A boolean check is the range ``[0,
  0]`` of its predicate.

  Attributes:
    site: the message template's id in ``Sites`` (an int, or a traced int32
      picked from several registered sites).
    step: the grid step reported (int or traced scalar).
    values: up to six ints the template is formatted with.
    value: the checked integer (or bool) scalar; traced.
    lo, hi: inclusive static limits.
    gate: None, or a traced bool: the record can fail only where it holds
      (records of code that ran under a predicate).
  """

  site: Any
  step: Any
  values: tuple[Any, ...]
  value: Any
  lo: int = 0
  hi: int = 0
  gate: Any = None

  def gated(self, predicate) -> Record:
    """This record, able to fail only where ``predicate`` holds too."""
    if predicate is None:
      return self
    gate = predicate if self.gate is None else self.gate & predicate
    return dataclasses.replace(self, gate=gate)

  def key(self) -> tuple:
    """Records with equal keys fail together: only the first one counts."""
    return (id(self.value), self.lo, self.hi, id(self.gate), id(self.step))

  def failed(self) -> jax.Array:
    """The traced scalar predicate: this record's check fails."""
    # lax calls: JAX's operator overloads are a jitted call each while
    # tracing, and a kernel records hundreds of checks.
    value, lo, hi = _comparable(self.value, self.lo, self.hi)
    value = _scalar(value)
    bad = lax.bitwise_or(lax.lt(value, np.array(lo, value.dtype)),
                         lax.gt(value, np.array(hi, value.dtype)))
    if self.gate is None:
      return bad
    return lax.bitwise_and(bad, _scalar(jnp.asarray(self.gate)))


def _comparable(value, lo: int, hi: int):
  """(value, lo, hi) in a dtype where the comparison means what it says.

  Values of up to 32 bits are compared as int32. An unsigned value of 2^31
  or more wraps to a negative int32; raising ``lo`` to at least 0 makes it
  fail, as it must (it exceeds every int32 limit). Wider values (x64) are
  compared in their own dtype, with limits clipped into its range.
  """
  if not isinstance(value, jax.Array):
    value = jnp.asarray(value)
  dtype = value.dtype
  if dtype == jnp.bool_:
    return as_int32(value), lo, hi
  unsigned = jnp.issubdtype(dtype, jnp.unsignedinteger)
  if unsigned:
    lo = max(lo, 0)
  if dtype.itemsize <= 4:
    return as_int32(value), lo, hi
  info = jnp.iinfo(dtype)
  return value, max(lo, int(info.min)), min(hi, int(info.max))


def _static_report(sites: Sites, template: str, values: Sequence[Any]):
  static = [int(v) if _is_static(v) else "?" for v in values]
  raise KernelCheckError(
      f"fast_interpret: {template.format(*static)} "
      f"(kernel {sites.kernel_name!r}, found while tracing)")


def record(state, sites: Sites, step, failed, template: str,
           values: Sequence[Any] = ()):
  """Returns ``state`` with an error recorded where ``failed`` holds.

  ``template`` is formatted with ``values`` (up to six ints) when the error is
  reported. A ``failed`` known to be True while tracing raises now.
  """
  if failed is None or failed is False:
    return state
  if failed is True:
    _static_report(sites, template, values)
  if ERROR_ID not in state.buffers:
    return state
  return add_records(state, [Record(sites.add(template), step,
                                    _values(values), failed)])


def record_outside(state, sites: Sites, step, ranges, template: str,
                   values: Sequence[Any] = ()):
  """Records an error where any ``(value, lo, hi)`` has value outside [lo, hi].

  One site for all the ranges (they share the message). ``lo`` and ``hi``
  are static ints; a value known while tracing is checked now, and raises
  when it is out of range.
  """
  dynamic = []
  for value, lo, hi in ranges:
    if _is_static(value):
      if not lo <= int(value) <= hi:
        _static_report(sites, template, values)
    else:
      dynamic.append((value, int(lo), int(hi)))
  if not dynamic or ERROR_ID not in state.buffers:
    return state
  site, vals = sites.add(template), _values(values)
  return add_records(state, [Record(site, step, vals, v, lo, hi)
                             for v, lo, hi in dynamic])


def add_records(state, records: Sequence[Record]):
  """``state`` with ``records`` pending, after those already there."""
  return dataclasses.replace(state, pending=(*state.pending, *records))


def _values(values: Sequence[Any]) -> tuple[Any, ...]:
  return tuple(values)[:_NUM_VALUES]


def flush(state):
  """Folds the pending records into the error word: one update for many.

  Updating the word at every check site costs a separate tiny XLA kernel
  each. Here the run's records, duplicates dropped, become scalar select
  chains, one per slot of the word, in reverse program order so that the
  first failing record's site, step and values come out; a slot whose
  records all hold the same value needs no chain. The chains are scalar
  elementwise code that XLA fuses into one loop kernel together with the
  index arithmetic feeding them. (A vector of the values compared at once
  and a table read at the first failure's index was tried: it makes fewer
  HLO instructions, but every checked value must then be materialised for
  the stack, one small kernel each; paged attention ran 1.34x the unchecked
  time that way, against 1.03x with the chains.) Called at the end of every
  traced body and before control flow, so records stay in program order.
  """
  if not state.pending and state.deferred is None:
    return state
  word = state.read(ERROR_ID)
  if state.pending:
    site, new = _fold(state.pending)
    word = _first(word, new, lax.ne(site, np.int32(0)))
  held = state.deferred
  if held is not None:
    # Records from before a conditional come first: where one failed and
    # the word before it held no error of an earlier or the same grid step
    # (it may hold one of a later step, from the checks of the whole grid
    # made before the loop), theirs wins over the word's: the conditional
    # only added records of this same step, after them. Otherwise the word
    # kept the earlier error and is right. Each vector is used once, so
    # that XLA fuses all of it into one kernel.
    site, new = _fold(held.records)
    word = _select_word(
        _new_wins(held.word, new, lax.ne(site, np.int32(0))), new, word)
  return dataclasses.replace(state, pending=(), deferred=None).write(
      ERROR_ID, word)


def _fold(pending) -> tuple[jax.Array, jax.Array]:
  """(site, word) of the first failing record of ``pending`` (site 0: none).
  """
  seen, records = set(), []
  for r in pending:
    if r.key() not in seen:
      seen.add(r.key())
      records.append(r)
  bad = [r.failed() for r in records]
  # Site 0 means "no error": the site chain starts from it, and tells
  # whether any record failed.
  slots = [[r.step for r in records]]
  for j in range(_NUM_VALUES):
    slots.append([r.values[j] if j < len(r.values) else 0 for r in records])
  site = _select_first(bad, [_plus_one(r.site) for r in records], default=0)
  # lax.stack: every slot is int32 already (jnp.stack would promote).
  return site, lax.stack([site, *(_select_first(bad, items)
                                  for items in slots)])


@dataclasses.dataclass(frozen=True)
class Deferred:
  """Check records held back across conditionals (see ``defer``).

  Attributes:
    records: the records, in program order.
    word: the error word before the first of those conditionals.
  """

  records: tuple[Record, ...]
  word: Any


def defer(state):
  """``state`` ready to enter a conditional, its pending records held back.

  A flush before a conditional is a fusion kernel of its own on XLA:CPU
  (the word must be materialised to enter it; 20-150 ms of compile time
  for a long run of checks). Held back (``KernelState.deferred``), the
  records are folded by the next ``flush`` after the conditional, in one
  kernel with the records that follow it. Records of the conditional's
  branches land in the word meanwhile; ``flush`` puts the held ones first.
  Only one group is held: a second one flushes both.
  """
  if not state.pending or ERROR_ID not in state.buffers:
    return state
  if state.deferred is not None:
    return flush(state)
  return dataclasses.replace(state, pending=(), deferred=Deferred(
      state.pending, state.read(ERROR_ID)))


def _select_first(bad, items, default=None) -> jax.Array:
  """``items[i]`` for the first ``i`` where ``bad[i]``; else ``default``.

  Without a default, the last item stands for it (its own select is then
  needless: when no record failed the slot is not read). Selects between
  equal entries (the same tracer, or equal static ints) are skipped.
  """
  if default is None:
    acc, order = items[-1], range(len(items) - 2, -1, -1)
  else:
    acc, order = default, range(len(items) - 1, -1, -1)
  for i in order:
    if not _same(items[i], acc):
      acc = lax.select(bad[i], _int32(items[i]), _int32(acc))
  return _int32(acc)


def _same(a, b) -> bool:
  if a is b:
    return True
  return _is_static(a) and _is_static(b) and int(a) == int(b)


def _int32(x) -> jax.Array:
  return _scalar(as_int32(x))


def _scalar(x: jax.Array) -> jax.Array:
  """``x`` (one element) of shape ().

  Already a scalar, ``x`` itself: ``reshape`` on a scalar tracer records a
  needless equation, and the fold makes a few per record.
  """
  return x if x.shape == () else lax.reshape(x, ())


def _plus_one(site):
  """``site + 1``; a traced site (picked at run time) with a lax call."""
  if isinstance(site, (int, np.integer)):
    return site + 1
  return lax.add(site, np.int32(1))


def _slot(word, i: int):
  return lax.index_in_dim(word, i, keepdims=False)


def _first(word, new, failed):
  """The error of the earlier grid step; the one recorded first on a tie."""
  return _select_word(_new_wins(word, new, failed), new, word)


def _new_wins(word, new, failed):
  """Whether ``new`` (where ``failed``) replaces the error in ``word``: the
  word holds none of an earlier or the same grid step."""
  # lax calls, not jnp operators: this runs at every flush, and each jnp
  # operator on a tracer costs a jitted wrapper while tracing.
  keep_old = lax.bitwise_and(lax.ne(_slot(word, 0), np.int32(0)),
                             lax.le(_slot(word, 1), _slot(new, 1)))
  return lax.bitwise_and(failed, lax.bitwise_not(keep_old))


def _select_word(take, new, word):
  return lax.select(lax.broadcast_in_dim(take, word.shape, ()), new, word)


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


@dataclasses.dataclass(frozen=True)
class HostCheck:
  """Checks decoded on the host, after every record of the error word.

  Attributes:
    values: a traced int32 vector, handed to the error callback.
    failed: a traced bool: some check fails (the callback is then called).
    records: ``values`` (NumPy) -> ``(site, step, values, failed)`` per
      check, in program order, with the same meaning as a ``Record``'s.
  """

  values: Any
  failed: Any
  records: Any


def _first_on_host(word: np.ndarray, records) -> np.ndarray:
  """``word`` after ``records`` folded in as ``flush`` folds a run of them:
  the first that failed, unless the word holds an error of an earlier (or
  the same) grid step."""
  for site, step, values, failed in records:
    if not failed:
      continue
    if word[0] != 0 and word[1] <= step:
      return word
    new = np.zeros_like(word)
    new[:2] = site + 1, step
    values = np.asarray(values, np.int32).ravel()[:_NUM_VALUES]
    new[2:2 + values.size] = values
    return new
  return word


def raise_if_failed(word, sites: Sites, host_check: HostCheck | None = None,
                    gather=None, reporter=True) -> None:
  """Emits the one host callback that raises a recorded error.

  ``host_check`` adds checks decoded in the callback, after the word's.
  In a multi-device kernel, ``gather`` stacks every device's vector (one
  ``all_gather``): the word, the host check's values and whether the
  device failed. Only the ``reporter`` device calls the host, when some
  device failed; the callback finds the first such device, decodes its
  word and host check, and raises that error, naming the device, so that
  one error comes back (raising on each failing device would leave errors
  pending in JAX's runtime tokens). Picking the device on the host keeps
  the program to the gather and a reduction.
  """
  if not sites.templates:
    return
  size = word.shape[0]

  def decode(word, values=None):
    """The word after the host check's records (``values``) are folded in."""
    word = np.asarray(word)
    if values is None:
      return word
    return _first_on_host(word, host_check.records(np.asarray(values)))

  def check(word, values=None):
    word = decode(word, values)
    if word[0] != 0:
      raise KernelCheckError(sites.message(word))

  def check_devices(rows):
    for device, row in enumerate(np.asarray(rows)):
      if row[-1] != 0:  # The first device that failed.
        word = decode(row[:size], None if host_check is None
                      else row[size:-1])
        if word[0] != 0:
          raise KernelCheckError(sites.message(word, device))
        return

  failed = lax.ne(_slot(word, 0), np.int32(0))
  parts = [word]
  if host_check is not None:
    failed = lax.bitwise_or(failed, host_check.failed)
    parts.append(host_check.values)
  # The host is called only when an error was recorded: a host callback
  # costs about 2 ms per call on CPU, far more than the checks themselves.
  if gather is None:
    lax.cond(failed, lambda *a: io_callback(check, None, *a),
             lambda *a: None, *parts)
    return
  parts.append(lax.reshape(lax.convert_element_type(failed, jnp.int32), (1,)))
  rows = gather(lax.concatenate(parts, 0))
  any_failed = lax.ne(lax.reduce_max(rows[:, -1], (0,)), np.int32(0))
  lax.cond(lax.bitwise_and(any_failed, reporter),
           lambda r: io_callback(check_devices, None, r), lambda r: None, rows)


def bounds_report(ctx) -> list | None:
  """A list to collect bounds records in, or None when bounds are unchecked."""
  return [] if ctx.check_bounds else None


def record_bounds(ctx, state, report, name: str, what: str):
  """Records range checks for every indexer in ``report`` (see views.py).

  Each entry is ``(ranges, starts, shape)``: per dimension ``(value, lo,
  hi)`` ranges that must hold, and the starts reported on failure. A range
  that ``ctx.ranges`` shows to hold on every execution is no check at all
  (see ranges.py).
  """
  for ranges, starts, shape in report or ():
    if ctx.ranges is not None:
      ranges = [(v, lo, hi) for v, lo, hi in ranges
                if not ctx.ranges.within(v, lo, hi)]
    starts = list(starts)[:_NUM_VALUES]
    where = placeholders(len(starts))
    template = (f"out of bounds: {what} of {name} at index [{where}] (the "
                f"start of each dimension) in a view of shape {shape}")
    state = record_outside(state, ctx.sites, ctx.grid_step, ranges, template,
                           starts)
  return state
