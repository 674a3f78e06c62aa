"""Rules for TPU extras: the hardware PRNG, tracing and dependency hints.

The PRNG state is an int32 buffer (``PRNG_ID``) holding a threefry key and a
draw counter. ``pltpu.prng_seed`` derives the key from its seeds; every
``prng_random_bits`` draws ``jax.random.bits`` from the key folded with the
counter, then bumps the counter. The bits are deterministic, depend on every
seed, and are statistically sound, but they are not the TPU's bit stream: a
test must not compare them bit for bit with hardware.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp

from fast_interpret import _jax
from fast_interpret import errors
from fast_interpret.interpreter import RuleContext, register_rule
from fast_interpret.state import KernelState

PRNG_ID = -2


def initial_prng_state() -> jax.Array:
  """Unseeded state: key 0, counter 0 (a TPU leaves it undefined)."""
  return jnp.zeros((3,), jnp.uint32)


def _key(words) -> jax.Array:
  return jax.random.wrap_key_data(words[:2], impl="threefry2x32")


@register_rule(_jax.prng_seed_p)
def _prng_seed_rule(ctx: RuleContext, state: KernelState, *seeds):
  """``pltpu.prng_seed``: a key mixed from all seeds; the counter restarts."""
  del ctx
  key = jax.random.key(0, impl="threefry2x32")
  for seed in seeds:
    key = jax.random.fold_in(key, jnp.asarray(seed).astype(jnp.uint32))
  words = jnp.concatenate([jax.random.key_data(key),
                           jnp.zeros((1,), jnp.uint32)])
  return state.write(PRNG_ID, words), []


@register_rule(_jax.prng_random_bits_p)
def _prng_random_bits_rule(ctx: RuleContext, state: KernelState, *, shape):
  """``pltpu.prng_random_bits``: fresh int32 bits from the kernel's stream."""
  del ctx
  return _draw(state, shape)


@register_rule(_jax.random_bits_p)
def _random_bits_rule(ctx: RuleContext, state: KernelState, keys, *,
                      bit_width, shape):
  """``jax.random`` sampling inside a kernel.

  Keys of Pallas TPU's impls draw from the kernel's PRNG stream, as the TPU
  does: a ``pltpu.to_pallas_key``/``sample_block`` key seeds it first; the
  ``pltpu.stateful_*`` samplers draw from the current seed. Other keys
  (threefry, rbg) are plain JAX random numbers.
  """
  seeded, stateful = _jax.pallas_prng_impls()
  impl = getattr(keys.dtype, "_impl", None)
  if impl is not seeded and impl is not stateful:
    return state, _jax.random_bits_p.bind(keys, bit_width=bit_width,
                                          shape=shape)
  if bit_width != 32:
    raise errors.UnsupportedFeatureError(
        f"{bit_width}-bit random bits from a Pallas TPU key", ctx.kernel_name,
        "The TPU PRNG draws 32-bit words.")
  if impl is seeded:
    if keys.shape != ():
      raise errors.UnsupportedFeatureError(
          "random bits from an array of Pallas TPU keys", ctx.kernel_name,
          "Draw from one key at a time.")
    words = jnp.ravel(_jax.random_unwrap(keys))
    state, _ = _prng_seed_rule(ctx, state, *[words[i] for i in
                                             range(words.shape[0])])
  state, bits = _draw(state, shape)
  return state, lax.bitcast_convert_type(bits, jnp.uint32)


def _draw(state: KernelState, shape):
  words = state.read(PRNG_ID)
  key = jax.random.fold_in(_key(words), words[2])
  bits = jax.random.bits(key, shape, jnp.uint32)
  state = state.write(PRNG_ID, words.at[2].add(jnp.uint32(1)))
  return state, lax.bitcast_convert_type(bits, jnp.int32)


@register_rule(_jax.trace_value_p)
def _trace_value_rule(ctx: RuleContext, state: KernelState, *args, **params):
  """``pltpu.trace_value``: a no-op (there is no TPU trace to write to)."""
  del ctx, args, params
  return state, []


@register_rule(_jax.touch_p)
def _touch_rule(ctx: RuleContext, state: KernelState, *args, **params):
  """``pltpu.touch``: a scheduling hint only; nothing to simulate."""
  del ctx, args, params
  return state, []
