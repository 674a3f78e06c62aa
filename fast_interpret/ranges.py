"""Ranges of index scalars known while tracing: checks that cannot fail.

A bounds check costs a compare in the error word's fold, and a fold per
straight run of code; on a double-buffered DMA kernel the folds and the
copies of the word they cause were a third of the kernels of each grid
step, for slices whose starts can never be out of range (``i * rows`` with
``i`` a ``pl.loop`` index, ``i % 2``). The evaluator therefore keeps, beside
each traced integer or bool scalar it emits, an inclusive range ``[lo, hi]``
that holds on every execution, and ``checks.record_bounds`` drops a check
whose value's range lies inside its limits.

Stages:
  1. Sources: static values (their own value), the index of a loop of static
     length whose body adds 1 to it (``fori_loop`` with static bounds), a
     program id of a static grid axis and a grid coordinate where the
     schedule evaluates index maps (``[0, size)``), ``lax.axis_index`` of
     axes of the enclosing ``shard_map``'s mesh (``[0, devices)``), and a
     bool (``[0, 1]``).
  2. ``infer``, after each scalar equation: interval arithmetic for a few
     integer primitives (add, sub, mul, div and rem by a positive divisor,
     min, max, clamp, select, comparisons, logical ops, conversions). A
     result that could wrap around its dtype gets no range.
  3. ``refine``, entering a branch of a conditional: the branch runs only
     where its index selects it, so the index's range narrows, and through
     the equations that defined it (a comparison with a constant, a
     conversion, the addition of a constant) the ranges of its operands
     narrow too, in a scope of the branch's own (``child``).

Ranges are keyed by the identity of the traced value (kept alive with the
entry, so an id is never reused); a value the evaluator did not see (a
fence's copy, a branch's operand re-read) simply has no range, and its
checks stay.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from jax import lax
import jax
import numpy as np

from fast_interpret import _jax


@dataclasses.dataclass(frozen=True)
class Known:
  """What is known of one traced scalar.

  Attributes:
    value: the traced value (kept so that its id stays its own).
    lo, hi: inclusive bounds that hold on every execution.
    defn: ``(primitive, operands)`` of the equation that computed it, for
      ``refine``; None where narrowing it says nothing of its operands.
  """

  value: Any
  lo: int
  hi: int
  defn: tuple[Any, tuple[Any, ...]] | None = None


class Ranges:
  """Ranges of traced scalars, in nested scopes (see the module docstring).

  A scope sees the entries of the scopes it was made from; its own entries
  (narrower ranges inside a branch, values computed there) stay its own.
  """

  def __init__(self, parent: Ranges | None = None):
    self._entries: dict[int, Known] = {}
    self._parent = parent

  def child(self) -> Ranges:
    return Ranges(self)

  def _lookup(self, x) -> Known | None:
    scope = self
    while scope is not None:
      entry = scope._entries.get(id(x))
      if entry is not None:
        return entry if entry.value is x else None
      scope = scope._parent
    return None

  def get(self, x) -> tuple[int, int] | None:
    """``(lo, hi)`` of ``x``: its value if static, else its known range."""
    static = _static(x)
    if static is not None:
      return static, static
    entry = self._lookup(x)
    return None if entry is None else (entry.lo, entry.hi)

  def has_range(self, x) -> bool:
    """Whether ``x`` is a traced value with a known range."""
    return self._lookup(x) is not None

  def set(self, x, lo: int, hi: int, defn=None) -> None:
    """Records ``x`` in ``[lo, hi]`` (ignored for a value that is static)."""
    if _static(x) is None and isinstance(x, jax.core.Tracer):
      self._entries[id(x)] = Known(x, int(lo), int(hi), defn)

  def within(self, x, lo: int, hi: int) -> bool:
    """Whether ``x`` lies in ``[lo, hi]`` on every execution."""
    known = self.get(x)
    return known is not None and lo <= known[0] and known[1] <= hi

  def refine(self, x, lo: int, hi: int, depth: int = 4) -> None:
    """Narrows ``x`` to ``[lo, hi]`` in this scope, and what defined it."""
    if _static(x) is not None or not _is_int_scalar(x):
      return
    entry = self._lookup(x)
    dlo, dhi = _dtype_limits(x)
    old_lo, old_hi = (dlo, dhi) if entry is None else (entry.lo, entry.hi)
    lo, hi = max(lo, old_lo), min(hi, old_hi)
    if lo > hi:  # The branch never runs: nothing to learn.
      return
    defn = None if entry is None else entry.defn
    self.set(x, lo, hi, defn)
    if defn is None or depth == 0:
      return
    prim, ops = defn
    if prim is lax.convert_element_type_p or prim is _jax.multiple_of_p:
      self.refine(ops[0], lo, hi, depth - 1)
    elif prim is lax.add_p or prim is lax.sub_p:
      a, b = ops
      sign = 1 if prim is lax.add_p else -1
      if _static(b) is not None:
        c = sign * _static(b)
        self.refine(a, lo - c, hi - c, depth - 1)
      elif _static(a) is not None and prim is lax.add_p:
        self.refine(b, lo - _static(a), hi - _static(a), depth - 1)
    elif prim is lax.not_p and _is_bool(x):
      self.refine(ops[0], 1 - hi, 1 - lo, depth - 1)
    elif prim is lax.and_p and _is_bool(x) and lo == 1:
      for op in ops:
        self.refine(op, 1, 1, depth - 1)
    elif prim is lax.or_p and _is_bool(x) and hi == 0:
      for op in ops:
        self.refine(op, 0, 0, depth - 1)
    elif prim in _COMPARISONS and lo == hi:
      self._refine_comparison(prim, ops, bool(lo), depth - 1)

  def _refine_comparison(self, prim, ops, holds: bool, depth: int) -> None:
    a, b = ops
    if not holds:
      prim = _NEGATED[prim]
    ra, rb = self.get(a), self.get(b)
    if prim is lax.lt_p or prim is lax.le_p:
      strict = 1 if prim is lax.lt_p else 0
      if rb is not None:
        self.refine(a, -2**63, rb[1] - strict, depth)
      if ra is not None:
        self.refine(b, ra[0] + strict, 2**63, depth)
    elif prim is lax.gt_p or prim is lax.ge_p:
      self._refine_comparison(_SWAPPED[prim], (b, a), True, depth)
    elif prim is lax.eq_p:
      if rb is not None:
        self.refine(a, *rb, depth)
      if ra is not None:
        self.refine(b, *ra, depth)


_COMPARISONS = frozenset({lax.lt_p, lax.le_p, lax.gt_p, lax.ge_p, lax.eq_p,
                          lax.ne_p})
_NEGATED = {lax.lt_p: lax.ge_p, lax.le_p: lax.gt_p, lax.gt_p: lax.le_p,
            lax.ge_p: lax.lt_p, lax.eq_p: lax.ne_p, lax.ne_p: lax.eq_p}
_SWAPPED = {lax.gt_p: lax.lt_p, lax.ge_p: lax.le_p}


def _static(x) -> int | None:
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
    x = np.asarray(x)
  if isinstance(x, (bool, np.bool_)):
    return int(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "biu":
    return int(x)
  return None


def _is_bool(x) -> bool:
  return getattr(x, "dtype", None) == np.bool_


def _is_int_scalar(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return (getattr(x, "shape", None) == () and dtype is not None
          and np.dtype(dtype).kind in "biu")


def _dtype_limits(x) -> tuple[int, int]:
  return _limits_of(np.dtype(x.dtype))


@functools.cache
def _limits_of(dtype: np.dtype) -> tuple[int, int]:
  # Cached: np.iinfo takes longer than the rest of a range lookup.
  if dtype == np.bool_:
    return 0, 1
  info = np.iinfo(dtype)
  return int(info.min), int(info.max)


def _hull(*ranges):
  return min(r[0] for r in ranges), max(r[1] for r in ranges)


def _compare(prim, a, b) -> tuple[int, int]:
  """Range (as 0/1) of the comparison of two ranges."""
  if prim is lax.gt_p or prim is lax.ge_p:
    return _compare(_SWAPPED[prim], b, a)
  if prim is lax.ne_p:
    lo, hi = _compare(lax.eq_p, a, b)
    return 1 - hi, 1 - lo
  if prim is lax.eq_p:
    if a[0] == a[1] == b[0] == b[1]:
      return 1, 1
    return (0, 0) if a[1] < b[0] or b[1] < a[0] else (0, 1)
  strict = prim is lax.lt_p
  if (a[1] < b[0]) if strict else (a[1] <= b[0]):
    return 1, 1
  if (a[0] >= b[1]) if strict else (a[0] > b[1]):
    return 0, 0
  return 0, 1


def _div(a, b):
  """C division (toward zero) of range ``a`` by a positive range ``b``."""
  if b[0] <= 0:
    return None
  corners = [_div_toward_zero(x, y) for x in a for y in b]
  return min(corners), max(corners)


def _div_toward_zero(x: int, y: int) -> int:
  q = abs(x) // abs(y)
  return q if (x < 0) == (y < 0) else -q


def _rem(a, b):
  """C remainder (sign of the dividend) of ``a`` by a positive range ``b``."""
  if b[0] <= 0:
    return None
  top = b[1] - 1
  if a[0] >= 0:
    return 0, min(a[1], top)
  if a[1] <= 0:
    return max(a[0], -top), 0
  return -top, top


def _interval(prim, rs, params):
  """The range of ``prim`` applied to operand ranges ``rs``, or None."""
  if prim is lax.add_p:
    return rs[0][0] + rs[1][0], rs[0][1] + rs[1][1]
  if prim is lax.sub_p:
    return rs[0][0] - rs[1][1], rs[0][1] - rs[1][0]
  if prim is lax.mul_p:
    corners = [x * y for x in rs[0] for y in rs[1]]
    return min(corners), max(corners)
  if prim is lax.neg_p:
    return -rs[0][1], -rs[0][0]
  if prim is lax.max_p:
    return max(rs[0][0], rs[1][0]), max(rs[0][1], rs[1][1])
  if prim is lax.min_p:
    return min(rs[0][0], rs[1][0]), min(rs[0][1], rs[1][1])
  if prim is lax.clamp_p:
    lo, x, hi = rs
    return (min(max(x[0], lo[0]), hi[0]), min(max(x[1], lo[1]), hi[1]))
  if prim is lax.div_p:
    return _div(*rs)
  if prim is lax.rem_p:
    return _rem(*rs)
  if prim is lax.select_n_p:
    which, *cases = rs
    picked = cases[max(0, which[0]):min(len(cases) - 1, which[1]) + 1]
    return _hull(*picked) if picked else None
  if prim in _COMPARISONS:
    return _compare(prim, *rs)
  if prim is lax.not_p:
    return 1 - rs[0][1], 1 - rs[0][0]
  if prim is lax.and_p or prim is lax.or_p:
    if all(0 <= r[0] and r[1] <= 1 for r in rs):
      op = min if prim is lax.and_p else max
      return op(rs[0][0], rs[1][0]), op(rs[0][1], rs[1][1])
    if prim is lax.and_p:  # x & m lies in [0, m] for m >= 0.
      masks = [r[1] for r in rs if r[0] >= 0]
      return (0, min(masks)) if masks else None
    return None
  if prim is lax.convert_element_type_p or prim is _jax.multiple_of_p:
    return rs[0]
  del params
  return None


# Primitives whose output range ``infer`` computes.
INFERRED = frozenset({
    lax.add_p, lax.sub_p, lax.mul_p, lax.neg_p, lax.max_p, lax.min_p,
    lax.clamp_p, lax.div_p, lax.rem_p, lax.select_n_p, lax.not_p, lax.and_p,
    lax.or_p, lax.convert_element_type_p, _jax.multiple_of_p}) | _COMPARISONS

# Primitives ``refine`` looks through (see ``Ranges.refine``).
_REFINED = frozenset({lax.convert_element_type_p, _jax.multiple_of_p,
                      lax.add_p, lax.sub_p, lax.not_p, lax.and_p,
                      lax.or_p}) | _COMPARISONS


def infer(ranges: Ranges, eqn: _jax.JaxprEqn, invals, out) -> None:
  """Records the range of ``eqn``'s scalar integer or bool output ``out``."""
  if not _is_int_scalar(out) or not isinstance(out, jax.core.Tracer):
    return
  rs = []
  for x in invals:
    r = ranges.get(x)
    if r is None:  # Any value of its dtype.
      if not _is_int_scalar(x):
        return
      r = _dtype_limits(x)
    rs.append(r)
  r = _interval(eqn.primitive, rs, eqn.params)
  if r is None:
    return
  lo, hi = _dtype_limits(out)
  if r[0] < lo or r[1] > hi:
    return  # It could wrap around.
  defn = (eqn.primitive, tuple(invals)) if eqn.primitive in _REFINED else None
  ranges.set(out, r[0], r[1], defn)


def branch_taken(ranges: Ranges, index, k: int, num_branches: int) -> None:
  """Narrows ``ranges`` (a branch's scope) to where branch ``k`` runs.

  ``lax.switch`` clamps its index: the first branch runs for any index
  below 0, the last for any index past the end.
  """
  lo = -2**63 if k == 0 else k
  hi = 2**63 if k == num_branches - 1 else k
  ranges.refine(index, lo, hi)


def counter_range(ranges: Ranges, init, length: int) -> tuple[int, int] | None:
  """Range of a loop counter that starts at ``init`` and adds 1 per iteration
  of a loop of ``length`` iterations (its value inside the body)."""
  r = ranges.get(init)
  if r is None or length < 1:
    return None
  return r[0], r[1] + length - 1
