"""Tests of the fidelity dial: absl flags and environment variables.

Every fidelity field of ``FastInterpretParams`` takes its default from (in
order) the flag ``--fast_interpret_<field>`` when given, the environment
variable ``FAST_INTERPRET_<FIELD>``, the preset of ``--fast_interpret_fidelity``
/ ``FAST_INTERPRET_FIDELITY``, and the built-in default; explicit arguments
always win.

Flags count as *given* when absl marks them present (parsed from a command
line): ``flagsaver.as_parsed`` does that; ``flagsaver.flagsaver(name=value)``
sets only the value, so the tests using it mark the flag present by hand.
Every test starts from a clean slate (no flag present, no FAST_INTERPRET_*
variable) and leaves none behind.

Run:  python -m pytest tests/flags_test.py -q
"""

import os
import subprocess
import sys
from unittest import mock

from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
from absl.testing import parameterized
import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

import fast_interpret

FI = fast_interpret.FastInterpretParams
FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _all_flag_names():
  return [name for name in FLAGS if name.startswith("fast_interpret_")]


def _env_keys():
  return [k for k in os.environ if k.startswith("FAST_INTERPRET_")]


def _state():
  """Everything the tests may touch: flag values/presence and env vars."""
  flag_state = {n: (FLAGS[n].value, FLAGS[n].present)
                for n in _all_flag_names()}
  env_state = {k: os.environ[k] for k in _env_keys()}
  return flag_state, env_state


