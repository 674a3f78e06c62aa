"""Tests of the pytest plugin (``-p fast_interpret.pytest_plugin``).

Runs ``tests/plugin_fixture/interpret_true_kernel_fixture.py``, an unmodified
pytest module written for ``interpret=True``, in pytest subprocesses with and
without the plugin, and reads the outcome:

* without the plugin its three tests pass, and memory a kernel never wrote
  reads int32 min (JAX's fill);
* with ``--fast-interpret`` (level checked) or ``FAST_INTERPRET_PYTEST=checked``
  the kernel with a dynamic out-of-bounds read fails with the
  ``fast_interpret: out of bounds`` error, and unwritten memory reads int32
  max (fast interpret's fill): the kernels ran under fast interpret;
* with level ``fast`` everything passes (no checks) yet unwritten memory
  still reads int32 max;
* with level ``tpu`` the out-of-bounds read fails with JAX's own message
  (``pltpu.InterpretParams``), not ours.

The subprocesses run concurrently (two at a time) in ``setUpClass``.

Run:  python -m pytest tests/pytest_plugin_test.py -q
"""

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join("tests", "plugin_fixture",
                       "interpret_true_kernel_fixture.py")
PLUGIN = ("-p", "fast_interpret.pytest_plugin")

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
OUR_OOB = "fast_interpret: out of bounds"
JAX_OOB = "Out-of-bounds read"


@dataclasses.dataclass(frozen=True)
class Run:
  returncode: int
  output: str

  def outcome(self, test_name: str) -> str:
    """'passed' or 'failed' for one fixture test (from the -rA summary)."""
    m = re.search(rf"^(PASSED|FAILED) \S*::{test_name}\b", self.output,
                  re.MULTILINE)
    return m.group(1).lower() if m else "missing"

  @property
  def unwritten_value(self) -> int | None:
    m = re.search(r"UNWRITTEN_VALUE=(-?\d+)", self.output)
    return int(m.group(1)) if m else None


# name: (extra pytest arguments, extra environment). Runs that need only some
# of the fixture's tests select them with -k, to keep this file fast.
K_OOB = ("-k", "clamped_read")
K_OOB_FILL = ("-k", "clamped_read or unwritten_output")
RUNS = {
    "plain": ((FIXTURE,), {}),
    "plugin_without_option": ((*PLUGIN, *K_OOB_FILL, FIXTURE), {}),
    "checked": ((*PLUGIN, "--fast-interpret=checked", FIXTURE), {}),
    "bare_option_after_file": ((*PLUGIN, *K_OOB, FIXTURE, "--fast-interpret"),
                               {}),
    "env_checked": ((*PLUGIN, *K_OOB_FILL, FIXTURE),
                    {"FAST_INTERPRET_PYTEST": "checked"}),
    "fast": ((*PLUGIN, "--fast-interpret=fast", FIXTURE), {}),
    "env_fast": ((*PLUGIN, *K_OOB_FILL, FIXTURE),
                 {"FAST_INTERPRET_PYTEST": "fast"}),
    "option_beats_env": ((*PLUGIN, *K_OOB_FILL, "--fast-interpret=fast",
                          FIXTURE), {"FAST_INTERPRET_PYTEST": "checked"}),
    "tpu": ((*PLUGIN, *K_OOB, "--fast-interpret=tpu", FIXTURE), {}),
    # The repo's default collection, on the fixture's folder.
    "collect_folder": (("--collect-only", "-q",
                        os.path.dirname(FIXTURE)), {}),
    # The usage the plugin's docstring suggests, with a path after it.
    "bare_option_before_file": ((*PLUGIN, *K_OOB, "--fast-interpret",
                                 FIXTURE), {}),
}


def _pytest(args, extra_env) -> Run:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("FAST_INTERPRET_", "PYTEST_"))}
  env.update(extra_env)
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env.setdefault("JAX_PLATFORMS", "cpu")
  # Default verbosity, so that the plugin's report header is printed; -s
  # shows the fixture's prints; -rA lists every outcome. Unrelated plugins
  # are left out for speed.
  cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
         "-p", "no:hypothesispytest", "-p", "no:benchmark", "-s", "-rA",
         *args]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  return Run(proc.returncode, proc.stdout + proc.stderr)


