"""Shared helpers for the fast_interpret kernel acceptance tests.

Modes
-----
Every acceptance test runs a Pallas TPU kernel from
``jax.experimental.pallas.ops.tpu`` on CPU under one *interpret mode* and
compares it with a plain-``jnp``/NumPy reference written in the test:

* ``fast`` (default): ``fast_interpret.FastInterpretParams()``, via
  ``fast_interpret.force_fast_interpret_mode()``.
* ``hlo``: JAX's HLO interpreter (``interpret=True``).
* ``tpu``: JAX's TPU interpret mode (``pltpu.InterpretParams()``); very slow.

Select the mode with the environment variable ``FAST_INTERPRET_TEST_MODE``
(``fast`` | ``hlo`` | ``tpu``). Running with ``FAST_INTERPRET_TEST_MODE=hlo``
validates the references against JAX's own interpreter and does not import
``fast_interpret`` at all (the import is lazy, inside ``interpret_mode``).

Slow tests
----------
Larger shapes are decorated with ``@slow`` and are skipped unless
``FAST_INTERPRET_SLOW_TESTS=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

from absl.testing import parameterized
import chex
import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np

MODE_ENV = "FAST_INTERPRET_TEST_MODE"
SLOW_ENV = "FAST_INTERPRET_SLOW_TESTS"
MODES = ("fast", "hlo", "tpu")

# Tolerances (rtol, atol) by dtype of the compared output. `atol` is relative
# to the output's scale: assert_allclose uses atol * max(1, max|expected|), so
# an element near zero in an output whose other elements are O(10) (a sum of
# many products) is allowed the rounding error of that scale, not of itself.
F32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def selected_mode() -> str:
  """The interpret mode selected by $FAST_INTERPRET_TEST_MODE (default fast)."""
  mode = os.environ.get(MODE_ENV, "fast").strip().lower() or "fast"
  if mode not in MODES:
    raise ValueError(f"${MODE_ENV}={mode!r}; expected one of {MODES}")
  return mode


def slow_tests_enabled() -> bool:
  return os.environ.get(SLOW_ENV, "0").strip().lower() in ("1", "true", "yes")


def slow(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Marks a test as slow: skipped unless $FAST_INTERPRET_SLOW_TESTS=1.

  Apply below @parameterized.named_parameters (closest to the function).
  """

  @functools.wraps(fn)
  def wrapper(self, *args, **kwargs):
    if not slow_tests_enabled():
      self.skipTest(f"slow test; set {SLOW_ENV}=1 to run it")
    return fn(self, *args, **kwargs)

  return wrapper


@contextlib.contextmanager
def interpret_mode(mode: str | None = None, num_cores: int = 1):
  """Forces every pallas_call traced inside to run under `mode`.

  `num_cores` is the number of simulated TensorCores for the fast mode
  (megacore kernels need 2, as on a megacore chip).
  """
  mode = selected_mode() if mode is None else mode
  if mode == "fast":
    # Lazy on purpose: hlo/tpu modes must work even if the package is broken.
    import fast_interpret  # pylint: disable=g-import-not-at-top

    ctx = fast_interpret.force_fast_interpret_mode(
        fast_interpret.FastInterpretParams(num_cores_or_threads=num_cores))
  elif mode == "hlo":
    # `interpret=True` is JAX's HLO interpreter; the TPU context manager just
    # stores the value and pallas_call uses `value or interpret`.
    ctx = pltpu.force_tpu_interpret_mode(True)  # type: ignore[arg-type]
  elif mode == "tpu":
    ctx = pltpu.force_tpu_interpret_mode(pltpu.InterpretParams())
  else:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  with ctx:
    yield


def run_in_mode(fn: Callable[[], Any], mode: str | None = None,
                num_cores: int = 1) -> Any:
  """Traces and runs `fn()` with all its pallas_calls forced into `mode`.

  `fn` takes no arguments (close over the inputs). The result is blocked on
  inside the context, so runtime errors surface here.
  """
  with interpret_mode(mode, num_cores):
    out = fn()
    out = jax.block_until_ready(out)
  return out


# ---------------------------------------------------------------------------
# Inputs.


def rng(seed: int) -> np.random.Generator:
  return np.random.default_rng(seed)


def normal(r: np.random.Generator, shape, dtype=jnp.float32, scale=1.0):
  """Normal random array, generated on the host, as a jax array of `dtype`."""
  x = (r.standard_normal(shape) * scale).astype(np.float32)
  return jnp.asarray(x, dtype=dtype)


def to_f64(x) -> np.ndarray:
  """Host copy in float64 (the exact value of a bf16/f32 array)."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def round_to(x: np.ndarray, dtype) -> np.ndarray:
  """Rounds a host array to `dtype` and back to float64."""
  return to_f64(jnp.asarray(np.asarray(x, np.float32), dtype=dtype))


# ---------------------------------------------------------------------------
# Comparisons.


def tol_for(dtype) -> dict[str, float]:
  return dict(BF16_TOL) if jnp.dtype(dtype) == jnp.bfloat16 else dict(F32_TOL)


def assert_allclose(actual, expected, *, rtol, atol, err_msg=""):
  """assert_allclose with atol scaled by max(1, max|expected|); no NaN/inf."""
  actual = to_f64(actual) if not isinstance(actual, np.ndarray) else actual
  expected = np.asarray(expected, dtype=np.float64)
  actual = np.asarray(actual, dtype=np.float64)
  if actual.shape != expected.shape:
    raise AssertionError(
        f"shape mismatch: actual {actual.shape} vs expected {expected.shape}"
        f" {err_msg}"
    )
  if not np.all(np.isfinite(actual)):
    bad = np.argwhere(~np.isfinite(actual))[:5].tolist()
    raise AssertionError(f"non-finite values at {bad} {err_msg}")
  finite = expected[np.isfinite(expected)]
  scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
  np.testing.assert_allclose(
      actual, expected, rtol=rtol, atol=atol * scale, err_msg=err_msg
  )


class KernelTestCase(chex.TestCase, parameterized.TestCase):
  """Base class: knows the mode, resets global interpreter state after tests."""

  def setUp(self):
    super().setUp()
    self.mode = selected_mode()

  def tearDown(self):
    if self.mode == "tpu":
      # TPU interpret mode keeps global state that must be reset after errors.
      pltpu.reset_tpu_interpret_mode_state()
    super().tearDown()

  def run_kernel(self, fn: Callable[[], Any],
                 known_failures: dict[str, str] | None = None,
                 num_cores: int = 1) -> Any:
    """run_in_mode(fn, self.mode).

    known_failures maps a mode to a substring of "ExceptionType: message" of a
    known failure of JAX's own interpreter in that mode: a matching error
    skips the test (with the message); any other error still fails it. Never
    list the "fast" mode here.
    """
    assert not known_failures or "fast" not in known_failures
    try:
      return run_in_mode(fn, self.mode, num_cores)
    except Exception as e:  # pylint: disable=broad-except
      known = (known_failures or {}).get(self.mode)
      if known is not None and known in f"{type(e).__name__}: {e}":
        self.skipTest(f"known JAX {self.mode}-mode failure ({known})")
      raise

  def assert_close(self, actual, expected, *, dtype=None, rtol=None,
                   atol=None, err_msg=""):
    tol = tol_for(dtype if dtype is not None else jnp.asarray(actual).dtype)
    if rtol is not None:
      tol["rtol"] = rtol
    if atol is not None:
      tol["atol"] = atol
    assert_allclose(actual, expected, err_msg=err_msg, **tol)
