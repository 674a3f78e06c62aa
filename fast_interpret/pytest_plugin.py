"""A pytest plugin that runs every Pallas kernel of a test session under fast interpret.

  pytest -p fast_interpret.pytest_plugin --fast-interpret          # checked
  pytest -p fast_interpret.pytest_plugin --fast-interpret=fast     # no checks
  pytest -p fast_interpret.pytest_plugin --fast-interpret=tpu      # pltpu.InterpretParams

Installed with the package, the plugin is also registered as a pytest entry
point under its module name (so that ``-p fast_interpret.pytest_plugin`` finds
it registered rather than loading it twice), and ``--fast-interpret`` works
without ``-p``; without the option it does nothing. ``FAST_INTERPRET_PYTEST=<level>`` in the environment has the
same effect as the option.

Every ``pallas_call``/``core_map`` traced during the session runs under the
chosen mode, including calls that pass ``interpret=True`` or no ``interpret``
at all: the mode is set as JAX's global interpret-mode override.
"""

from __future__ import annotations

import os

from fast_interpret import flags
from fast_interpret import modes


def pytest_load_initial_conftests(early_config, parser, args):
  """Turns a bare ``--fast-interpret`` into ``--fast-interpret=checked``.

  With an optional argument argparse would take the next word (a test path)
  as the level, so the level is required and the bare form rewritten here,
  before pytest parses the command line.
  """
  del early_config, parser
  for i, arg in enumerate(args):
    if arg == "--fast-interpret":
      args[i] = "--fast-interpret=checked"


def pytest_addoption(parser):
  group = parser.getgroup("fast_interpret")
  # nargs="?" without choices, so that pytest's early parse of the raw
  # command line accepts the bare form; the hook above rewrites it and
  # pytest_configure checks the level.
  group.addoption(
      "--fast-interpret", action="store", nargs="?", const="checked",
      default=None, metavar="LEVEL",
      help="run every Pallas kernel under fast interpret at LEVEL "
      "(fast, checked or tpu); a bare --fast-interpret means checked")


def _level(config) -> str | None:
  return (config.getoption("--fast-interpret", default=None)
          or os.environ.get("FAST_INTERPRET_PYTEST") or None)


def pytest_configure(config):
  level = _level(config)
  if level is not None and level not in flags.LEVELS:
    raise ValueError(
        f"fast_interpret: --fast-interpret must be one of {flags.LEVELS}, "
        f"got {level!r}.")
  if level is not None:
    modes.set_fast_interpret_mode(modes.params_for_level(level))


def pytest_unconfigure(config):
  if _level(config) is not None:
    modes.set_fast_interpret_mode(None)


def pytest_report_header(config):
  level = _level(config)
  if level is not None:
    return f"fast_interpret: every Pallas kernel runs at fidelity {level!r}"
  return None