class FidelityDialTestBase(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    before = _state()
    # Cleanups run last-in first-out: this check runs after the contexts
    # below are closed, and proves nothing leaked.
    self.addCleanup(lambda: self.assertEqual(_state(), before))
    # Restore every flag and variable afterwards, whatever the test does.
    self.enter_context(flagsaver.flagsaver())
    self.enter_context(mock.patch.dict(os.environ))
    for key in _env_keys():
      del os.environ[key]
    for name in _all_flag_names():
      FLAGS[name].value = None
      FLAGS[name].present = 0


class FlagsTest(FidelityDialTestBase):

  def test_builtin_defaults(self):
    p = FI()
    self.assertEqual(p.out_of_bounds_reads, "raise")
    self.assertEqual(p.uninitialized_memory, "nan")
    self.assertTrue(p.check_semaphores)
    self.assertEqual(p.num_cores_or_threads, 1)
    self.assertTrue(p.checks_enabled)
    self.assertEqual(fast_interpret.flags.fidelity_level(), "checked")

  @parameterized.named_parameters(
      ("out_of_bounds_reads", "out_of_bounds_reads", "uninitialized",
       "uninitialized"),
      ("uninitialized_memory", "uninitialized_memory", "zero", "zero"),
      ("check_semaphores", "check_semaphores", "false", False),
      ("num_cores_or_threads", "num_cores_or_threads", "2", 2),
  )
  def test_flag_as_parsed(self, field, text, value):
    with flagsaver.as_parsed(**{f"fast_interpret_{field}": text}):
      self.assertTrue(FLAGS[f"fast_interpret_{field}"].present)
      self.assertEqual(getattr(FI(), field), value)
    # Restored on exit.
    self.assertFalse(FLAGS[f"fast_interpret_{field}"].present)
    self.assertNotEqual(getattr(FI(), field), value)

  @parameterized.named_parameters(
      ("out_of_bounds_reads", "out_of_bounds_reads", "uninitialized"),
      ("uninitialized_memory", "uninitialized_memory", "zero"),
      ("check_semaphores", "check_semaphores", False),
      ("num_cores_or_threads", "num_cores_or_threads", 2),
  )
  def test_flagsaver_value_with_present_marked(self, field, value):
    name = f"fast_interpret_{field}"
    with flagsaver.flagsaver(**{name: value}):
      # flagsaver(name=value) sets the value but does not mark the flag as
      # given on the command line; the dial reads only given flags.
      FLAGS[name].present = 1
      self.assertEqual(getattr(FI(), field), value)
    self.assertFalse(FLAGS[name].present)
    self.assertIsNone(FLAGS[name].value)

  @parameterized.named_parameters(
      ("out_of_bounds_reads", "out_of_bounds_reads", "uninitialized",
       "raise"),
      ("uninitialized_memory", "uninitialized_memory", "zero", "nan"),
      ("check_semaphores", "check_semaphores", "false", True),
      ("num_cores_or_threads", "num_cores_or_threads", "2", 1),
  )
  def test_explicit_argument_beats_flag(self, field, text, explicit):
    with flagsaver.as_parsed(**{f"fast_interpret_{field}": text}):
      self.assertEqual(getattr(FI(**{field: explicit}), field), explicit)

  @parameterized.named_parameters(
      ("fast", "fast", "clamp", False),
      ("checked", "checked", "raise", True),
      ("tpu", "tpu", "raise", True),
  )
  def test_fidelity_flag(self, level, bounds, semaphores):
    with flagsaver.as_parsed(fast_interpret_fidelity=level):
      self.assertEqual(fast_interpret.flags.fidelity_level(), level)
      p = FI()
      self.assertEqual(p.out_of_bounds_reads, bounds)
      self.assertEqual(p.check_semaphores, semaphores)
      # Fields without a preset keep their built-in default.
      self.assertEqual(p.uninitialized_memory, "nan")
      self.assertEqual(p.num_cores_or_threads, 1)
      self.assertEqual(p.checks_enabled, level != "fast")

  def test_field_flag_beats_fidelity_preset(self):
    with flagsaver.as_parsed(fast_interpret_fidelity="fast",
                             fast_interpret_check_semaphores="true"):
      p = FI()
      self.assertTrue(p.check_semaphores)
      self.assertEqual(p.out_of_bounds_reads, "clamp")

  def test_explicit_argument_beats_fidelity_preset(self):
    with flagsaver.as_parsed(fast_interpret_fidelity="fast"):
      self.assertEqual(FI(out_of_bounds_reads="raise").out_of_bounds_reads,
                       "raise")

  def test_unchecked_beats_flags(self):
    with flagsaver.as_parsed(fast_interpret_fidelity="checked",
                             fast_interpret_check_semaphores="true",
                             fast_interpret_out_of_bounds_reads="raise"):
      p = FI.unchecked()
      self.assertFalse(p.check_semaphores)
      self.assertEqual(p.out_of_bounds_reads, "clamp")
      self.assertFalse(p.checks_enabled)

  def test_params_for_level(self):
    tpu = fast_interpret.params_for_level("tpu")
    self.assertIsInstance(tpu, pltpu.InterpretParams)
    self.assertNotIsInstance(tpu, FI)
    fast = fast_interpret.params_for_level("fast")
    self.assertIsInstance(fast, FI)
    self.assertFalse(fast.checks_enabled)
    checked = fast_interpret.params_for_level("checked")
    self.assertIsInstance(checked, FI)
    self.assertEqual(checked.out_of_bounds_reads, "raise")
    self.assertTrue(checked.check_semaphores)
    with self.assertRaises(ValueError):
      fast_interpret.params_for_level("bogus")

  def test_params_for_level_follows_fidelity_flag(self):
    with flagsaver.as_parsed(fast_interpret_fidelity="tpu"):
      self.assertNotIsInstance(fast_interpret.params_for_level(), FI)
      with fast_interpret.force_fast_interpret_mode() as params:
        self.assertIsInstance(params, pltpu.InterpretParams)
        self.assertNotIsInstance(params, FI)
    with flagsaver.as_parsed(fast_interpret_fidelity="fast"):
      params = fast_interpret.params_for_level()
      self.assertIsInstance(params, FI)
      self.assertFalse(params.checks_enabled)
    self.assertIsInstance(fast_interpret.params_for_level(), FI)
    self.assertTrue(fast_interpret.params_for_level().checks_enabled)

  def test_fidelity_flag_reaches_the_kernel(self):
    # Level fast: the lowered program has no host callback; checked: it has.
    def kernel(s_ref, x_ref, o_ref):
      o_ref[...] = x_ref[pl.ds(s_ref[0], 8), :]

    def lowered_text():
      f = pl.pallas_call(
          kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
          in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                    pl.BlockSpec(memory_space=pltpu.VMEM)],
          interpret=FI())
      return jax.jit(f).lower(jnp.zeros((1,), jnp.int32),
                              jnp.zeros((16, 128), jnp.float32)).as_text()

    with flagsaver.as_parsed(fast_interpret_fidelity="fast"):
      self.assertNotIn("callback", lowered_text())
    with flagsaver.as_parsed(fast_interpret_fidelity="checked"):
      self.assertIn("callback", lowered_text())


