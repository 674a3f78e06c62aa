"""Which Pallas primitives each interpret mode can run, derived from the code.

``python -m fast_interpret.support`` prints the table that docs/support.md
holds (a test keeps the two equal). For every primitive defined by Pallas
(core and TPU modules):

* fast interpret: ``rule`` (a rule of ours simulates it), ``pure`` (it lowers
  on every platform and takes no ref, so it runs as is), or ``no`` (tracing
  fails with ``fast_interpret: unsupported primitive``);
* ``interpret=True`` (JAX's HLO interpreter): ``yes`` when JAX has a state
  discharge rule or a platform-independent lowering for it, or resolves it
  while tracing (program ids);
* ``pltpu.InterpretParams()``: ``yes`` when JAX's TPU interpreter names it
  in its evaluation loop or it has a platform-independent lowering.

The JAX columns are read off JAX's registries and sources, so they say what
the code dispatches, not whether every use works (JAX's modes fail on some
real kernels, see the benchmarks).
"""

from __future__ import annotations

import dataclasses
import re

from fast_interpret import _jax
from fast_interpret import grid  # pylint: disable=unused-import  (registers rules)
from fast_interpret import interpreter


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  fast: str
  hlo: str
  tpu: str


def _tpu_mode_names() -> set[str]:
  source = _jax.tpu_interpret_source()
  return set(re.findall(r"prim is (?:\w+\.)*(\w+)_p\b", source))


# Resolved while JAX's modes trace the kernel (from Pallas' grid
# environment), so they never reach those modes' evaluators.
_RESOLVED_AT_TRACE_TIME = ("program_id", "num_programs")


def rows() -> list[Row]:
  """One row per Pallas primitive, sorted by name."""
  tpu_names = _tpu_mode_names()
  table = []
  for prim in sorted(_jax.pallas_primitive_set(), key=lambda p: p.name):
    generic = _jax.has_generic_lowering(prim)
    if interpreter.has_rule(prim):
      fast = "rule"
    elif generic:
      fast = "pure"
    else:
      fast = "no"
    traced = prim.name in _RESOLVED_AT_TRACE_TIME
    hlo = "yes" if generic or traced or _jax.has_discharge_rule(prim) else "no"
    tpu = "yes" if (generic or traced or prim.name in tpu_names
                    or _tpu_mode_handles(prim, tpu_names)) else "no"
    table.append(Row(prim.name, fast, hlo, tpu))
  return table


def _tpu_mode_handles(prim, names: set[str]) -> bool:
  # The TPU interpreter refers to primitives by their Python names, e.g.
  # `primitives.load_p` for the primitive named "masked_load".
  return any(getattr(module, f"{n}_p", None) is prim for n in names
             for module in _jax.pallas_primitive_modules())


def markdown() -> str:
  """The support table as Markdown."""
  lines = [
      "| primitive | fast interpret | `interpret=True` | "
      "`pltpu.InterpretParams()` |",
      "|---|---|---|---|",
  ]
  lines += [f"| `{r.name}` | {r.fast} | {r.hlo} | {r.tpu} |" for r in rows()]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(markdown(), end="")
