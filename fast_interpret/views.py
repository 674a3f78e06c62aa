"""Reading and writing a buffer through a chain of ref transforms.

A ref view is a buffer plus transforms: ``NDIndexer`` (ints, slices with
static or dynamic starts, strides, integer arrays), TPU-style bitcasts and
reshapes. Reads walk the chain forwards; writes walk it forwards to find the
view, then backwards to put the new view into the buffer.

Indexers made only of unit-stride slices and scalar indices become
``lax.slice`` (all starts static) or ``dynamic_slice`` /
``dynamic_update_slice``; only strided or array indexers use gather/scatter.
Out-of-range dynamic starts are clamped, as ``dynamic_slice`` does.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax

Array = Any


def _static_int(x) -> int | None:
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, np.ndarray) and x.shape == ():
    return int(x)
  return None


def _as_window(indexer):
  """(starts, sizes, squeeze_dims) when the indexer is a plain window."""
  starts, sizes, squeeze = [], [], []
  for dim, idx in enumerate(indexer.indices):
    if isinstance(idx, _jax.Slice):
      if idx.stride != 1:
        return None
      starts.append(idx.start)
      sizes.append(idx.size)
    else:
      if getattr(idx, "shape", ()) != ():
        return None
      starts.append(idx)
      sizes.append(1)
      squeeze.append(dim)
  return starts, sizes, tuple(squeeze)


def _index_read(x: Array, indexer) -> Array:
  window = _as_window(indexer)
  if window is None:
    return _jax.index_array(x, indexer)
  starts, sizes, squeeze = window
  static = [_static_int(s) for s in starts]
  if all(s is not None for s in static):
    if tuple(sizes) == x.shape and not any(static):
      y = x
    else:
      y = lax.slice(x, static, [s + n for s, n in zip(static, sizes,
                                                      strict=True)])
  else:
    y = lax.dynamic_slice(x, _index_args(starts), sizes)
  return lax.squeeze(y, squeeze) if squeeze else y


def _index_write(x: Array, indexer, val: Array) -> Array:
  window = _as_window(indexer)
  if window is None:
    _, new_x = _jax.transform_swap_array(x, [indexer], val)
    return new_x
  starts, sizes, squeeze = window
  if tuple(sizes) == x.shape and all(_static_int(s) == 0 for s in starts):
    return lax.reshape(val, x.shape) if squeeze else val
  if squeeze:
    val = lax.expand_dims(val, squeeze)
  return lax.dynamic_update_slice(x, val.astype(x.dtype), _index_args(starts))


def _index_args(starts):
  return [jnp.asarray(s, jnp.int32) if _static_int(s) is None
          else np.int32(_static_int(s)) for s in starts]


def _forward(x: Array, transform) -> Array:
  if isinstance(transform, _jax.NDIndexer):
    return _index_read(x, transform)
  if isinstance(transform, _jax.BitcastTransform):
    return _jax.ref_bitcast(x, transform.dtype)
  if isinstance(transform, _jax.ReshapeTransform):
    return x.reshape(transform.shape)
  if (_jax.TransposeTransform is not None
      and isinstance(transform, _jax.TransposeTransform)):
    return jnp.transpose(x, transform.permutation)
  raise NotImplementedError(
      f"fast_interpret: unsupported feature: ref transform {transform!r}")


def _backward(x: Array, transform, new_view: Array) -> Array:
  if isinstance(transform, _jax.NDIndexer):
    return _index_write(x, transform, new_view)
  if isinstance(transform, _jax.BitcastTransform):
    return _jax.ref_bitcast(new_view, x.dtype).reshape(x.shape)
  if isinstance(transform, _jax.ReshapeTransform):
    return new_view.reshape(x.shape)
  if (_jax.TransposeTransform is not None
      and isinstance(transform, _jax.TransposeTransform)):
    return jnp.transpose(new_view, np.argsort(transform.permutation))
  raise NotImplementedError(
      f"fast_interpret: unsupported feature: ref transform {transform!r}")


def read(buf: Array, transforms) -> Array:
  """The value of the view ``buf[transforms]``."""
  for t in transforms:
    buf = _forward(buf, t)
  return buf


def update(buf: Array, transforms, fn: Callable[[Array], tuple[Any, Array]]
           ) -> tuple[Any, Array]:
  """Replaces the view by ``fn(view)[1]``; returns ``(fn(view)[0], buf')``."""
  if not transforms:
    return fn(buf)
  head, rest = transforms[0], transforms[1:]
  sub = _forward(buf, head)
  out, new_sub = update(sub, rest, fn)
  return out, _backward(buf, head, new_sub)


def swap(buf: Array, transforms, val: Array) -> tuple[Array, Array]:
  """Writes ``val`` into the view; returns (old view value, new buffer)."""
  def fn(view):
    if view.shape != val.shape:
      raise ValueError(
          f"fast_interpret: store of shape {val.shape} into a view of shape "
          f"{view.shape}")
    return view, val.astype(view.dtype)
  return update(buf, transforms, fn)


def masked_swap(buf, transforms, val, mask) -> tuple[Array, Array]:
  """Writes ``val`` where ``mask`` is true; returns (old view, new buffer)."""
  def fn(view):
    m = jnp.broadcast_to(mask, view.shape)
    return view, jnp.where(m, jnp.broadcast_to(val, view.shape).astype(
        view.dtype), view)
  return update(buf, transforms, fn)


def add(buf: Array, transforms, val: Array) -> Array:
  """Adds ``val`` into the view; returns the new buffer."""
  _, new = update(buf, transforms, lambda view: (None, view + val))
  return new


def tree_leaves(tree) -> list[Any]:
  return jax.tree_util.tree_leaves(tree)
