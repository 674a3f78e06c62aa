"""The main job: a real Pallas TPU kernel under fast interpret and JAX's modes.

Runs ``flash_attention`` (forward, causal) from ``jax.experimental.pallas.ops.tpu``
under ``FastInterpretParams()`` (checks on, the default, and off),
``interpret=True`` and ``pltpu.InterpretParams()``
and prints, for each, the first-call time (trace + compile + run), the median
per-call time and the max error against a plain jnp reference.

  python examples/compare_modes.py [--seq 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import flash_attention as fa

import fast_interpret


def reference(q, k, v):
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
  n = q.shape[2]
  s = jnp.where(jnp.tril(jnp.ones((n, n), bool)), s, -jnp.inf)
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(s, axis=-1), v)


def time_mode(name, interpret, args, repeats):
  with pltpu.force_tpu_interpret_mode(interpret):
    fn = jax.jit(lambda q, k, v: fa.flash_attention(q, k, v, causal=True))
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - start)
  err = float(jnp.max(jnp.abs(out - reference(*args))))
  return name, first, statistics.median(times), err


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-tpu-mode", action="store_true",
                      help="skip pltpu.InterpretParams() (the slowest mode)")
  opts = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  args = [jax.random.normal(k, (1, 2, opts.seq, 128), jnp.float32)
          for k in keys]
  modes = [("fast_interpret", fast_interpret.FastInterpretParams()),
           ("fast_interpret, checks off",
            fast_interpret.FastInterpretParams.unchecked()),
           ("interpret=True", True)]
  if not opts.skip_tpu_mode:
    modes.append(("pltpu.InterpretParams()", pltpu.InterpretParams()))
  print(f"flash_attention fwd, causal, (1, 2, {opts.seq}, 128) f32, "
        f"{jax.devices()[0].platform}")
  print(f"{'mode':<30}{'first call (s)':>16}{'per call (ms)':>16}"
        f"{'max err':>12}")
  rows = [time_mode(name, mode, args, opts.repeats) for name, mode in modes]
  for name, first, per_call, err in rows:
    print(f"{name:<30}{first:>16.2f}{per_call * 1e3:>16.2f}{err:>12.2e}")
  fast = rows[0]
  for name, first, per_call, _ in rows[2:]:
    print(f"fast_interpret vs {name}: {per_call / fast[2]:.1f}x faster per "
          f"call, {first / fast[1]:.1f}x faster first call")


if __name__ == "__main__":
  main()
