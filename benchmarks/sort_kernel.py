"""A bitonic sort Pallas TPU kernel, written the way TPU sort kernels are.

The kernel sorts the *flattened* (row-major) contents of an ``(8, N)`` f32
array, ``N = 128 * 2**k``, and returns the result in the same ``(8, N)`` shape:
``bitonic_sort(x) == jnp.sort(x.ravel()).reshape(x.shape)``.
``bitonic_argsort`` also returns int32 indices into ``x.ravel()``.

The order is ``jnp.sort``'s: NaNs sort after every number, ``-0.0 == 0.0``,
and the sort is stable (ties keep their original order), so the kernel always
carries an int32 index array beside the values and breaks ties with it, as
general TPU sort kernels do. ``descending=True`` reverses the key order (NaNs
first) but still keeps ties in their original order, exactly like
``jnp.argsort(..., stable=True, descending=True)``; the references below are
written with that function.

Layout: the whole array is one VMEM block, seen as ``T = N // 128`` tiles of
(8 sublanes, 128 lanes). Element ``(r, t*128 + l)`` has flat index
``f = r*N + t*128 + l``, so the bits of ``f`` are, from the least significant:
7 lane bits, ``log2(T)`` tile bits, 3 sublane bits. A bitonic network over
``8N`` elements is a sequence of compare-exchange steps between ``f`` and
``f ^ 2**j``:

* lane or sublane bit ``j``: the partner is in the same tile; it is fetched
  with a ``jnp.take_along_axis`` permutation along lanes or sublanes. Runs of
  such steps are unrolled in Python inside one ``pl.loop`` over the tiles.
* tile bit ``j``: the partner is the same position in another tile; one
  ``pl.loop`` over tile pairs exchanges them element-wise.

Each compare maps both floats to ``lax.sort``'s total-order int32 keys and
breaks ties on the index. Every step is unrolled in Python, so the kernel
jaxpr holds thousands of equations (about 3.9k at (8,128), 7.5k at (8,2048)),
and with ``interpret=True`` XLA:CPU's loop fusion duplicates the long
element-wise chains: the first call at (8,128) takes well over 30 s on a
2-core CPU (see ``python -m benchmarks.sort_kernel``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import jax.extend.core as jex_core
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

SUBLANES = 8
LANES = 128
_LANE_BITS = 7
_SUBLANE_BITS = 3


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each bit of the flat index lives in the (8, N) tile layout."""

    n: int

    @property
    def num_tiles(self) -> int:
        return self.n // LANES

    @property
    def tile_bits(self) -> int:
        return self.num_tiles.bit_length() - 1

    @property
    def total_bits(self) -> int:
        return _LANE_BITS + self.tile_bits + _SUBLANE_BITS

    def is_tile_bit(self, j: int) -> bool:
        return _LANE_BITS <= j < _LANE_BITS + self.tile_bits

    def local_axis_and_shift(self, j: int) -> tuple[int, int]:
        """For an in-tile bit: (axis of the (8,128) tile, bit within it)."""
        if j < _LANE_BITS:
            return 1, j
        return 0, j - _LANE_BITS - self.tile_bits


@dataclasses.dataclass(frozen=True)
class Step:
    """One compare-exchange step: partner is ``f ^ 2**bit``; the direction
    of each block is set by bit ``stage_bit`` of ``f``."""

    stage_bit: int
    bit: int


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps run together: in-tile steps share one loop over tiles; a
    cross-tile phase holds exactly one step, run as a loop over tile pairs."""

    cross_tile: bool
    steps: tuple[Step, ...]


@dataclasses.dataclass(frozen=True)
class SortSpec:
    """Static configuration of one kernel instance."""

    layout: Layout
    descending: bool
    argsort: bool


def network_steps(total_bits: int) -> Iterator[Step]:
    """The compare-exchange steps of a bitonic sort of ``2**total_bits``."""
    for stage in range(total_bits):
        for bit in range(stage, -1, -1):
            yield Step(stage_bit=stage + 1, bit=bit)


def plan_phases(layout: Layout) -> tuple[Phase, ...]:
    """Groups the network's steps into in-tile and cross-tile phases."""
    phases: list[Phase] = []
    local: list[Step] = []
    for step in network_steps(layout.total_bits):
        if layout.is_tile_bit(step.bit):
            if local:
                phases.append(Phase(cross_tile=False, steps=tuple(local)))
                local = []
            phases.append(Phase(cross_tile=True, steps=(step,)))
        else:
            local.append(step)
    if local:
        phases.append(Phase(cross_tile=False, steps=tuple(local)))
    return tuple(phases)


