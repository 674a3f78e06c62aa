"""Values known while tracing: index arithmetic folded with NumPy.

Kernels build index arrays from ``iota`` and literals (``iota ^ 1``,
``iota + 128``, ``jnp.take_along_axis``'s negative-index fix-up). XLA folds
them too, but only after our rules have emitted generic code for what
consumes them (a gather). The evaluator therefore also folds such equations
with NumPy, beside the traced value it emits as usual, and keeps the result
in ``RuleContext.constants``; a rule may use it to emit something cheaper
(``vector_rules``: a static permutation becomes a reverse).

Only small arrays of a few integer/bool primitives are folded, with NumPy's
wrapping integer arithmetic, which is XLA's; shifts fold only when the shift
amount is in range (XLA defines the other cases differently from NumPy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any

from jax import lax
import numpy as np

from fast_interpret import _jax

# Arrays larger than this are never folded (NumPy time, constant size).
MAX_FOLDED_ELEMENTS = 1 << 16


def _shift(op):
  def fold(x, y):
    bits = x.dtype.itemsize * 8
    if np.any((y < 0) | (y >= bits)):
      return None
    return op(x, y.astype(x.dtype))
  return fold


def _logical_right(x, y):
  unsigned = np.dtype(f"uint{x.dtype.itemsize * 8}")
  return np.right_shift(x.view(unsigned), y.astype(unsigned)).view(x.dtype)


@functools.lru_cache(maxsize=256)
def _iota_of(dtype, shape, dimension):
  index = np.arange(shape[dimension], dtype=dtype)
  view = [1] * len(shape)
  view[dimension] = shape[dimension]
  return np.broadcast_to(index.reshape(view), shape)


def _iota(*, dtype, shape, dimension, **_):
  # Cached: an unrolled kernel builds the same iota at every step. The
  # broadcast view is read-only, so sharing it is safe.
  return _iota_of(dtype, shape, dimension)


_BINARY: dict[Any, Callable] = {
    lax.add_p: np.add, lax.sub_p: np.subtract, lax.mul_p: np.multiply,
    lax.and_p: np.bitwise_and, lax.or_p: np.bitwise_or,
    lax.xor_p: np.bitwise_xor, lax.max_p: np.maximum, lax.min_p: np.minimum,
    lax.eq_p: np.equal, lax.ne_p: np.not_equal, lax.lt_p: np.less,
    lax.le_p: np.less_equal, lax.gt_p: np.greater, lax.ge_p: np.greater_equal,
    lax.shift_left_p: _shift(np.left_shift),
    lax.shift_right_arithmetic_p: _shift(np.right_shift),
    lax.shift_right_logical_p: _shift(_logical_right),
}


# Primitives ``fold`` may fold.
FOLDABLE = frozenset(_BINARY) | {
    lax.iota_p, lax.not_p, lax.neg_p, lax.select_n_p, lax.reshape_p,
    lax.broadcast_in_dim_p, lax.convert_element_type_p}


def _fold_eqn(eqn, args: Sequence[np.ndarray]) -> np.ndarray | None:
  prim, params = eqn.primitive, eqn.params
  if prim in _BINARY:
    return _BINARY[prim](*args)
  if prim is lax.iota_p:
    return _iota(**params)
  if prim is lax.not_p:
    return np.invert(args[0])
  if prim is lax.neg_p:
    return np.negative(args[0])
  if prim is lax.select_n_p:
    which, *cases = args
    return np.choose(which.astype(np.int32), np.broadcast_arrays(*cases))
  if prim is lax.reshape_p and params.get("dimensions") is None:
    return np.reshape(args[0], params["new_sizes"])
  if prim is lax.broadcast_in_dim_p:
    shape, dims = params["shape"], params["broadcast_dimensions"]
    view = [1] * len(shape)
    for d, n in zip(dims, args[0].shape, strict=True):
      view[d] = n
    return np.broadcast_to(np.reshape(args[0], view), shape)
  if prim is lax.convert_element_type_p:
    return args[0].astype(params["new_dtype"])
  return None


def _foldable_dtype(dtype) -> bool:
  return np.dtype(dtype).kind in "biu"


def fold(eqn: _jax.JaxprEqn,
         known: Mapping[_jax.Var, np.ndarray]) -> np.ndarray | None:
  """NumPy value of ``eqn``'s single output, or None if not foldable.

  Args:
    eqn: the equation; every operand must be a literal or in ``known``.
    known: values already folded in the same jaxpr.
  """
  # Most equations read a traced operand: look that up before anything else.
  if len(eqn.outvars) != 1 or any(
      isinstance(v, _jax.Var) and v not in known for v in eqn.invars):
    return None
  out = eqn.outvars[0].aval
  if (not hasattr(out, "shape") or not _foldable_dtype(out.dtype)
      or math.prod(out.shape) > MAX_FOLDED_ELEMENTS):
    return None
  args = []
  for atom in eqn.invars:
    value = literal_or_known(atom, known)
    if value is None or not _foldable_dtype(value.dtype):
      return None
    args.append(value)
  with np.errstate(all="ignore"):
    try:
      value = _fold_eqn(eqn, args)
    except (TypeError, ValueError):
      return None
  if value is None:
    return None
  value = np.asarray(value, out.dtype)
  return value if value.shape == tuple(out.shape) else None


def literal_or_known(atom, known: Mapping[_jax.Var, np.ndarray]
                     ) -> np.ndarray | None:
  """The NumPy value of a literal or of a folded variable, else None."""
  if isinstance(atom, _jax.Literal):
    aval = atom.aval
    if not hasattr(aval, "dtype"):
      return None
    return np.asarray(atom.val, aval.dtype)
  return known.get(atom)
