"""Reading and writing a buffer through a chain of ref transforms.

A ref view is a buffer plus transforms: ``NDIndexer`` (ints, slices with
static or dynamic starts, strides, integer arrays), TPU-style bitcasts and
reshapes. Reads walk the chain forwards; writes walk it forwards to find the
view, then backwards to put the new view into the buffer.

Indexers made only of unit-stride slices and scalar indices become
``lax.slice`` (all starts static) or ``dynamic_slice`` /
``dynamic_update_slice``; only strided or array indexers use gather/scatter.

Out of range indices: by default a dynamic start is clamped, as
``dynamic_slice`` does (the bounds checks report it). With ``fill`` (an
``uninitialized_memory`` mode, for ``out_of_bounds_reads="uninitialized"``)
the elements of a slice or strided view that fall outside the buffer read
as the uninitialised value and writes to them are dropped, as
``pltpu.InterpretParams`` reads them. Integer-array indexers read the
uninitialised value for their entries outside the buffer and drop writes
through them (a slice beside an array indexer still clamps).

A slice of dynamic size (``pl.ds(start, n)`` with a traced ``n``, as DMAs of
``pl.BoundedSlice`` pipelines make) views its whole dimension rotated so the
window starts at index 0: rows ``[0, n)`` of the view are the window, and a
write changes only the window's rows of the buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret.state import as_int32, uninitialized

Array = Any


def _static_int(x) -> int | None:
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, np.ndarray) and x.shape == ():
    return int(x)
  return None


def _normalized(indexer, shape):
  """The indexer with static negative integer indices counted from the end."""
  indices = []
  changed = False
  for idx, dim in zip(indexer.indices, shape, strict=True):
    value = None if isinstance(idx, _jax.Slice) else _static_int(idx)
    if value is not None and value < 0:
      idx, changed = value + dim, True
    indices.append(idx)
  if not changed:
    return indexer
  return dataclasses.replace(indexer, indices=tuple(indices))


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


def _bounds(shape, indexer, report) -> None:
  """Appends ``(ranges, starts, shape)`` for ``indexer`` to ``report``.

  ``ranges`` holds, per dimension, ``(value, lo, hi)`` triples with static
  limits that must hold (see ``checks.record_outside``): a scalar index or
  a slice's start against the last start that fits; the smallest and largest
  element of an array index, or the first and last row of a slice of
  dynamic size, separately. A dimension whose indices are all static gives
  static values, checked while tracing.
  """
  if report is None:
    return
  ranges, starts = [], []
  for idx, dim in zip(indexer.indices, shape, strict=True):
    if isinstance(idx, _jax.Slice):
      start, size = idx.start, _static_int(idx.size)
      if size is not None:  # The start must leave room for the window.
        ranges.append((start, 0, dim - 1 - (size - 1) * idx.stride))
      else:
        last = start + (idx.size - 1) * idx.stride
        ranges.append((_dynamic_if(start, last), 0, _INT32_MAX))
        ranges.append((_dynamic_if(last, start), _INT32_MIN, dim - 1))
    elif getattr(idx, "shape", ()) != ():
      start = jnp.min(idx)
      ranges.append((start, 0, _INT32_MAX))
      ranges.append((jnp.max(idx), _INT32_MIN, dim - 1))
    else:
      start = idx
      ranges.append((idx, 0, dim - 1))
    starts.append(start)
  report.append((ranges, starts, tuple(shape)))


_INT32_MIN, _INT32_MAX = -2**31, 2**31 - 1


def _dynamic_if(value, other):
  """``value``, traced when ``other`` is: a dimension is static as a whole."""
  if _static_int(value) is not None and _static_int(other) is None:
    return jnp.asarray(value)
  return value


def _strided_read(x: Array, indexer, fill=None, ranges=None
                  ) -> Array | None:
  """Slices, strided slices and scalars, one dimension at a time, clamped.

  With ``fill``, elements outside the buffer read as the uninitialised value.
  """
  if not all(isinstance(i, _jax.Slice) or getattr(i, "shape", ()) == ()
             for i in indexer.indices):
    return None
  for dim in reversed(range(x.ndim)):
    idx = indexer.indices[dim]
    size = x.shape[dim]
    if not isinstance(idx, _jax.Slice):
      i = jnp.asarray(idx, jnp.int32)
      x = lax.dynamic_index_in_dim(x, i, dim, keepdims=False)
      if fill is not None:
        x = jnp.where((i >= 0) & (i < size), x, _fill_value(x, fill))
    elif idx.stride == 1 and fill is None:
      start, = _index_args([idx.start], [size], ranges)
      x = lax.dynamic_slice_in_dim(x, start, idx.size, dim,
                                   allow_negative_indices=False)
    else:
      rows = idx.start + idx.stride * jnp.arange(idx.size, dtype=jnp.int32)
      x = jnp.take(x, jnp.clip(rows, 0, size - 1), axis=dim)
      if fill is not None:
        x = jnp.where(_along(_rows_ok(rows, size), dim, x.ndim), x,
                      _fill_value(x, fill))
  return x


def _rows_ok(rows, size: int):
  return (rows >= 0) & (rows < size)


def _along(v, dim: int, ndim: int):
  """A vector ``v`` shaped to broadcast along dimension ``dim``."""
  shape = [1] * ndim
  shape[dim] = v.shape[0]
  return v.reshape(shape)


def _fill_value(x, fill: str):
  return uninitialized((), x.dtype, fill)


def _maybe_outside(starts, sizes, shape) -> list[int]:
  """Dimensions whose window is not statically inside the buffer."""
  dims = []
  for d, (s, n, size) in enumerate(zip(starts, sizes, shape, strict=True)):
    v = _static_int(s)
    if v is None or v < 0 or v + n > size:
      dims.append(d)
  return dims


def _clamped_window(shape, starts, sizes, dims):
  """Where ``dynamic_slice`` puts the window, and each element's offset.

  Returns the clamped starts, and for every dimension in ``dims`` the
  element positions the window asks for, ``want``, and which of the clamped
  window's elements holds each one, ``local``.
  """
  clamped, want, local = [], {}, {}
  for d, (s, n, size) in enumerate(zip(starts, sizes, shape, strict=True)):
    s = jnp.asarray(s, jnp.int32)
    c = jnp.clip(s, 0, size - n)
    clamped.append(c)
    if d in dims:
      want[d] = s + jnp.arange(n, dtype=jnp.int32)
      local[d] = jnp.clip(want[d] - c, 0, n - 1)
  return clamped, want, local


def filled_window_read(x, starts, sizes, fill: str):
  """``x[starts : starts + sizes]``, the uninitialised value outside ``x``."""
  dims = _maybe_outside(starts, sizes, x.shape)
  # A window longer than the buffer: pad so that dynamic_slice accepts it.
  pad = [(0, max(0, n - size), 0) for n, size in zip(sizes, x.shape,
                                                      strict=True)]
  shape = x.shape
  if any(hi for _, hi, _ in pad):
    x = lax.pad(x, _fill_value(x, fill), pad)
  clamped, want, local = _clamped_window(x.shape, starts, sizes, dims)
  y = lax.dynamic_slice(x, clamped, sizes)
  ok = jnp.bool_(True)
  for d in dims:
    y = jnp.take(y, local[d], axis=d)
    ok = ok & _along(_rows_ok(want[d], shape[d]), d, y.ndim)
  return jnp.where(ok, y, _fill_value(y, fill))


def filled_window_write(x, starts, sizes, val, fill: str):
  """Writes ``val`` at ``starts``, dropping the elements outside ``x``."""
  del fill
  dims = _maybe_outside(starts, sizes, x.shape)
  if any(n > size for n, size in zip(sizes, x.shape, strict=True)):
    # Longer than the buffer: write element by element (rare).
    return _scatter_inside(x, starts, val)
  clamped, want, local = _clamped_window(x.shape, starts, sizes, dims)
  current = lax.dynamic_slice(x, clamped, sizes)
  shifted, ok = val, jnp.bool_(True)
  for d in dims:
    n = sizes[d]
    # Element k of the clamped window is element k + c - s of ``val``.
    offset = clamped[d] + jnp.arange(n, dtype=jnp.int32) - want[d][0]
    shifted = jnp.take(shifted, jnp.clip(offset, 0, n - 1), axis=d)
    ok = ok & _along((offset >= 0) & (offset < n), d, x.ndim)
  new = jnp.where(ok, shifted.astype(x.dtype), current)
  return lax.dynamic_update_slice(x, new, clamped)


def _scatter_inside(x, starts, val):
  index = []
  for d, (s, n) in enumerate(zip(starts, val.shape, strict=True)):
    i = jnp.asarray(s, jnp.int32) + jnp.arange(n, dtype=jnp.int32)
    # Negative indices would wrap around; send them past the end to drop.
    index.append(_along(jnp.where(i < 0, x.shape[d], i), d, val.ndim))
  return x.at[tuple(index)].set(val.astype(x.dtype), mode="drop")


def _padded_for_arrays(x: Array, indexer, fill: str):
  """``x`` and ``indexer`` such that array entries outside ``x`` miss it.

  Every dimension indexed by an integer array (or scalar) gets one extra
  element holding the uninitialised value, and entries outside the dimension
  (negative ones too: a TPU does not wrap) point at it. A read then sees the
  fill value there, and a write lands in the extra element, which the caller
  slices off. Slice dimensions are unchanged (their starts clamp).
  """
  pads, indices = [], []
  for idx, size in zip(indexer.indices, x.shape, strict=True):
    if isinstance(idx, _jax.Slice):
      pads.append((0, 0, 0))
      indices.append(idx)
      continue
    idx = jnp.asarray(idx, jnp.int32)
    pads.append((0, 1, 0))
    indices.append(jnp.where((idx >= 0) & (idx < size), idx, size))
  padded = lax.pad(x, _fill_value(x, fill), pads)
  return padded, dataclasses.replace(indexer, indices=tuple(indices),
                                     shape=padded.shape)


def _index_read(x: Array, indexer, report=None, fill=None, ranges=None
                ) -> Array:
  indexer = _normalized(indexer, x.shape)
  _bounds(x.shape, indexer, report)
  window = _as_window(indexer)
  if window is None:
    y = _strided_read(x, indexer, fill, ranges)
    if y is not None:
      return y
    if fill is None:
      return _jax.index_array(x, indexer)
    padded, indexer = _padded_for_arrays(x, indexer, fill)
    return _jax.index_array(padded, indexer)
  starts, sizes, squeeze = window
  if fill is not None and _maybe_outside(starts, sizes, x.shape):
    y = filled_window_read(x, starts, sizes, fill)
    return lax.squeeze(y, squeeze) if squeeze else y
  static = [_static_int(s) for s in starts]
  in_bounds = all(s is not None and 0 <= s and s + n <= d
                  for s, n, d in zip(static, sizes, x.shape, strict=True))
  # A static window out of bounds has been reported; like a dynamic one, it
  # is clamped (dynamic_slice) rather than failing inside lax.slice.
  if in_bounds:
    if tuple(sizes) == x.shape and not any(static):
      y = x
    else:
      y = lax.slice(x, static, [s + n for s, n in zip(static, sizes,
                                                      strict=True)])
  else:
    y = lax.dynamic_slice(x, _index_args(starts, x.shape, ranges), sizes,
                          allow_negative_indices=False)
  return lax.squeeze(y, squeeze) if squeeze else y


def _index_write(x: Array, indexer, val: Array, fill=None, ranges=None
                 ) -> Array:
  # Bounds were reported when the view was read on the way in.
  indexer = _normalized(indexer, x.shape)
  window = _as_window(indexer)
  if window is None:
    if fill is None:
      _, new_x = _jax.transform_swap_array(x, [indexer], val)
      return new_x
    padded, indexer = _padded_for_arrays(x, indexer, fill)
    _, new_x = _jax.transform_swap_array(padded, [indexer], val)
    return lax.slice(new_x, (0,) * x.ndim, x.shape)
  starts, sizes, squeeze = window
  if tuple(sizes) == x.shape and all(_static_int(s) == 0 for s in starts):
    return lax.reshape(val, x.shape) if squeeze else val
  if squeeze:
    val = lax.expand_dims(val, squeeze)
  if fill is not None and _maybe_outside(starts, sizes, x.shape):
    return filled_window_write(x, starts, sizes, val, fill)
  return lax.dynamic_update_slice(x, val.astype(x.dtype),
                                  _index_args(starts, x.shape, ranges),
                                  allow_negative_indices=False)


def _index_args(starts, shape, ranges=None):
  """int32 start indices, a negative one counted from the end.

  As ``lax.dynamic_slice`` would count it, but with ``lax`` calls: its
  ``i < 0`` on a traced index is a jitted call of its own while tracing.
  A start that ``ranges`` (a ``ranges.Ranges``, or None) shows is never
  negative needs no such compare, add and select.
  """
  args = []
  for s, d in zip(starts, shape, strict=True):
    static = _static_int(s)
    if static is not None:
      args.append(np.int32(static + d if static < 0 else static))
      continue
    # A weakly typed int32 index serves as it is (no conversion equation).
    i = s if getattr(s, "dtype", None) == np.int32 else as_int32(s)
    if ranges is not None and ranges.within(s, 0, _INT32_MAX):
      args.append(i)
      continue
    args.append(lax.select(lax.lt(i, np.int32(0)), lax.add(i, np.int32(d)),
                           i))
  return args


def _is_dynamic_size(idx) -> bool:
  return isinstance(idx, _jax.Slice) and _static_int(idx.size) is None


def _split_dynamic_sizes(indexer):
  """(rolls, indexer'): dynamic-size slices become whole-dimension slices.

  ``rolls`` holds ``(dim, start, size)`` per dynamic-size slice; the caller
  rotates ``dim`` by ``-start`` before applying ``indexer'``.
  """
  rolls, indices = [], []
  for dim, (idx, extent) in enumerate(zip(indexer.indices, indexer.shape,
                                          strict=True)):
    if _is_dynamic_size(idx):
      if idx.stride != 1:
        raise NotImplementedError(
            "fast_interpret: unsupported feature: a strided slice of dynamic "
            "size")
      rolls.append((dim, idx.start, idx.size))
      idx = _jax.Slice(0, extent, 1)
    indices.append(idx)
  return rolls, dataclasses.replace(indexer, indices=tuple(indices))


def _roll_windows(x: Array, rolls, sign: int) -> Array:
  for dim, start, _ in rolls:
    x = jnp.roll(x, sign * jnp.asarray(start, jnp.int32), axis=dim)
  return x


def _dynamic_size_read(x: Array, indexer, report) -> Array:
  _bounds(x.shape, indexer, report)
  rolls, rest = _split_dynamic_sizes(indexer)
  return _index_read(_roll_windows(x, rolls, -1), rest)


def _dynamic_size_write(x: Array, indexer, new_view: Array) -> Array:
  rolls, rest = _split_dynamic_sizes(indexer)
  rotated = _index_write(_roll_windows(x, rolls, -1), rest, new_view)
  candidate = _roll_windows(rotated, rolls, 1)
  keep = jnp.ones(x.shape, bool)
  for dim, start, size in rolls:
    offset = lax.broadcasted_iota(jnp.int32, x.shape, dim) - start
    keep &= jnp.remainder(offset, x.shape[dim]) < size
  return jnp.where(keep, candidate, x)


def has_dynamic_size(transforms) -> bool:
  """Whether a chain of transforms slices some dimension by a traced size."""
  return any(isinstance(t, _jax.NDIndexer)
             and any(_is_dynamic_size(i) for i in t.indices)
             for t in transforms)


def dynamic_size_fraction(transforms):
  """(numerator, denominator): the share of a view's elements in its windows.

  A dynamic-size view holds whole dimensions (see the module docstring); the
  copy it names moves ``size / extent`` of them along each such dimension.
  """
  num, den = 1, 1
  for t in transforms:
    if isinstance(t, _jax.NDIndexer):
      rolls, _ = _split_dynamic_sizes(t)
      for dim, _, size in rolls:
        num = num * jnp.asarray(size, jnp.int32)
        den *= t.shape[dim]
  return num, den


def _forward(x: Array, transform, report=None, fill=None, ranges=None
             ) -> Array:
  if isinstance(transform, _jax.NDIndexer):
    if any(_is_dynamic_size(i) for i in transform.indices):
      return _dynamic_size_read(x, transform, report)
    return _index_read(x, transform, report, fill, ranges)
  if isinstance(transform, _jax.BitcastTransform):
    return _jax.ref_bitcast(x, transform.dtype)
  if isinstance(transform, _jax.ReshapeTransform):
    return x.reshape(transform.shape)
  if (_jax.TransposeTransform is not None
      and isinstance(transform, _jax.TransposeTransform)):
    return jnp.transpose(x, transform.permutation)
  raise NotImplementedError(
      f"fast_interpret: unsupported feature: ref transform {transform!r}")


def _backward(x: Array, transform, new_view: Array, fill=None, ranges=None
              ) -> Array:
  if isinstance(transform, _jax.NDIndexer):
    if any(_is_dynamic_size(i) for i in transform.indices):
      return _dynamic_size_write(x, transform, new_view)
    return _index_write(x, transform, new_view, fill, ranges)
  if isinstance(transform, _jax.BitcastTransform):
    return _jax.ref_bitcast(new_view, x.dtype).reshape(x.shape)
  if isinstance(transform, _jax.ReshapeTransform):
    return new_view.reshape(x.shape)
  if (_jax.TransposeTransform is not None
      and isinstance(transform, _jax.TransposeTransform)):
    return jnp.transpose(new_view, np.argsort(transform.permutation))
  raise NotImplementedError(
      f"fast_interpret: unsupported feature: ref transform {transform!r}")


def read(buf: Array, transforms, report=None, *, fill=None, ranges=None
         ) -> Array:
  """The value of the view ``buf[transforms]``.

  If ``report`` is a list, a bounds record is appended for every indexer
  (see ``_bounds``). ``fill`` (``"nan"``/``"zero"``, or None to clamp) is
  what elements outside the buffer read as (see the module docstring).
  ``ranges`` (a ``ranges.Ranges``, or None) tells which traced starts are
  never negative, and so need no wrap-around (``_index_args``).
  """
  for t in transforms:
    buf = _forward(buf, t, report, fill, ranges)
  return buf


def update(buf: Array, transforms, fn: Callable[[Array], tuple[Any, Array]],
           report=None, *, fill=None, ranges=None) -> tuple[Any, Array]:
  """Replaces the view by ``fn(view)[1]``; returns ``(fn(view)[0], buf')``.

  With ``fill``, parts of the view outside the buffer read as the
  uninitialised value and are not written. ``ranges`` as for ``read``.
  """
  if not transforms:
    return fn(buf)
  head, rest = transforms[0], transforms[1:]
  sub = _forward(buf, head, report, fill, ranges)
  out, new_sub = update(sub, rest, fn, report, fill=fill, ranges=ranges)
  return out, _backward(buf, head, new_sub, fill, ranges)


def swap(buf: Array, transforms, val: Array, report=None, *, fill=None,
         ranges=None) -> tuple[Array, Array]:
  """Writes ``val`` into the view; returns (old view value, new buffer)."""
  def fn(view):
    if view.shape != val.shape:
      raise ValueError(
          f"fast_interpret: store of shape {val.shape} into a view of shape "
          f"{view.shape}")
    return view, val.astype(view.dtype)
  return update(buf, transforms, fn, report, fill=fill, ranges=ranges)


def masked_swap(buf, transforms, val, mask, report=None, *, fill=None,
                ranges=None) -> tuple[Array, Array]:
  """Writes ``val`` where ``mask`` is true; returns (old view, new buffer)."""
  def fn(view):
    m = jnp.broadcast_to(mask, view.shape)
    return view, jnp.where(m, jnp.broadcast_to(val, view.shape).astype(
        view.dtype), view)
  return update(buf, transforms, fn, report, fill=fill, ranges=ranges)


def add(buf: Array, transforms, val: Array, report=None, *, fill=None,
        ranges=None) -> Array:
  """Adds ``val`` into the view; returns the new buffer."""
  _, new = update(buf, transforms, lambda view: (None, view + val), report,
                  fill=fill, ranges=ranges)
  return new
