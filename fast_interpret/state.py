"""Simulated memory: the kernel state threaded through the interpreter.

Every allocation the kernel can see (an HBM operand, a VMEM block, a scratch
buffer, an SMEM scalar table, a semaphore array) is one JAX array in
``KernelState.buffers``, keyed by a buffer id. A ref in the kernel jaxpr is
bound to a ``RefHandle``: the buffer id plus the chain of ref transforms
(indexers, bitcasts, reshapes) applied to it. Handles never hold data, so a
rule that reads or writes memory always goes through the state.

Semaphores are int32 arrays of the semaphore array's shape.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from fast_interpret import _jax

Array = Any


@dataclasses.dataclass(frozen=True)
class RefHandle:
  """A ref seen by the kernel: which buffer, and the view of it.

  Attributes:
    buffer_id: key into ``KernelState.buffers``.
    memory_space: the simulated memory space (a TPU or Pallas MemorySpace, or
      "semaphore").
    name: the operand name used in error messages.
    transforms: ref transforms (NDIndexer, bitcast, reshape) applied in order.
    per_core: the buffer holds one row per simulated core (semaphores of
      cores run in lock step, which other cores can signal); the row of
      the running core is selected before ``transforms`` apply.
  """

  buffer_id: int
  memory_space: Any
  name: str
  transforms: tuple[Any, ...] = ()
  per_core: bool = False

  def with_transforms(self, transforms) -> RefHandle:
    if not transforms:
      return self
    return dataclasses.replace(
        self, transforms=self.transforms + tuple(transforms))

  @property
  def is_semaphore(self) -> bool:
    return self.memory_space == "semaphore"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelState:
  """All simulated memory, as a pytree of arrays keyed by buffer id.

  ``pending`` holds check records not yet folded into the error word (see
  ``checks.record`` / ``checks.flush``), and ``deferred`` those held back
  across a conditional (``checks.defer``); both must be empty whenever
  buffers cross a ``lax`` boundary (``subset``).
  """

  buffers: dict[int, Array]
  pending: tuple[Any, ...] = dataclasses.field(
      default=(), metadata=dict(static=True))
  deferred: Any = dataclasses.field(default=None, metadata=dict(static=True))

  def read(self, buffer_id: int) -> Array:
    return self.buffers[buffer_id]

  def write(self, buffer_id: int, value: Array) -> KernelState:
    old = self.buffers[buffer_id]
    if value.shape != old.shape or value.dtype != old.dtype:
      raise AssertionError(
          f"buffer {buffer_id}: write of {value.shape}{value.dtype} into "
          f"{old.shape}{old.dtype}")
    return dataclasses.replace(self, buffers={**self.buffers, buffer_id: value})

  def add(self, buffer_id: int, value: Array) -> KernelState:
    return dataclasses.replace(self, buffers={**self.buffers, buffer_id: value})

  def drop(self, buffer_ids) -> KernelState:
    ids = set(buffer_ids)
    return dataclasses.replace(
        self, buffers={k: v for k, v in self.buffers.items() if k not in ids})

  def subset(self, buffer_ids) -> dict[int, Array]:
    if self.pending or self.deferred is not None:
      raise AssertionError(
          "fast_interpret internal error: check records not flushed before "
          "leaving a traced body")
    return {i: self.buffers[i] for i in sorted(buffer_ids)}

  def with_buffers(self, buffers: dict[int, Array]) -> KernelState:
    return dataclasses.replace(self, buffers={**self.buffers, **buffers})


class BufferIds:
  """Hands out fresh buffer ids for one interpreted kernel."""

  def __init__(self):
    self._counter = itertools.count()

  def fresh(self) -> int:
    return next(self._counter)


def is_semaphore_aval(aval) -> bool:
  dtype = getattr(aval, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, _jax.SemaphoreDtype)


def memory_space_of(aval) -> Any:
  if is_semaphore_aval(aval):
    return "semaphore"
  return getattr(aval, "memory_space", None)


def scoped_memory_space(ref_aval) -> Any:
  """The memory space of an allocated ref (scratch or run_scoped).

  The ref's own memory space wins; the inner array's (a device default) is
  only a fallback.
  """
  inner = getattr(ref_aval, "inner_aval", ref_aval)
  if is_semaphore_aval(inner):
    return "semaphore"
  return getattr(ref_aval, "memory_space", None) or memory_space_of(inner)


def storage_dtype(aval) -> np.dtype:
  """The dtype of the array that simulates a buffer of ``aval``."""
  if is_semaphore_aval(aval):
    return np.dtype(np.int32)
  return aval.dtype


def as_int32(x) -> Array:
  """``jnp.asarray(x, jnp.int32)``, free for what already is an int32 array.

  ``jnp.asarray`` is tens of microseconds of Python per call while tracing,
  and the index arithmetic of a kernel converts scalars by the hundred. An
  int becomes a NumPy int32: ``jnp.asarray`` of an int is an equation of
  its own inside the grid loop.
  """
  if (isinstance(x, jax.Array) and x.dtype == np.int32
      and not x.weak_type):
    return x
  if isinstance(x, (int, np.integer)):
    return np.int32(x)
  return jnp.asarray(x, jnp.int32)


def uninitialized(shape, dtype, fill: str) -> Array:
  """A buffer the kernel has not written yet: NaN/int max/True, or zeros.

  The same values as ``pltpu.InterpretParams(uninitialized_memory=...)``.
  """
  dtype = np.dtype(dtype) if not isinstance(dtype, np.dtype) else dtype
  # lax.full, what jnp.full/zeros/ones call after checks that cost more
  # Python than the fill itself (scratch buffers are filled every step).
  shape = tuple(shape)
  if fill == "zero":
    return lax.full(shape, 0, dtype)
  if dtype == np.bool_:
    return lax.full(shape, True, dtype)
  if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(
      dtype, jnp.complexfloating):
    return lax.full(shape, np.nan, dtype)
  if jnp.issubdtype(dtype, jnp.integer):
    return lax.full(shape, jnp.iinfo(dtype).max, dtype)
  return lax.full(shape, 0, dtype)
