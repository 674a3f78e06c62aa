"""The fidelity dial: absl flags and environment variables for defaults.

Every fidelity field of ``FastInterpretParams`` takes its default from, in
order of precedence:

1. the absl flag ``--fast_interpret_<field>``, when given on the command line;
2. the environment variable ``FAST_INTERPRET_<FIELD>``;
3. the preset chosen by ``--fast_interpret_fidelity`` (or
   ``FAST_INTERPRET_FIDELITY``): ``checked`` (the default: every check on),
   ``fast`` (no checks: no host callback in the program), or ``tpu`` (the
   context managers and the pytest plugin switch to
   ``pltpu.InterpretParams()``, JAX's full simulation with race detection);
4. the built-in default.

Arguments passed to ``FastInterpretParams(...)`` always win. Flags are read
when params are built, and reading them before absl parsed the command line
is fine (their defaults are used).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import flags

LEVELS = ("fast", "checked", "tpu")

_PRESETS: dict[str, dict[str, Any]] = {
    "fast": {"out_of_bounds_reads": "clamp", "check_semaphores": False,
             "check_output_revisits": False},
    "checked": {"out_of_bounds_reads": "raise", "check_semaphores": True,
                "check_output_revisits": True},
    "tpu": {},
}

_FLAG_DEFS: dict[str, tuple[Callable[..., Any], Any, str, Callable[[str],
                                                                 Any]]] = {}


def _define(name: str, define, builtin, help_text: str, parse, **kwargs):
  flag_name = f"fast_interpret_{name}"
  if flag_name not in flags.FLAGS:
    define(name=flag_name, default=None, help=help_text, **kwargs)
  _FLAG_DEFS[name] = (define, builtin, help_text, parse)


def _parse_bool(text: str) -> bool:
  value = text.strip().lower()
  if value in ("1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"fast_interpret: expected a boolean, got {text!r}")


_define("out_of_bounds_reads", flags.DEFINE_enum, "raise",
        "Bounds checks: 'raise' (check and raise), 'uninitialized' (off; "
        "reads outside a buffer give the uninitialised value) or 'clamp' "
        "(off; out-of-range starts clamped, no cost).",
        str, enum_values=["raise", "uninitialized", "clamp"])
_define("uninitialized_memory", flags.DEFINE_enum, "nan",
        "Fill of memory never written: 'nan' (int max) or 'zero'.", str,
        enum_values=["nan", "zero"])
_define("dma_execution_mode", flags.DEFINE_enum, "eager",
        "When a DMA's copy lands: 'eager' (at start) or 'on_wait' (at the "
        "first wait on its semaphore).", str,
        enum_values=["eager", "on_wait"])
_define("check_semaphores", flags.DEFINE_boolean, True,
        "Raise on semaphore waits that would hang and on semaphores left "
        "non-zero at kernel exit.", _parse_bool)
_define("check_output_revisits", flags.DEFINE_boolean, True,
        "Raise when an output block is written back again after the grid "
        "moved to other blocks.", _parse_bool)
_define("num_cores_or_threads", flags.DEFINE_integer, 1,
        "Simulated TensorCores per device.", int)
if "fast_interpret_fidelity" not in flags.FLAGS:
  flags.DEFINE_enum(
      name="fast_interpret_fidelity", default=None, enum_values=list(LEVELS),
      help="Preset for every fidelity field: fast, checked or tpu.")


def fidelity_level() -> str:
  """The preset in force: the flag, else FAST_INTERPRET_FIDELITY, else checked."""
  flag = flags.FLAGS["fast_interpret_fidelity"]
  if flag.present and flag.value:
    return flag.value
  env = os.environ.get("FAST_INTERPRET_FIDELITY")
  if env:
    level = env.strip().lower()
    if level not in LEVELS:
      raise ValueError(
          f"fast_interpret: FAST_INTERPRET_FIDELITY must be one of {LEVELS}, "
          f"got {env!r}.")
    return level
  return "checked"


def default(name: str) -> Any:
  """The default of the fidelity field ``name`` (see the module docstring)."""
  _, builtin, _, parse = _FLAG_DEFS[name]
  flag = flags.FLAGS[f"fast_interpret_{name}"]
  if flag.present and flag.value is not None:
    return flag.value
  env = os.environ.get(f"FAST_INTERPRET_{name.upper()}")
  if env is not None:
    return parse(env)
  return _PRESETS[fidelity_level()].get(name, builtin)


def default_factory(name: str) -> Callable[[], Any]:
  return lambda: default(name)


def preset_fields(level: str) -> dict[str, Any]:
  """The field values a preset sets (empty for the built-in defaults)."""
  if level not in LEVELS:
    raise ValueError(
        f"fast_interpret: fidelity must be one of {LEVELS}, got {level!r}.")
  return dict(_PRESETS[level])
