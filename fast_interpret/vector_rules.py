"""Rules for TPU vector ops: those without a portable lowering, and gathers.

``pltpu.stochastic_round`` and ``pltpu.pack_elementwise`` /
``unpack_elementwise`` lower only to Mosaic; here they are re-expressed with
bit operations on the host's integers, following the semantics their
docstrings and Mosaic lowering state.

A ``gather`` whose indices are known while tracing (constants.py) and that
exchanges elements ``f`` and ``f ^ m`` of the flattened operand (the
butterfly ``jnp.take_along_axis(x, iota ^ 2**k, axis)`` of sorting networks
and reductions) becomes a reshape and a reverse, which XLA fuses into its
consumers; a generic gather is a kernel of its own, with per-element index
checks.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax
from fast_interpret import errors
from fast_interpret.interpreter import RuleContext, bind_pure, register_rule
from fast_interpret.state import KernelState

# Targets Mosaic's stochastic_convert accepts (see its lowering rule).
_STOCHASTIC_TARGETS = ("bfloat16", "float8_e5m2", "float8_e4m3fn",
                       "float8_e4m3b11fnuz")


def _bits(dtype) -> int:
  return _jax.itemsize_bits(dtype)


def _uint(bits: int):
  return jnp.dtype(f"uint{bits}")


@register_rule(_jax.stochastic_round_p)
def _stochastic_round_rule(ctx: RuleContext, state: KernelState, x,
                           random_bits, *, target_dtype):
  """``pltpu.stochastic_round``: rounds up or down, unbiased in expectation.

  A value between two representable neighbours ``lo < |x| < hi`` becomes
  ``hi`` with probability ``(|x| - lo) / (hi - lo)``, decided by the top 24
  of its random bits; representable values, infinities and NaN are kept.
  Fidelity lost: the hardware's use of the random bits (which draw rounds
  up) differs, so results are equal in distribution, not bit for bit; values
  beyond the target's finite range follow ``astype``.
  """
  target = jnp.dtype(target_dtype)
  if x.dtype != jnp.float32 or target.name not in _STOCHASTIC_TARGETS:
    raise errors.UnsupportedFeatureError(
        f"stochastic_round from {x.dtype} to {target}", ctx.kernel_name,
        "Mosaic rounds float32 to one of " + ", ".join(_STOCHASTIC_TARGETS)
        + ".")
  width = _bits(target)
  uint = _uint(width)
  sign_bit = np.array(1 << (width - 1), uint)
  nearest = x.astype(target)
  magnitude = lax.bitcast_convert_type(nearest, uint) & ~sign_bit
  ax, an = jnp.abs(x), jnp.abs(nearest.astype(jnp.float32))
  above = an > ax
  lo_mag = jnp.where(above, magnitude - 1, magnitude)
  hi_mag = jnp.where(above, magnitude, magnitude + 1)

  def value(mag):
    return lax.bitcast_convert_type(mag, target).astype(jnp.float32)

  lo, hi = value(lo_mag), value(hi_mag)
  p_up = (ax - lo) / (hi - lo)
  uniform = (random_bits >> 8).astype(jnp.float32) * np.float32(2.0 ** -24)
  mag = jnp.where(uniform < p_up, hi_mag, lo_mag)
  # No negative zero: "fnuz" formats read 0x80 as NaN.
  sign = jnp.where(jnp.signbit(x) & (mag != 0), sign_bit, np.array(0, uint))
  rounded = lax.bitcast_convert_type(mag | sign, target)
  exact = (an == ax) | jnp.isnan(x) | jnp.isinf(x)
  return state, jnp.where(exact, nearest, rounded)


def _packed_field(x, packed_dtype, width: int):
  """The low bits of ``packed_dtype`` of each element of ``x``, as uint."""
  packed_dtype = jnp.dtype(packed_dtype)
  if jnp.issubdtype(packed_dtype, jnp.floating):
    bits = lax.bitcast_convert_type(x.astype(packed_dtype),
                                    _uint(_bits(packed_dtype)))
    return bits.astype(_uint(width))
  bits = lax.bitcast_convert_type(x, _uint(_bits(x.dtype))).astype(
      _uint(width))
  return bits & np.array((1 << _bits(packed_dtype)) - 1, _uint(width))


@register_rule(_jax.pack_elementwise_p)
def _pack_elementwise_rule(ctx: RuleContext, state: KernelState, *xs,
                           packed_dtype):
  """``pltpu.pack_elementwise``: ``xs[k]`` lands in bits ``[k*b, (k+1)*b)``.

  Floats (f32 -> bf16) are rounded to nearest even; integers are truncated
  to their low ``b`` bits, as the docstring states.
  """
  del ctx
  width = _bits(xs[0].dtype)
  packed = _bits(packed_dtype)
  word = jnp.zeros(xs[0].shape, _uint(width))
  for k, x in enumerate(xs):
    word = word | (_packed_field(x, packed_dtype, width)
                   << np.array(k * packed, _uint(width)))
  return state, word


@register_rule(_jax.unpack_elementwise_p)
def _unpack_elementwise_rule(ctx: RuleContext, state: KernelState, x, *,
                             index, packed_dtype, unpacked_dtype):
  """``pltpu.unpack_elementwise``: field ``index`` of each word, widened.

  Signed integer fields are sign-extended, floats converted exactly.
  """
  del ctx
  packed_dtype, unpacked_dtype = jnp.dtype(packed_dtype), jnp.dtype(
      unpacked_dtype)
  width, packed = _bits(x.dtype), _bits(packed_dtype)
  uint = _uint(width)
  field = (lax.bitcast_convert_type(x, uint) >> np.array(index * packed, uint)
           ) & np.array((1 << packed) - 1, uint)
  if jnp.issubdtype(packed_dtype, jnp.floating):
    value = lax.bitcast_convert_type(field.astype(_uint(packed)), packed_dtype)
    return state, value.astype(unpacked_dtype)
  if jnp.issubdtype(packed_dtype, jnp.signedinteger):
    signed = lax.bitcast_convert_type(field, jnp.dtype(f"int{width}"))
    shift = np.array(width - packed, signed.dtype)
    return state, ((signed << shift) >> shift).astype(unpacked_dtype)
  return state, field.astype(unpacked_dtype)


def _gathered_flat_indices(operand_shape, indices: np.ndarray, dnums,
                           slice_sizes) -> np.ndarray | None:
  """Flat operand index of each output element of a static element gather.

  Only gathers of single elements (all slice sizes 1, no offset dims) whose
  indices all lie inside the operand; None for anything else.
  """
  if dnums.offset_dims or any(size != 1 for size in slice_sizes):
    return None
  batch = indices.shape[:-1]
  grids = np.indices(batch, sparse=True)
  coords = []
  for d, size in enumerate(operand_shape):
    if d in dnums.start_index_map:
      c = indices[..., dnums.start_index_map.index(d)]
    elif d in dnums.operand_batching_dims:
      k = dnums.operand_batching_dims.index(d)
      c = grids[dnums.start_indices_batching_dims[k]]
    else:
      return None
    c = np.broadcast_to(c, batch)
    if np.any((c < 0) | (c >= size)):
      return None
    coords.append(c)
  return np.ravel_multi_index(coords, operand_shape)


def _xor_permutation(x, mask: int):
  """``x.ravel()[f ^ mask]`` for every flat index f, reshaped like ``x``.

  The flat index is split at each set bit of ``mask`` into an axis of size
  2; reversing those axes flips the bits. Needs ``x.size`` to be a multiple
  of ``2 ** mask.bit_length()``.
  """
  dims, axes, span = [], [], x.size
  for b in reversed(range(mask.bit_length())):
    if mask >> b & 1:
      dims += [span >> (b + 1), 2]
      axes.append(len(dims) - 1)
      span = 1 << b
  dims.append(span)
  return lax.reshape(lax.rev(lax.reshape(x, dims), axes), x.shape)


@functools.lru_cache(maxsize=1024)
def _xor_permutation_jaxpr(aval, mask: int) -> _jax.ClosedJaxpr:
  """``_xor_permutation`` of a value of ``aval``, traced once per mask.

  An unrolled sorting network repeats a few masks at a hundred call sites.
  """
  return _jax.trace_jaxpr(lambda x: [_xor_permutation(x, mask)], [aval])


@register_rule(lax.gather_p)
def _gather_rule(ctx: RuleContext, state: KernelState, operand, indices, *,
                 dimension_numbers, slice_sizes, **_):
  """``gather`` (``jnp.take_along_axis``, fancy indexing): XLA's gather.

  With indices known while tracing that swap flat elements ``f`` and
  ``f ^ m`` (m a constant), a reverse of a reshape instead. No fidelity
  lost: every index is checked to lie inside the operand.
  """
  known = ctx.known_operand(1)
  if known is not None and known.ndim and known.shape[:-1] == operand.shape:
    flat = _gathered_flat_indices(operand.shape, known, dimension_numbers,
                                  slice_sizes)
    if flat is not None and flat.size:
      mask = int(flat.flat[0])
      ids = np.arange(flat.size).reshape(flat.shape)
      if (np.array_equal(flat, ids ^ mask)
          and operand.size % (1 << mask.bit_length()) == 0):
        if mask == 0:
          return state, operand
        permute = _xor_permutation_jaxpr(jax.typeof(operand), mask)
        return state, _jax.inline_jaxpr(permute, [operand])[0]
  return state, bind_pure(ctx.eqn, (operand, indices))
