"""pytest setup shared by every test file: simulated CPU devices.

Multi-device tests (tests/multidevice_test.py) need several devices, and JAX
fixes the device count when its backend starts, once per process. pytest runs
all test files in one process, so the count is set here, before any test
module can start the backend. Single-device tests are unaffected: they use
the default device. (Bazel runs each file alone; multidevice_test.py then
sets the count itself.)
"""

import jax

NUM_CPU_DEVICES = 8

try:
  jax.config.update("jax_num_cpu_devices", NUM_CPU_DEVICES)
except RuntimeError:  # The backend already started (e.g. another plugin).
  pass  # multidevice_test.py skips what needs more devices than it got.
