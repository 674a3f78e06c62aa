"""fast_interpret: run Pallas TPU kernels on any XLA backend, compiled.

Pass ``FastInterpretParams()`` as ``interpret=`` to ``pl.pallas_call`` (or use
``force_fast_interpret_mode()``): the kernel is re-interpreted into plain JAX
ops and the whole call compiles into one XLA program. Invariant: the emitted
program holds no host callback unless a fidelity option asks for one.

Modules:
  params         FastInterpretParams, the fidelity dial.
  modes          force_fast_interpret_mode / set_fast_interpret_mode.
  lowering       the hook into pallas_call's lowering.
  grid           the pallas_call driver: memory layout, grid loop, blocks.
  schedule       the grid schedule: per-step block indices and write-backs.
  grid_tables    whole-grid block tables, and their bounds/revisit checks.
  vectorize      step-independent grids as one vmap instead of the loop.
  interpreter    the rule registry and the jaxpr evaluator.
  constants      small integer values folded with NumPy while tracing.
  state          KernelState (simulated memory) and RefHandle.
  views          reads/writes through ref transforms.
  memory_rules   loads and stores.
  dma_rules      DMAs and semaphores, local and remote.
  remote         multi-device kernels: the mesh and the lockstep exchange.
  outbox         remote ops wait until observed, then go in one exchange.
  control_rules  cond, while, scan, jit, run_scoped.
  program_rules  program ids and grid sizes.
  checks         runtime checks and how their errors surface.
  flags          absl flags / environment variables: the fidelity dial.
  fences         fusion fences against XLA:CPU recomputation.
  pytest_plugin  --fast-interpret for whole test sessions.
  tpu_rules      the TPU PRNG and no-op hints (trace_value, touch).
  vector_rules   stochastic_round, pack/unpack_elementwise, static
                 butterfly gathers.
  debug_rules    debug prints, checkify checks and pl.debug_check.
  support        the support table of Pallas primitives (docs/support.md).
  errors         the exceptions we raise.
  _jax           the only module that imports jax internals.
"""

from fast_interpret import lowering as _lowering
from fast_interpret.errors import (FastInterpretError, UnsupportedFeatureError,
                                   UnsupportedPrimitiveError)
from fast_interpret.checks import KernelCheckError
from fast_interpret.modes import (force_fast_interpret_mode, params_for_level,
                                  set_fast_interpret_mode)
from fast_interpret.params import FastInterpretParams

_lowering.install()

__all__ = [
    "FastInterpretParams",
    "force_fast_interpret_mode",
    "set_fast_interpret_mode",
    "params_for_level",
    "KernelCheckError",
    "FastInterpretError",
    "UnsupportedFeatureError",
    "UnsupportedPrimitiveError",
]
__version__ = "0.1.0"