class EnvironmentTest(FidelityDialTestBase):

  @parameterized.named_parameters(
      ("out_of_bounds_reads", "OUT_OF_BOUNDS_READS", "uninitialized",
       "out_of_bounds_reads", "uninitialized"),
      ("uninitialized_memory", "UNINITIALIZED_MEMORY", "zero",
       "uninitialized_memory", "zero"),
      ("check_semaphores_0", "CHECK_SEMAPHORES", "0", "check_semaphores",
       False),
      ("check_semaphores_false", "CHECK_SEMAPHORES", "False",
       "check_semaphores", False),
      ("check_semaphores_off", "CHECK_SEMAPHORES", "off", "check_semaphores",
       False),
      ("check_semaphores_yes", "CHECK_SEMAPHORES", "yes", "check_semaphores",
       True),
      ("num_cores_or_threads", "NUM_CORES_OR_THREADS", "2",
       "num_cores_or_threads", 2),
  )
  def test_field_env(self, key, text, field, value):
    with mock.patch.dict(os.environ, {f"FAST_INTERPRET_{key}": text}):
      self.assertEqual(getattr(FI(), field), value)
    self.assertNotIn(f"FAST_INTERPRET_{key}", os.environ)

  @parameterized.named_parameters(
      ("fast", "fast", "clamp", False),
      ("fast_mixed_case", " Fast ", "clamp", False),
      ("checked", "checked", "raise", True),
      ("tpu", "tpu", "raise", True),
  )
  def test_fidelity_env(self, text, bounds, semaphores):
    with mock.patch.dict(os.environ, {"FAST_INTERPRET_FIDELITY": text}):
      p = FI()
      self.assertEqual(p.out_of_bounds_reads, bounds)
      self.assertEqual(p.check_semaphores, semaphores)
      self.assertEqual(fast_interpret.flags.fidelity_level(),
                       text.strip().lower())

  def test_fidelity_env_tpu_gives_pltpu_params(self):
    with mock.patch.dict(os.environ, {"FAST_INTERPRET_FIDELITY": "tpu"}):
      params = fast_interpret.params_for_level()
      self.assertIsInstance(params, pltpu.InterpretParams)
      self.assertNotIsInstance(params, FI)

  def test_field_env_beats_fidelity_env(self):
    with mock.patch.dict(os.environ, {"FAST_INTERPRET_FIDELITY": "fast",
                                      "FAST_INTERPRET_CHECK_SEMAPHORES": "1"}):
      p = FI()
      self.assertTrue(p.check_semaphores)
      self.assertEqual(p.out_of_bounds_reads, "clamp")

  def test_field_env_beats_fidelity_flag(self):
    with mock.patch.dict(os.environ, {"FAST_INTERPRET_CHECK_SEMAPHORES": "1"}):
      with flagsaver.as_parsed(fast_interpret_fidelity="fast"):
        self.assertTrue(FI().check_semaphores)

  def test_explicit_argument_beats_env(self):
    with mock.patch.dict(os.environ, {
        "FAST_INTERPRET_FIDELITY": "fast",
        "FAST_INTERPRET_UNINITIALIZED_MEMORY": "zero"}):
      p = FI(out_of_bounds_reads="raise", uninitialized_memory="nan")
      self.assertEqual(p.out_of_bounds_reads, "raise")
      self.assertEqual(p.uninitialized_memory, "nan")

  @parameterized.named_parameters(
      ("field_flag", {"FAST_INTERPRET_OUT_OF_BOUNDS_READS": "uninitialized"},
       {"fast_interpret_out_of_bounds_reads": "raise"},
       "out_of_bounds_reads", "raise"),
      ("field_flag_bool", {"FAST_INTERPRET_CHECK_SEMAPHORES": "false"},
       {"fast_interpret_check_semaphores": "true"}, "check_semaphores", True),
      ("field_flag_int", {"FAST_INTERPRET_NUM_CORES_OR_THREADS": "4"},
       {"fast_interpret_num_cores_or_threads": "2"}, "num_cores_or_threads",
       2),
      ("fidelity_flag", {"FAST_INTERPRET_FIDELITY": "fast"},
       {"fast_interpret_fidelity": "checked"}, "out_of_bounds_reads",
       "raise"),
  )
  def test_flag_beats_env(self, env, flag_values, field, value):
    with mock.patch.dict(os.environ, env):
      with flagsaver.as_parsed(**flag_values):
        self.assertEqual(getattr(FI(), field), value)

  @parameterized.named_parameters(
      ("fidelity", "FAST_INTERPRET_FIDELITY", "bogus"),
      ("check_semaphores", "FAST_INTERPRET_CHECK_SEMAPHORES", "maybe"),
      ("num_cores_or_threads", "FAST_INTERPRET_NUM_CORES_OR_THREADS", "two"),
      ("out_of_bounds_reads", "FAST_INTERPRET_OUT_OF_BOUNDS_READS", "bogus"),
      ("uninitialized_memory", "FAST_INTERPRET_UNINITIALIZED_MEMORY", "ones"),
  )
  def test_invalid_env_raises_value_error(self, key, text):
    with mock.patch.dict(os.environ, {key: text}):
      with self.assertRaises(ValueError):
        FI()
    # Nothing left behind: the next params build fine.
    self.assertEqual(FI().out_of_bounds_reads, "raise")

  def test_invalid_fidelity_env_ignored_when_flag_given(self):
    with mock.patch.dict(os.environ, {"FAST_INTERPRET_FIDELITY": "bogus"}):
      with flagsaver.as_parsed(fast_interpret_fidelity="fast"):
        self.assertEqual(FI().out_of_bounds_reads, "clamp")


