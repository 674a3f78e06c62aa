"""Fusion fences: keep XLA:CPU from re-computing long unrolled chains.

XLA:CPU's loop fusion duplicates cheap elementwise producers into every
consumer fusion. On kernels that unroll long chains of compare/select steps
in Python (sorting networks), every step then recomputes the whole chain
behind it: the HLO of an (8,128) bitonic sort grows from ~4k to ~100k
instructions and takes ~55 s to compile.

A fence materialises values: it passes them through a ``lax.cond`` whose
predicate is true at run time but opaque to the compiler, so fusion cannot
cross it and nothing behind it is recomputed. In a large jaxpr we fence, every
24 to 48 equations (``FENCE_WINDOW``), the live arrays that have been
computed by at least two equations since the last fence, choosing within
that window the point where the fewest such arrays are live. Small jaxprs (every ordinary
kernel) are left alone. A fence costs one conditional at run time. While
tracing, a fence (packing, conditional, unpacking) is traced once per
signature of fenced values and inlined at each fence that repeats it,
rather than traced again each time. Outside loops, values
of one shape and width pass a fence packed two by two into integers of
twice the width, so that one fusion kernel computes both (``_pair``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax

# Jaxprs with at most this many equations are never fenced.
MIN_FENCED_EQNS = 200
# Equations between two fences: at least the first, at most the second; the
# fence goes where the fewest values must pass it.
FENCE_WINDOW = (24, 48)
# A value is fenced once this many equations produced it since the last fence.
MIN_DEPTH = 2


def opaque_true(*candidates) -> Any:
  """A scalar bool that is True but that XLA cannot prove True.

  Derived from the bits of the first array candidate: ``popcount >= 0`` on a
  signed integer (on an unsigned one the compiler folds the comparison).
  """
  for x in candidates:
    if hasattr(x, "dtype") and getattr(x, "size", 0):
      # lax calls: jnp indexing and operators are jitted calls while tracing.
      first = lax.index_in_dim(lax.reshape(x, (x.size,)), 0, keepdims=False)
      width = _jax.itemsize_bits(first.dtype)  # 4 for int4, not 8
      if jnp.issubdtype(first.dtype, jnp.bool_) or width not in (8, 16, 32, 64):
        bits = lax.convert_element_type(first, jnp.int32)
      else:
        bits = lax.bitcast_convert_type(first, jnp.dtype(f"int{width}"))
      return lax.ge(lax.population_count(bits), np.array(0, bits.dtype))
  return None


@functools.lru_cache(maxsize=1024)
def _last_uses(jaxpr: _jax.Jaxpr) -> dict[_jax.Var, int]:
  last = {}
  for i, eqn in enumerate(jaxpr.eqns):
    for v in eqn.invars:
      if isinstance(v, _jax.Var):
        last[v] = i
  for v in jaxpr.outvars:
    if isinstance(v, _jax.Var):
      last[v] = len(jaxpr.eqns)
  return last


def _is_array(v) -> bool:
  return getattr(v.aval, "ndim", 0) > 0


@functools.lru_cache(maxsize=1024)
def _plan(jaxpr: _jax.Jaxpr) -> frozenset[int]:
  """Indices of the equations to fence before.

  Walks the jaxpr once with the depths the Fencer will see; when at least
  ``FENCE_WINDOW[0]`` equations have passed since the last fence, it looks
  ahead to ``FENCE_WINDOW[1]`` and fences where the fewest deep values are
  live. In an unrolled network that is between two steps, where only the
  carried arrays are live, rather than halfway through a step, where every
  temporary would be materialised.
  """
  eqns, last = jaxpr.eqns, _last_uses(jaxpr)
  lo, hi = FENCE_WINDOW

  def advance(i, depth, live):
    eqn = eqns[i]
    d = 1 + max((depth.get(v, 0) for v in eqn.invars
                 if isinstance(v, _jax.Var)), default=0)
    for v in eqn.outvars:
      depth[v] = d
      if last.get(v, -1) > i and _is_array(v):
        live.add(v)

  def deep(i, depth, live):
    return [v for v in live if last[v] >= i and depth[v] >= MIN_DEPTH]

  depth, live, plan, since, i = {}, set(), [], 0, 0
  while i < len(eqns):
    if i and since >= lo:
      trial_depth, trial_live = dict(depth), set(live)
      best, best_cost = i, None
      for p in range(i, min(i + hi - lo + 1, len(eqns))):
        cost = len(deep(p, trial_depth, trial_live))
        if best_cost is None or cost < best_cost:
          best, best_cost = p, cost
        advance(p, trial_depth, trial_live)
      for p in range(i, best):
        advance(p, depth, live)
      for v in deep(best, depth, live):
        depth[v] = 0
      plan.append(best)
      since, i = 0, best
    advance(i, depth, live)
    live = {v for v in live if last[v] > i}
    since, i = since + 1, i + 1
  return frozenset(plan)


class Fencer:
  """Decides where to fence while one jaxpr is evaluated."""

  def __init__(self, jaxpr: _jax.Jaxpr, predicate, pack: bool = True):
    self._enabled = (predicate is not None
                     and len(jaxpr.eqns) > MIN_FENCED_EQNS)
    self._predicate = predicate
    # Packed pairs (``_pair``) cost fewer kernels but run slower: only
    # outside loops, where each kernel runs once.
    self._pack = pack
    self._depth: dict[_jax.Var, int] = {}
    self._last = _last_uses(jaxpr) if self._enabled else {}
    self._plan = _plan(jaxpr) if self._enabled else frozenset()
    self._order = _first_uses(jaxpr) if self._enabled else {}
    # Variables of depth MIN_DEPTH or more that may still be used: the
    # candidates for the next fence (rather than every variable).
    self._deep: set[_jax.Var] = set()

  def before(self, i: int, eqn, env: dict) -> None:
    """Called before equation ``i``; may replace live values in ``env``."""
    if not self._enabled:
      return
    if i in self._plan:
      self._fence(i, env)
    depth = 1 + max((self._depth.get(v, 0) for v in eqn.invars
                     if isinstance(v, _jax.Var)), default=0)
    for v in eqn.outvars:
      self._depth[v] = depth
      if depth >= MIN_DEPTH and v in self._last:
        self._deep.add(v)

  def _fence(self, i: int, env: dict) -> None:
    self._deep = {v for v in self._deep if self._last[v] >= i}
    live = sorted((v for v in self._deep
                   if v in env and getattr(env[v], "ndim", 0) > 0),
                  key=self._order.__getitem__)
    if not live:
      return
    values = [env[v] for v in live]
    fence = _fence_jaxpr(tuple(jax.typeof(x) for x in values), self._pack)
    fenced = _jax.inline_jaxpr(fence, [self._predicate, *values])
    for v, x in zip(live, fenced, strict=True):
      env[v] = x
      self._depth[v] = 0
    self._deep.difference_update(live)


@functools.lru_cache(maxsize=1024)
def _first_uses(jaxpr: _jax.Jaxpr) -> dict[_jax.Var, int]:
  """Rank of each variable of ``_last_uses`` in its order (of first use).

  Fenced values go in this order, which decides how they pair up.
  """
  return {v: k for k, v in enumerate(_last_uses(jaxpr))}


@functools.lru_cache(maxsize=1024)
def _fence_jaxpr(avals, pack: bool) -> _jax.ClosedJaxpr:
  """The fence of values of ``avals``: ``(predicate, *values) -> values``.

  Traced once per signature and inlined at each fence (a large unrolled
  kernel repeats a few signatures), rather than traced again each time.
  """
  def fence(predicate, *values):
    values = list(values)
    packed, unpack = _pair(values) if pack else (values, lambda o: o)
    return list(unpack(_jax.cond_p.bind(
        lax.convert_element_type(predicate, jnp.int32), *packed,
        branches=_branches(tuple(jax.typeof(x) for x in packed)))))
  return _jax.trace_jaxpr(fence, [_jax.ShapedArray((), jnp.bool_), *avals])


def _pair(values):
  """Packs values of one shape and width two by two into wider integers.

  XLA:CPU does not merge sibling loop fusions, so every array that passes a
  fence is computed by a fusion kernel of its own, and each kernel costs a
  fixed 20-50 ms of compile. A pair packed into one integer of twice the
  width (``hi << w | lo``) is computed by one elementwise kernel, still
  vectorised; stacking the pair instead makes a concatenate fusion that
  selects the operand per element (an (8,2048) sort ran 2.3x slower).
  Returns the values to fence and the function that unpacks their fenced
  copies.
  """
  groups: dict[Any, list[int]] = {}
  for i, x in enumerate(values):
    width = _jax.itemsize_bits(x.dtype)
    if (width in (8, 16, 32) and not jnp.issubdtype(x.dtype, jnp.bool_)
        and not jax.typeof(x).weak_type):
      groups.setdefault((x.shape, width), []).append(i)
  pairs = [(g[k], g[k + 1]) for g in groups.values()
           for k in range(0, len(g) - 1, 2)]
  if not pairs:
    return values, lambda out: out
  paired = {i for pair in pairs for i in pair}
  singles = [i for i in range(len(values)) if i not in paired]
  packed = [_pack2(values[hi], values[lo]) for hi, lo in pairs]

  def unpack(out):
    result = [None] * len(values)
    for (hi, lo), x in zip(pairs, out[:len(pairs)], strict=True):
      result[hi], result[lo] = _unpack2(x, values[hi].dtype, values[lo].dtype)
    for i, x in zip(singles, out[len(pairs):], strict=True):
      result[i] = x
    return result

  return packed + [values[i] for i in singles], unpack


def _convert(x, dtype):
  # Bound directly: ``lax.convert_element_type`` would canonicalise the
  # 64-bit type to 32 bits when x64 is off, and the pair must not leave the
  # program anyway.
  return lax.convert_element_type_p.bind(
      x, new_dtype=jnp.dtype(dtype), weak_type=False, sharding=None)


def _pack2(hi, lo):
  width = _jax.itemsize_bits(hi.dtype)
  narrow, wide = jnp.dtype(f"uint{width}"), jnp.dtype(f"uint{2 * width}")
  shift = _convert(lax.full(hi.shape, width, narrow), wide)
  return lax.bitwise_or(
      lax.shift_left(_convert(lax.bitcast_convert_type(hi, narrow), wide),
                     shift),
      _convert(lax.bitcast_convert_type(lo, narrow), wide))


def _unpack2(x, hi_dtype, lo_dtype):
  width = _jax.itemsize_bits(hi_dtype)
  narrow = jnp.dtype(f"uint{width}")
  shift = _convert(lax.full(x.shape, width, narrow), x.dtype)
  hi = _convert(lax.shift_right_logical(x, shift), narrow)
  return (lax.bitcast_convert_type(hi, hi_dtype),
          lax.bitcast_convert_type(_convert(x, narrow), lo_dtype))


@functools.lru_cache(maxsize=4096)
def _branches(avals) -> tuple[Any, Any]:
  """The (false, true) branch jaxprs of a fence over values of ``avals``.

  Built once per signature and bound directly: tracing both branches with
  ``lax.cond`` at every fence took ~3 ms each, a quarter of the lowering
  time of a large unrolled kernel. Only the first value is changed by the
  false branch: that is enough for XLA to keep the conditional, and every
  value passed through unchanged by both branches costs neither a kernel
  nor a copy (on the (8,128) sort: 8,684 -> 7,584 optimised-HLO
  instructions, 350 -> 75 copies).
  """
  true = _jax.trace_jaxpr(lambda *xs: list(xs), avals)
  false = _jax.trace_jaxpr(lambda x, *xs: [_scramble(x), *xs], avals)
  return false, true


def _scramble(x):
  """A cheap op the false branch applies, so the branches differ."""
  if jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(
      x.dtype, jnp.complexfloating):
    return -x
  return ~x
