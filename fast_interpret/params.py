"""`FastInterpretParams`: what a fast-interpreted kernel simulates.

A subclass of ``pltpu.InterpretParams`` so that it is accepted wherever JAX
accepts TPU interpret parameters (``pl.pallas_call(interpret=...)``,
``pl.core_map``, ``pltpu.force_tpu_interpret_mode``). The inherited fields keep
their meaning where we model them; fields that ask for behaviour we do not
model raise at construction with a pointer to ``pltpu.InterpretParams``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from fast_interpret import _jax
from fast_interpret import flags

_TPU_MODE_HINT = (
    "Use interpret=pltpu.InterpretParams(...) for that: it simulates every "
    "memory access through host callbacks, slowly but in full."
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FastInterpretParams(_jax.InterpretParams):
  """Runs a Pallas TPU kernel as one compiled XLA program on any backend.

  Pass an instance as ``interpret=`` to ``pl.pallas_call`` or ``pl.core_map``,
  or use :func:`fast_interpret.force_fast_interpret_mode`. The kernel jaxpr is
  re-interpreted into plain JAX ops: simulated HBM, VMEM, SMEM and semaphores
  are arrays threaded through the grid loop, loads and stores are (dynamic)
  slices, DMAs are copies and semaphores are integer counters.

  What is modelled: the grid (run in order), TPU block pipelining (an input
  block is fetched for every step; an output block is written back to HBM
  when the next step maps it elsewhere or the grid ends, and an output VMEM
  buffer keeps its contents between steps exactly as on TPU), padding of blocks that do not divide the
  array, scalar prefetch, scratch that persists across grid steps, DMAs
  between any memory spaces and DMA/REGULAR semaphore counts, and, inside
  ``jax.shard_map``, remote DMAs, remote signals and barrier semaphores
  between devices that run in lockstep.

  What is not modelled: race detection, real DMA latency and overlap,
  concurrent cores (they run in turn, see ``num_cores_or_threads``), devices
  out of step, hardware PRNG bit streams, exact TPU float rounding of
  transcendental functions.

  Defaults of the fidelity fields come from absl flags and environment
  variables (see ``fast_interpret.flags``); explicit arguments win.

  Example::

    out = pl.pallas_call(kernel, out_shape=...,
                         interpret=fast_interpret.FastInterpretParams())(x)

  Attributes:
    dma_execution_mode: ``"eager"`` (default): a DMA's copy happens when it is
      started, a valid TPU schedule. ``"on_wait"``: the copy lands at the
      first ``.wait()`` on its semaphore (the latest valid schedule), so a
      read of the destination before the wait sees the old contents, as in
      ``pltpu.InterpretParams(dma_execution_mode="on_wait")``; costs a shadow
      and a tag array per DMA destination buffer. Unlike JAX's mode, the
      source is read at start, and a wait lands every copy in flight on its
      semaphore; ``add=True`` copies and destinations seen through a bitcast
      or reshape land at start.
    uninitialized_memory: ``"nan"`` (default) fills output buffers, scratch and
      padding with NaN (integers: their maximum value; booleans: True, as
      ``pltpu.InterpretParams`` does) so that reading memory never written
      shows up; ``"zero"`` fills with zeros.
    detect_races: must be False: race detection is not modelled.
    num_cores_or_threads: simulated TensorCores per device (default 1). With
      more than one, the leading 'parallel' / 'core_parallel' grid
      dimensions are split into contiguous chunks, one per core, as on a
      megacore TPU; each core has its own VMEM, SMEM (scalar prefetch is
      copied to each), scratch and semaphores, while HBM and
      ``pltpu.VMEM_SHARED`` are shared. A ``pl.core_map`` / ``pl.kernel``
      over ``pltpu.create_tensorcore_mesh(..., num_cores=N)`` runs on N
      cores whatever this field says. Cores run one after another, unless
      they signal each other (``pltpu.core_barrier``,
      ``pl.semaphore_signal(..., core_index=)``): then they run in lock
      step, switching at every semaphore wait (see ``fast_interpret.cores``);
      a wait that this schedule cannot satisfy raises instead of hanging.
    skip_floating_point_ops: must be False.
    out_of_bounds_reads: ``"raise"`` (default) checks every ref index, DMA
      slice and block index against its buffer and raises
      ``KernelCheckError`` (message prefix ``fast_interpret: out of bounds:``)
      after the call, naming the kernel, operand, grid step and indices.
      ``"uninitialized"`` turns the checks off and, as
      ``pltpu.InterpretParams`` does, makes the elements of a ref load, a
      ``pl.load`` or a DMA source that lie outside their buffer read as the
      uninitialised value (see ``uninitialized_memory``); the parts of a
      store or DMA destination outside the buffer are dropped (JAX's mode
      raises on those). It costs a few ops on every access whose start is
      not known while tracing. Blocks that an index map selects outside the
      array are read and written back the same way, and so are the entries
      of an integer-array index (``pltpu.InterpretParams`` rejects those;
      a TPU does not support them). ``"clamp"`` (ours, used by ``unchecked()`` and the
      ``fast`` preset) turns the checks off at no cost: an out-of-range
      dynamic start is clamped into range (XLA and ``interpret=True``
      semantics).
    check_semaphores: True (default) raises (prefix ``fast_interpret:
      semaphore:``) when a wait asks for more than was signalled (a TPU would
      hang), when a DMA wait names a different size than its copy, and when a
      scratch semaphore is non-zero as the kernel ends.
    check_output_revisits: True (default) raises (prefix ``fast_interpret:
      output revisited:``) when an output block is written back to HBM a
      second time after the grid moved on to other blocks: on TPU the second
      visit starts from a stale VMEM buffer. Outputs with ``pl.Element``
      block dimensions are not checked.
    grid_point_recorder: must be None (it would need a host callback).
    random_seed: None (default) runs the grid in row-major order. An int
      visits the coordinates of every 'parallel' / 'core_parallel' grid
      dimension in a random order, the same for the same seed (a NumPy
      permutation made while tracing), as ``pltpu.InterpretParams`` does;
      a kernel that depends on the order of its parallel steps then gives
      different results for different seeds. Not applied to core_map
      meshes (each core runs its own index).
    allow_hbm_allocation_in_run_scoped: if True, ``pl.run_scoped`` may allocate
      HBM buffers (the TPU cannot).
    buffer_bounds: accepted for compatibility; bounds are logical shapes.
  """

  dma_execution_mode: Literal["eager", "on_wait"] = dataclasses.field(
      default_factory=flags.default_factory("dma_execution_mode"))
  out_of_bounds_reads: Literal["raise", "uninitialized", "clamp"] = (
      dataclasses.field(
          default_factory=flags.default_factory("out_of_bounds_reads")))
  uninitialized_memory: Literal["nan", "zero"] = dataclasses.field(
      default_factory=flags.default_factory("uninitialized_memory"))
  num_cores_or_threads: int = dataclasses.field(
      default_factory=flags.default_factory("num_cores_or_threads"))
  check_semaphores: bool = dataclasses.field(
      default_factory=flags.default_factory("check_semaphores"))
  check_output_revisits: bool = dataclasses.field(
      default_factory=flags.default_factory("check_output_revisits"))

  @classmethod
  def unchecked(cls, **overrides) -> FastInterpretParams:
    """Params with every runtime check off: no host callback at all."""
    return cls(**{**flags.preset_fields("fast"), **overrides})

  @property
  def checks_enabled(self) -> bool:
    return (self.out_of_bounds_reads == "raise" or self.check_semaphores
            or self.check_output_revisits)

  def __post_init__(self):
    super().__post_init__()
    _require(not self.detect_races, "detect_races=True",
             "fast interpret skips race detection.")
    _require(not self.skip_floating_point_ops, "skip_floating_point_ops=True",
             "fast interpret always computes floating point values.")
    _require(self.grid_point_recorder is None, "grid_point_recorder",
             "recording grid points needs a host callback.")
    _require(self.logging_mode is None, "logging_mode",
             "fast interpret does not log memory operations.")
    if self.dma_execution_mode not in ("eager", "on_wait"):
      raise ValueError(
          "FastInterpretParams: dma_execution_mode must be 'eager' or "
          f"'on_wait', got {self.dma_execution_mode!r}.")
    if self.out_of_bounds_reads not in ("raise", "uninitialized", "clamp"):
      raise ValueError(
          "FastInterpretParams: out_of_bounds_reads must be 'raise', "
          f"'uninitialized' or 'clamp', got {self.out_of_bounds_reads!r}.")
    if self.uninitialized_memory not in ("nan", "zero"):
      raise ValueError(
          "FastInterpretParams: uninitialized_memory must be 'nan' or 'zero', "
          f"got {self.uninitialized_memory!r}.")


def _require(ok: bool, what: str, why: str) -> None:
  if not ok:
    raise ValueError(
        f"FastInterpretParams does not support {what}: {why} {_TPU_MODE_HINT}")