class ProcessTest(absltest.TestCase):
  """Fresh interpreters: flags read before (or without) absl parsing argv."""

  def _run(self, code, *argv, env=None):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("FAST_INTERPRET_")}
    clean.update(env or {})
    clean["PYTHONPATH"] = os.pathsep.join(
        [REPO] + ([clean["PYTHONPATH"]] if clean.get("PYTHONPATH") else []))
    clean.setdefault("JAX_PLATFORMS", "cpu")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO,
                          env=clean, capture_output=True, text=True,
                          timeout=120, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    return proc.stdout

  def test_params_before_absl_parses_argv(self):
    out = self._run("import fast_interpret; "
                    "print(fast_interpret.FastInterpretParams())")
    self.assertIn("FastInterpretParams(", out)
    self.assertIn("out_of_bounds_reads='raise'", out)
    self.assertIn("check_semaphores=True", out)

  def test_env_in_fresh_process(self):
    out = self._run("import fast_interpret; "
                    "print(fast_interpret.FastInterpretParams())",
                    env={"FAST_INTERPRET_FIDELITY": "fast",
                         "FAST_INTERPRET_UNINITIALIZED_MEMORY": "zero"})
    self.assertIn("out_of_bounds_reads='clamp'", out)
    self.assertIn("check_semaphores=False", out)
    self.assertIn("uninitialized_memory='zero'", out)

  def test_command_line_flags_beat_env(self):
    code = ("import fast_interpret\n"
            "from absl import app\n"
            "def main(argv):\n"
            "  print(fast_interpret.FastInterpretParams())\n"
            "  print(type(fast_interpret.params_for_level()).__name__)\n"
            "app.run(main)\n")
    out = self._run(code, "--fast_interpret_fidelity=fast",
                    "--fast_interpret_uninitialized_memory=nan",
                    env={"FAST_INTERPRET_FIDELITY": "checked",
                         "FAST_INTERPRET_UNINITIALIZED_MEMORY": "zero"})
    self.assertIn("out_of_bounds_reads='clamp'", out)
    self.assertIn("uninitialized_memory='nan'", out)
    self.assertIn("\nFastInterpretParams\n", out)


if __name__ == "__main__":
  absltest.main()
