"""Helpers shared by the feature test modules (grid, memory, dma, ...)."""

import unittest

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

import fast_interpret


# Shorthands the feature test modules share.
FI = fast_interpret.FastInterpretParams
VMEM = pl.BlockSpec(memory_space=pltpu.VMEM)
SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)
ANY = pl.BlockSpec(memory_space=pl.ANY)
HBM = pl.BlockSpec(memory_space=pltpu.HBM)
DMA = pltpu.SemaphoreType.DMA
REGULAR = pltpu.SemaphoreType.REGULAR


def setUpModule():
  # These tests choose the interpret mode of every call themselves and use
  # JAX's own modes as references; a session-wide override (e.g. pytest
  # --fast-interpret) would route the references through fast interpret too.
  # pylint: disable-next=g-import-not-at-top
  from jax._src import config as jax_config
  mode = jax_config.pallas_tpu_interpret_mode_context_manager
  if mode.get_global() is not None:
    raise unittest.SkipTest("a global Pallas interpret mode is set")


def sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


def data(shape, dtype=jnp.float32, seed=0):
  r = np.random.RandomState(seed)
  if jnp.issubdtype(dtype, jnp.integer):
    info = jnp.iinfo(dtype)
    lo, hi = max(info.min, -100), min(info.max, 100)
    return jnp.asarray(r.randint(lo, hi + 1, size=shape), dtype)
  return jnp.asarray(r.standard_normal(shape).astype(np.float32), dtype)


def call(kernel, out_shape, *args, interpret=None, **kw):
  return pl.pallas_call(kernel, out_shape=out_shape,
                        interpret=fast_interpret.FastInterpretParams() if interpret is None else interpret,
                        **kw)(*args)