def _flat_index(layout: Layout, tile) -> jax.Array:
    """Flat (row-major) index of every element of tile ``tile``."""
    sub = lax.broadcasted_iota(jnp.int32, (SUBLANES, LANES), 0)
    lane = lax.broadcasted_iota(jnp.int32, (SUBLANES, LANES), 1)
    return sub * layout.n + tile * LANES + lane


def _bit_is_zero(flat: jax.Array, bit: int) -> jax.Array:
    return ((flat >> bit) & 1) == 0


def _total_order_key(x: jax.Array) -> jax.Array:
    """int32 keys whose signed order is ``jnp.sort``'s float order.

    The same mapping as the comparator of ``lax.sort``: NaNs become one
    canonical NaN (the largest key), ``-0.0`` becomes ``0.0``, and negative
    floats have their magnitude bits flipped so that integer order matches.
    """
    x = jnp.where(x == x, x, jnp.nan)
    x = jnp.where(x == 0, 0.0, x).astype(x.dtype)
    bits = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _precedes(a_val, a_idx, b_val, b_idx, descending: bool) -> jax.Array:
    """True where ``(a_val, a_idx)`` strictly precedes ``(b_val, b_idx)``.

    Keys compare in ``jnp.sort``'s total order (NaN largest, -0.0 == 0.0),
    through the same key mapping as the ``lax.sort`` comparator; equal keys
    are ordered by their original index, which makes the sort stable.
    """
    a_key, b_key = _total_order_key(a_val), _total_order_key(b_val)
    key_first = a_key > b_key if descending else a_key < b_key
    return key_first | ((a_key == b_key) & (a_idx < b_idx))


def _tile_slice(tile) -> pl.Slice:
    return pl.ds(pl.multiple_of(tile * LANES, LANES), LANES)


def _partner(x: jax.Array, axis: int, shift: int) -> jax.Array:
    """``x`` permuted so each element meets the one ``2**shift`` away."""
    iota = lax.broadcasted_iota(jnp.int32, (SUBLANES, LANES), axis)
    return jnp.take_along_axis(x, iota ^ (1 << shift), axis=axis)


def _in_tile_step(spec: SortSpec, step: Step, tile, vals, idxs):
    """Compare-exchange with the partner inside the same (8,128) tile."""
    axis, shift = spec.layout.local_axis_and_shift(step.bit)
    partner_vals = _partner(vals, axis, shift)
    partner_idxs = _partner(idxs, axis, shift)
    flat = _flat_index(spec.layout, tile)
    want_first = _bit_is_zero(flat, step.bit) == _bit_is_zero(flat, step.stage_bit)
    self_first = _precedes(vals, idxs, partner_vals, partner_idxs, spec.descending)
    keep = want_first == self_first
    return (jnp.where(keep, vals, partner_vals),
            jnp.where(keep, idxs, partner_idxs))


def _run_in_tile_phase(spec: SortSpec, phase: Phase, val_ref, idx_ref) -> None:
    @pl.loop(0, spec.layout.num_tiles)
    def _(tile):
        cols = _tile_slice(tile)
        vals, idxs = val_ref[:, cols], idx_ref[:, cols]
        for step in phase.steps:
            vals, idxs = _in_tile_step(spec, step, tile, vals, idxs)
        val_ref[:, cols] = vals
        idx_ref[:, cols] = idxs


