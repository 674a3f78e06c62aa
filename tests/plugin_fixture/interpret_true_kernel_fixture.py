"""A plain pytest module written for JAX's ``interpret=True`` mode.

Not collected by the repo's test run (its name does not match ``*_test.py``);
``tests/pytest_plugin_test.py`` runs it in a subprocess, with and without the
fast_interpret pytest plugin. Nothing here knows about fast_interpret.

* ``test_clamped_read``: a kernel whose dynamic read starts past the end of
  its input. ``interpret=True`` clamps the start silently, so the test passes;
  under ``--fast-interpret`` (level checked) the bounds check raises
  ``fast_interpret: out of bounds`` and the test fails; level fast clamps too.
* ``test_unwritten_output``: prints the value of output rows the kernel never
  writes: int32 min under ``interpret=True``, int32 max under fast interpret.
* ``test_add_one``: a correct kernel, which passes in every mode.
"""

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np


def _read_at(s_ref, x_ref, o_ref):
  o_ref[...] = x_ref[pl.ds(s_ref[0], 8), :]


def test_clamped_read():
  x = jnp.arange(16 * 128, dtype=jnp.float32).reshape(16, 128)
  out = pl.pallas_call(
      _read_at, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM),
                pl.BlockSpec(memory_space=pltpu.VMEM)],
      interpret=True)(jnp.array([9], jnp.int32), x)
  np.testing.assert_array_equal(jax.block_until_ready(out), x[8:16])


def _write_first_row(o_ref):
  o_ref[0:1, :] = jnp.zeros((1, 128), jnp.int32)


def test_unwritten_output():
  out = pl.pallas_call(
      _write_first_row, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.int32),
      interpret=True)()
  out = np.asarray(out)
  np.testing.assert_array_equal(out[0], 0)
  print(f"UNWRITTEN_VALUE={int(out[1, 0])}")


def _add_one(x_ref, o_ref):
  o_ref[...] = x_ref[...] + 1.0


def test_add_one():
  x = jnp.ones((16, 128), jnp.float32)
  out = pl.pallas_call(
      _add_one, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(2,),
      in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
      interpret=True)(x)
  np.testing.assert_array_equal(out, 2.0)
