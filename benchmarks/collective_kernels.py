"""Collective Pallas TPU kernels built from remote DMAs, for tests and benchmarks.

Each function is meant to be called inside ``jax.shard_map`` over a mesh
axis ``axis`` of ``n`` devices arranged in a ring; ``interpret`` goes to
``pl.pallas_call``. They follow the algorithms of the Pallas TPU distributed
guide, written afresh:

* ``right_permute``: every device sends its shard to a neighbour (``ppermute``).
* ``ring_all_gather``: ``n - 1`` grid steps; each forwards the shard received
  last to the right neighbour (optionally half of it each way).
* ``ring_all_reduce``: ``psum``; the value circulates through a double buffer
  in HBM, with a capacity handshake (a REGULAR semaphore) and a barrier with
  both neighbours at the start.
* ``ring_reduce_scatter``: ``psum_scatter``; partial sums circulate, double
  buffered, one way or half each way.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

MESH = pl.DeviceIdType.MESH
LOGICAL = pl.DeviceIdType.LOGICAL
DMA = pltpu.SemaphoreType.DMA
REGULAR = pltpu.SemaphoreType.REGULAR
ANY = pl.BlockSpec(memory_space=pl.ANY)
VMEM = pl.BlockSpec(memory_space=pltpu.VMEM)


def _neighbours(axis: str, n: int):
    me = lax.axis_index(axis)
    return me, lax.rem(me + 1, n), lax.rem(me + n - 1, n)


def _device_id(target, axis: str, form: str):
    """``target`` on ``axis`` in one of the forms pltpu accepts."""
    if form == "mesh":
        return (target,), MESH
    if form == "dict":
        return {axis: target}, MESH
    if form == "logical":
        return target, LOGICAL
    raise ValueError(form)


def _barrier(left, right) -> None:
    """Both neighbours have entered the kernel (and, twice, left the first)."""

    def handshake(sem):
        for neighbour in (left, right):
            pl.semaphore_signal(sem, 1, device_id=(neighbour,),
                                device_id_type=MESH)
        pl.semaphore_wait(sem, 2)

    handshake(pltpu.get_barrier_semaphore())
    # A second barrier on a scoped semaphore, so that a neighbour that
    # re-enters the kernel cannot satisfy the first one twice.
    pl.run_scoped(handshake, REGULAR)


# --- ppermute ---------------------------------------------------------------


def right_permute(x, *, axis: str, n: int, shift: int = 1, form: str = "mesh",
                  interpret=None):
    """``lax.ppermute(x, axis, [(i, (i + shift) % n)])`` via one remote DMA."""

    def kernel(x_hbm, o_hbm, send_sem, recv_sem):
        me = lax.axis_index(axis)
        device_id, id_type = _device_id(lax.rem(me + shift + n, n), axis, form)
        copy = pltpu.make_async_remote_copy(x_hbm, o_hbm, send_sem, recv_sem,
                                            device_id=device_id,
                                            device_id_type=id_type)
        copy.start()
        copy.wait()

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[ANY], out_specs=ANY, scratch_shapes=[DMA, DMA],
        interpret=interpret)(x)


# --- all-gather -------------------------------------------------------------


def _all_gather_kernel(x_hbm, o_hbm, local_sem, send_sems, recv_sems, *,
                       axis, n, bidirectional):
    step = pl.program_id(0)
    me, right, left = _neighbours(axis, n)
    rows = x_hbm.shape[0]

    @pl.when(step == 0)
    def _():
        pltpu.async_copy(x_hbm, o_hbm.at[me], local_sem).wait()

    # Going right, a device forwards the shard it got from the left last
    # step (its own at step 0); going left, the one it got from the right.
    if bidirectional:
        half = rows // 2
        routes = [(lax.rem(me + n - step, n), pl.ds(half, half), right),
                  (lax.rem(me + step, n), pl.ds(0, half), left)]
    else:
        routes = [(lax.rem(me + n - step, n), pl.ds(0, rows), right)]
    copies = []
    for k, (shard, part, target) in enumerate(routes):
        view = o_hbm.at[shard, part]
        copies.append(pltpu.make_async_remote_copy(
            view, view, send_sems.at[k], recv_sems.at[k, step],
            device_id=(target,), device_id_type=MESH))
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.wait()


def ring_all_gather(x, *, axis: str, n: int, bidirectional: bool = False,
                    interpret=None):
    """``lax.all_gather(x, axis)``: shape ``(n, *x.shape)``; needs n > 1."""
    routes = 2 if bidirectional else 1
    kernel = functools.partial(_all_gather_kernel, axis=axis, n=n,
                               bidirectional=bidirectional)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((n, *x.shape), x.dtype),
        grid=(n - 1,), in_specs=[ANY], out_specs=ANY,
        scratch_shapes=[DMA, DMA((routes,)), DMA((routes, n - 1))],
        interpret=interpret)(x)


# --- all-reduce -------------------------------------------------------------


def _all_reduce_kernel(x_ref, o_ref, buf_hbm, local_sem, send_sem, recv_sem,
                       capacity_sem, staging, *, axis, n):
    step = pl.program_id(0)
    me, right, left = _neighbours(axis, n)
    working = lax.rem(step, 2)

    @pl.when(step == 0)
    def _():
        _barrier(left, right)
        o_ref[...] = jnp.zeros_like(o_ref)
        pltpu.sync_copy(x_ref, buf_hbm.at[working])

    # buf[working] holds this step's term: our own at step 0, else what the
    # left neighbour forwarded last step.
    pltpu.async_copy(buf_hbm.at[working], staging, local_sem).wait()

    # We read our working slot; the left neighbour may overwrite it next step.
    @pl.when(step < n - 2)
    def _():
        pl.semaphore_signal(capacity_sem, 1, device_id=(left,),
                            device_id_type=MESH)

    forward = pltpu.make_async_remote_copy(
        buf_hbm.at[working], buf_hbm.at[1 - working], send_sem, recv_sem,
        device_id=(right,), device_id_type=MESH)

    @pl.when(step < n - 1)
    def _():
        @pl.when(step > 0)
        def _():
            pl.semaphore_wait(capacity_sem, 1)
        forward.start()

    o_ref[...] += staging[...]

    @pl.when(step < n - 1)
    def _():
        forward.wait()


def ring_all_reduce(x, *, axis: str, n: int, interpret=None):
    """``lax.psum(x, axis)``; needs n > 1."""
    kernel = functools.partial(_all_reduce_kernel, axis=axis, n=n)
    out, _ = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct((2, *x.shape), x.dtype)),
        grid=(n,), in_specs=[VMEM], out_specs=(VMEM, ANY),
        scratch_shapes=[DMA, DMA, DMA, REGULAR, pltpu.VMEM(x.shape, x.dtype)],
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=interpret)(x)
    return out


# --- reduce-scatter ---------------------------------------------------------


def _reduce_scatter_kernel(x_ref, o_ref, recv_buf, acc, send_sems, recv_sems,
                           capacity_sems, *, axis, n, directions):
    step = pl.program_id(0)
    me, right, left = _neighbours(axis, n)
    working = lax.rem(step, 2)
    rows = o_ref.shape[0] // len(directions)

    @pl.when(step == 0)
    def _():
        _barrier(left, right)

    copies = []
    for k, direction in enumerate(directions):
        part = pl.ds(k * rows, rows)
        target, source = (right, left) if direction > 0 else (left, right)
        # The partial sum of block b starts next to b, against the direction,
        # and reaches b after n - 1 hops.
        block = lax.rem(me + (2 * n - 1 - step) * direction + 2 * n * n, n)
        term = x_ref[block, part]

        @pl.when(step == 0)
        def _():
            acc[k] = term

        @pl.when(step > 0)
        def _():
            acc[k] = recv_buf[k, working] + term

        # Done with recv_buf[k, working]: the sender may refill it.
        @pl.when((step >= 1) & (step <= n - 3))
        def _():
            pl.semaphore_signal(capacity_sems.at[k], 1, device_id=(source,),
                                device_id_type=MESH)

        copy = pltpu.make_async_remote_copy(
            acc.at[k], recv_buf.at[k, 1 - working], send_sems.at[k],
            recv_sems.at[k], device_id=(target,), device_id_type=MESH)
        copies.append(copy)

        @pl.when(step < n - 1)
        def _():
            @pl.when(step >= 2)
            def _():
                pl.semaphore_wait(capacity_sems.at[k], 1)
            copy.start()

        @pl.when(step == n - 1)
        def _():
            o_ref[part] = acc[k]

    @pl.when(step < n - 1)
    def _():
        for copy in copies:
            copy.wait()


def ring_reduce_scatter(x, *, axis: str, n: int, bidirectional: bool = False,
                        interpret=None):
    """``lax.psum_scatter(x, axis)`` of ``x`` of shape ``(n, rows, cols)``.

    Needs n > 1 (and an even ``rows`` when bidirectional).
    """
    directions = (-1, 1) if bidirectional else (1,)
    _, rows, cols = x.shape
    part = (rows // len(directions), cols)
    ways = len(directions)
    kernel = functools.partial(_reduce_scatter_kernel, axis=axis, n=n,
                               directions=directions)
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((rows, cols), x.dtype),
        grid=(n,), in_specs=[VMEM], out_specs=VMEM,
        scratch_shapes=[pltpu.VMEM((ways, 2, *part), x.dtype),
                        pltpu.VMEM((ways, *part), x.dtype),
                        DMA((ways,)), DMA((ways,)), REGULAR((ways,))],
        compiler_params=pltpu.CompilerParams(collective_id=0),
        interpret=interpret)(x)