def _run_cross_tile_step(spec: SortSpec, step: Step, val_ref, idx_ref) -> None:
    tile_bit = step.bit - _LANE_BITS
    distance = 1 << tile_bit

    @pl.loop(0, spec.layout.num_tiles // 2)
    def _(pair):
        lo_tile = ((pair >> tile_bit) << (tile_bit + 1)) | (pair & (distance - 1))
        lo_cols, hi_cols = _tile_slice(lo_tile), _tile_slice(lo_tile + distance)
        lo_vals, hi_vals = val_ref[:, lo_cols], val_ref[:, hi_cols]
        lo_idxs, hi_idxs = idx_ref[:, lo_cols], idx_ref[:, hi_cols]
        ascending = _bit_is_zero(_flat_index(spec.layout, lo_tile), step.stage_bit)
        lo_first = _precedes(lo_vals, lo_idxs, hi_vals, hi_idxs, spec.descending)
        keep = lo_first == ascending
        val_ref[:, lo_cols] = jnp.where(keep, lo_vals, hi_vals)
        val_ref[:, hi_cols] = jnp.where(keep, hi_vals, lo_vals)
        idx_ref[:, lo_cols] = jnp.where(keep, lo_idxs, hi_idxs)
        idx_ref[:, hi_cols] = jnp.where(keep, hi_idxs, lo_idxs)


def _sort_kernel(x_ref, val_ref, idx_ref, *, spec: SortSpec) -> None:
    """Sorts ``x_ref`` into ``val_ref``; ``idx_ref`` (an output for argsort,
    a VMEM scratch otherwise) receives the source flat indices."""
    val_ref[...] = x_ref[...]
    rows = lax.broadcasted_iota(jnp.int32, idx_ref.shape, 0)
    cols = lax.broadcasted_iota(jnp.int32, idx_ref.shape, 1)
    idx_ref[...] = rows * spec.layout.n + cols
    for phase in plan_phases(spec.layout):
        if phase.cross_tile:
            _run_cross_tile_step(spec, phase.steps[0], val_ref, idx_ref)
        else:
            _run_in_tile_phase(spec, phase, val_ref, idx_ref)


def _check_shape(x: jax.Array) -> Layout:
    rows, n = x.shape
    tiles = n // LANES
    if rows != SUBLANES or n % LANES or tiles & (tiles - 1) or not tiles:
        raise ValueError(
            f"bitonic sort needs shape (8, 128 * 2**k), got {x.shape}")
    if x.dtype != jnp.float32:
        raise TypeError(f"bitonic sort supports float32 only, got {x.dtype}")
    return Layout(n=n)


def _sort_call(x: jax.Array, spec: SortSpec, interpret):
    block = pl.BlockSpec(x.shape, lambda: (0, 0))
    val_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    idx_shape = jax.ShapeDtypeStruct(x.shape, jnp.int32)
    if spec.argsort:
        out_shape, out_specs, scratch = (val_shape, idx_shape), (block, block), ()
    else:
        out_shape, out_specs = (val_shape,), (block,)
        scratch = (pltpu.VMEM(x.shape, jnp.int32),)
    return pl.pallas_call(
        functools.partial(_sort_kernel, spec=spec),
        out_shape=out_shape,
        in_specs=[block],
        out_specs=out_specs,
        scratch_shapes=scratch,
        interpret=interpret,
        name="bitonic_argsort" if spec.argsort else "bitonic_sort",
    )(x)


def bitonic_sort(x: jax.Array, *, descending: bool = False,
                 interpret=False) -> jax.Array:
    """Sorts the flattened ``(8, N)`` array ``x``; returns shape ``(8, N)``.

    ``interpret`` is passed to ``pl.pallas_call`` unchanged.
    """
    spec = SortSpec(layout=_check_shape(x), descending=descending, argsort=False)
    (vals,) = _sort_call(x, spec, interpret)
    return vals


def bitonic_argsort(x: jax.Array, *, descending: bool = False,
                    interpret=False) -> tuple[jax.Array, jax.Array]:
    """Sorted values and stable int32 argsort indices of ``x.ravel()``.

    Both outputs have the shape ``(8, N)`` of ``x``; ``indices`` index into
    ``x.ravel()``.
    """
    spec = SortSpec(layout=_check_shape(x), descending=descending, argsort=True)
    vals, idxs = _sort_call(x, spec, interpret)
    return vals, idxs


def reference_argsort(x: jax.Array, *, descending: bool = False
                      ) -> tuple[jax.Array, jax.Array]:
    """Stable ``jnp.argsort`` of the flattened array, and the sorted values."""
    flat = x.ravel()
    idx = jnp.argsort(flat, stable=True, descending=descending).astype(jnp.int32)
    return flat[idx].reshape(x.shape), idx.reshape(x.shape)


def reference_sort(x: jax.Array, *, descending: bool = False) -> jax.Array:
    """Stable sort of the flattened array, reshaped like ``x``.

    For ``descending=False`` this is ``jnp.sort(x.ravel())``.
    """
    return reference_argsort(x, descending=descending)[0]


def count_eqns(jaxpr) -> int:
    """Number of equations in a (closed) jaxpr, including nested jaxprs."""
    if isinstance(jaxpr, jex_core.ClosedJaxpr):
        jaxpr = jaxpr.jaxpr
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            total += sum(count_eqns(sub) for sub in _jaxprs_in(value))
    return total


def _jaxprs_in(value) -> Iterator:
    if isinstance(value, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs_in(item)


def _random_input(n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(
        np.random.default_rng(seed).standard_normal((SUBLANES, n), np.float32))


def bitwise_equal(a, b) -> bool:
    """True when two arrays have the same shape, dtype and bits (NaN-safe)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def _self_check(n: int, interpret) -> None:
    """Prints equation counts and checks all variants against jnp."""
    x = _random_input(n)
    # Ties, NaNs and signed zeros exercise the order and the tie-break.
    x_ties = (jnp.round(x * 4) / 4).at[0, :9:2].set(jnp.nan).at[1, :7:3].set(-0.0)
    variants = {
        "sort": (False, False), "sort_desc": (False, True),
        "argsort": (True, False), "argsort_desc": (True, True),
    }
    for name, (argsort, descending) in variants.items():
        kernel_fn = bitonic_argsort if argsort else bitonic_sort
        ref_fn = reference_argsort if argsort else reference_sort
        kernel = jax.jit(functools.partial(
            kernel_fn, descending=descending, interpret=interpret))
        eqns = count_eqns(jax.make_jaxpr(kernel)(x))
        for label, arr in (("random", x), ("ties", x_ties)):
            start = time.perf_counter()
            got = jax.block_until_ready(kernel(arr))
            seconds = time.perf_counter() - start
            want = ref_fn(arr, descending=descending)
            ok = all(bitwise_equal(g, w) for g, w in zip(
                jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
            print(f"(8,{n}) {name:13s} {label:6s} eqns={eqns:6d} "
                  f"call={seconds:7.2f}s correct={ok}", flush=True)
            if not ok:
                raise SystemExit(f"{name} ({label}) does not match jnp")


def main() -> None:
    """``python -m benchmarks.sort_kernel``: equation counts + correctness."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[128])
    parser.add_argument("--mode", choices=["interpret", "tpu_interpret"],
                        default="interpret")
    args = parser.parse_args()
    interpret = True if args.mode == "interpret" else pltpu.InterpretParams()
    for n in args.n:
        _self_check(n, interpret)


if __name__ == "__main__":
    main()
