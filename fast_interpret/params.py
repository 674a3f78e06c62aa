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
  between any memory spaces and DMA/REGULAR semaphore counts.

  What is not modelled: race detection, real DMA latency and overlap, cross-
  core timing, hardware PRNG bit streams, exact TPU float rounding of
  transcendental functions.

  Example::

    out = pl.pallas_call(kernel, out_shape=...,
                         interpret=fast_interpret.FastInterpretParams())(x)

  Attributes:
    dma_execution_mode: ``"eager"`` (default): a DMA's copy happens when it is
      started, which is a valid TPU schedule. Other values are not modelled yet
      and raise.
    uninitialized_memory: ``"nan"`` (default) fills output buffers, scratch and
      padding with NaN (integers: their maximum value) so that reading memory
      never written shows up; ``"zero"`` fills with zeros.
    detect_races: must be False: race detection is not modelled.
    num_cores_or_threads: simulated TensorCores per device (default 1). With
      more than one, the leading 'parallel' grid dimensions are split into
      contiguous chunks, one per core, as on a megacore TPU; each core has
      its own VMEM, SMEM (scalar prefetch is copied to each), scratch and
      semaphores, and HBM is shared. Cores run one after another, not in
      lock step.
    skip_floating_point_ops: must be False.
    out_of_bounds_reads: accepted for compatibility; out-of-bounds indices are
      clamped like XLA's dynamic_slice until bounds checks land.
    grid_point_recorder: must be None (it would need a host callback).
    random_seed: accepted; grid order is deterministic in this mode.
    allow_hbm_allocation_in_run_scoped: if True, ``pl.run_scoped`` may allocate
      HBM buffers (the TPU cannot).
    buffer_bounds: accepted for compatibility; bounds are logical shapes.
  """

  dma_execution_mode: Literal["eager", "on_wait"] = "eager"

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
    _require(self.dma_execution_mode == "eager",
             f"dma_execution_mode={self.dma_execution_mode!r}",
             "only eager DMAs are modelled so far.")
    if self.uninitialized_memory not in ("nan", "zero"):
      raise ValueError(
          "FastInterpretParams: uninitialized_memory must be 'nan' or 'zero', "
          f"got {self.uninitialized_memory!r}.")


def _require(ok: bool, what: str, why: str) -> None:
  if not ok:
    raise ValueError(
        f"FastInterpretParams does not support {what}: {why} {_TPU_MODE_HINT}")
