"""Small Pallas TPU kernels of our own used by the benchmark cases.

* ``double_buffered_dma``: a manual DMA pipeline. The input stays in HBM
  (``memory_space=pl.ANY``); chunks are copied into two VMEM buffers with
  ``pltpu.make_async_copy`` and DMA semaphores, chunk ``i`` is computed on
  while chunk ``i + 1`` is in flight, and results go back to HBM through two
  more VMEM buffers and their own DMAs.
* ``add_one``: ``x + 1`` over a grid of a fixed number of (8,128)-block
  steps, each block visited several consecutive times, so that the grid
  length stays fixed while the array size varies.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8


def dma_compute(x: jax.Array) -> jax.Array:
    """The element-wise work done on each chunk (also the jnp reference)."""
    return jnp.maximum(x, 0.0) * 2.0 + 1.0


def _dma_kernel(x_hbm, o_hbm, in_buf, out_buf, in_sems, out_sems, *,
                chunks: int, rows: int) -> None:
    def chunk(i):
        return pl.ds(pl.multiple_of(i * rows, rows), rows)

    def fetch(i, slot):
        return pltpu.make_async_copy(
            x_hbm.at[chunk(i)], in_buf.at[slot], in_sems.at[slot])

    def flush(i, slot):
        return pltpu.make_async_copy(
            out_buf.at[slot], o_hbm.at[chunk(i)], out_sems.at[slot])

    fetch(0, 0).start()

    @pl.loop(0, chunks)
    def _(i):
        slot = i % 2

        @pl.when(i + 1 < chunks)
        def _():
            fetch(i + 1, 1 - slot).start()

        fetch(i, slot).wait()

        @pl.when(i >= 2)
        def _():
            flush(i - 2, slot).wait()

        out_buf[slot] = dma_compute(in_buf[slot])
        flush(i, slot).start()

    for i in range(max(chunks - 2, 0), chunks):
        flush(i, i % 2).wait()


def double_buffered_dma(x: jax.Array, *, chunks: int = 64,
                        interpret=False) -> jax.Array:
    """``dma_compute(x)`` computed chunk by chunk through a DMA pipeline.

    ``x`` has shape ``(chunks * rows, 128)`` with ``rows`` a multiple of 8.
    """
    total_rows, lanes = x.shape
    rows = total_rows // chunks
    if lanes != LANES or rows * chunks != total_rows or rows % SUBLANES:
        raise ValueError(f"bad shape {x.shape} for {chunks} chunks")
    buffers = pltpu.VMEM((2, rows, LANES), x.dtype)
    return pl.pallas_call(
        functools.partial(_dma_kernel, chunks=chunks, rows=rows),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        scratch_shapes=[buffers, buffers,
                        pltpu.SemaphoreType.DMA((2,)),
                        pltpu.SemaphoreType.DMA((2,))],
        interpret=interpret,
        name="double_buffered_dma",
    )(x)


def _add_one_kernel(x_ref, o_ref) -> None:
    o_ref[...] = x_ref[...] + 1.0


def add_one(x: jax.Array, *, steps: int = 4096, interpret=False) -> jax.Array:
    """``x + 1`` with a grid of ``steps`` (8,128) blocks, whatever the size.

    ``x`` holds ``nblocks = x.shape[0] // 8`` blocks, ``nblocks`` dividing
    ``steps``. The grid is ``(nblocks, steps // nblocks)``: block ``i`` is
    visited ``steps // nblocks`` consecutive times (the inner axis is
    "arbitrary", like a reduction axis), so the grid length does not depend
    on the array size. Revisits are consecutive on purpose: a wrapping index
    map (``i % nblocks``) revisits output blocks non-consecutively, which JAX's
    TPU interpret mode rejects ("Revisited block ... of output 0").
    """
    nblocks = x.shape[0] // SUBLANES
    if x.shape[1] != LANES or nblocks * SUBLANES != x.shape[0] or steps % nblocks:
        raise ValueError(f"bad shape {x.shape} for {steps} steps")
    spec = pl.BlockSpec((SUBLANES, LANES), lambda i, j: (i, 0))
    return pl.pallas_call(
        _add_one_kernel,
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        grid=(nblocks, steps // nblocks),
        in_specs=[spec],
        out_specs=spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary")),
        interpret=interpret,
        name="add_one",
    )(x)