class PytestPluginTest(parameterized.TestCase):

  runs: dict[str, Run] = {}

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
      futures = {name: pool.submit(_pytest, *spec)
                 for name, spec in RUNS.items()}
      cls.runs = {name: f.result() for name, f in futures.items()}

  def _run(self, name) -> Run:
    return self.runs[name]

  def _assert_outcomes(self, run: Run, **expected):
    for test_name, outcome in expected.items():
      self.assertEqual(run.outcome(test_name), outcome,
                       f"{test_name}: {run.output[-4000:]}")

  @parameterized.named_parameters(("plain", "plain"),
                                  ("plugin_without_option",
                                   "plugin_without_option"))
  def test_interpret_true_without_option(self, name):
    run = self._run(name)
    self.assertEqual(run.returncode, 0, run.output[-4000:])
    self._assert_outcomes(run, test_clamped_read="passed",
                          test_unwritten_output="passed")
    if name == "plain":
      self._assert_outcomes(run, test_add_one="passed")
    self.assertEqual(run.unwritten_value, INT32_MIN)
    self.assertNotIn("fast_interpret:", run.output)

  @parameterized.named_parameters(("option", "checked"),
                                  ("bare_option", "bare_option_after_file"),
                                  ("env", "env_checked"))
  def test_checked_level_catches_out_of_bounds_read(self, name):
    run = self._run(name)
    self.assertEqual(run.returncode, 1, run.output[-4000:])
    self._assert_outcomes(run, test_clamped_read="failed")
    self.assertIn(f"{OUR_OOB}: load of", run.output)
    self.assertIn("(kernel '_read_at', grid step 0)", run.output)
    self.assertIn("runs at fidelity 'checked'", run.output)
    if name != "bare_option_after_file":
      self._assert_outcomes(run, test_unwritten_output="passed")
      self.assertEqual(run.unwritten_value, INT32_MAX)
    if name == "checked":
      self._assert_outcomes(run, test_add_one="passed")

  @parameterized.named_parameters(("option", "fast"), ("env", "env_fast"),
                                  ("option_beats_env", "option_beats_env"))
  def test_fast_level_runs_unchecked(self, name):
    run = self._run(name)
    self.assertEqual(run.returncode, 0, run.output[-4000:])
    self._assert_outcomes(run, test_clamped_read="passed",
                          test_unwritten_output="passed")
    if name == "fast":
      self._assert_outcomes(run, test_add_one="passed")
    # Still fast interpret (its fill value), just without checks.
    self.assertEqual(run.unwritten_value, INT32_MAX)
    self.assertNotIn(OUR_OOB, run.output)
    self.assertIn("runs at fidelity 'fast'", run.output)

  def test_tpu_level_uses_jax_tpu_interpret_mode(self):
    run = self._run("tpu")
    self.assertEqual(run.returncode, 1, run.output[-4000:])
    self._assert_outcomes(run, test_clamped_read="failed")
    self.assertIn(JAX_OOB, run.output)
    self.assertNotIn(OUR_OOB, run.output)
    self.assertIn("runs at fidelity 'tpu'", run.output)

  # A bare --fast-interpret followed by a test path runs that path at level
  # checked (the path is not taken as the LEVEL).
  def test_bare_option_before_file(self):
    run = self._run("bare_option_before_file")
    self.assertNotIn("invalid choice", run.output)
    self.assertEqual(run.returncode, 1, run.output[-4000:])
    self._assert_outcomes(run, test_clamped_read="failed")
    self.assertIn(OUR_OOB, run.output)

  def test_fixture_is_not_collected_by_default(self):
    # The repo's default test collection must not pick the fixture up.
    run = self._run("collect_folder")
    self.assertNotIn("interpret_true_kernel_fixture", run.output)
    self.assertIn("no tests collected", run.output)

if __name__ == "__main__":
  absltest.main()
