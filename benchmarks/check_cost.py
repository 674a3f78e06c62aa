"""The per-call cost of checks: checked against unchecked, fresh processes.

``python -m benchmarks.check_cost CASE [PAIRS]`` runs the case's kernel
under ``FastInterpretParams()`` (every check on) and under
``FastInterpretParams.unchecked()``, each in its own fresh process, the two
alternating for ``PAIRS`` pairs (default 3). Each process calls its one
compiled program ``CALLS`` times after a warm-up call and reports the
median, as a benchmark run does. The median over processes of each variant
and their ratio are printed.

Why not one process: with both programs alive and called in turn, the
unchecked one ran slower than on its own (0.25-0.35 ms against 0.18-0.24
ms for the DMA kernel), which hides part of the difference. Why not two
benchmark runs: on a shared machine separate runs differ by more than the
checks cost; alternating pairs spreads that noise over both variants.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import subprocess
import sys
import time

CALLS = 400


def _one(name: str, variant: str) -> float:
    """Median per-call ms of one variant, in this process."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    import fast_interpret  # pylint: disable=g-import-not-at-top
    from benchmarks import cases as cases_lib  # pylint: disable=g-import-not-at-top
    from benchmarks import modes as modes_lib  # pylint: disable=g-import-not-at-top
    from benchmarks import worker  # pylint: disable=g-import-not-at-top

    case = cases_lib.get_case(name)
    worker.set_device_count(case)
    args = case.make_args(np.random.default_rng(cases_lib.case_seed(case.name)))
    params = (fast_interpret.FastInterpretParams() if variant == "checked"
              else fast_interpret.FastInterpretParams.unchecked())
    fn = jax.jit(functools.partial(case.kernel, interpret=params))
    context = (modes_lib.forced_interpret(params) if case.force_mode
               else contextlib.nullcontext())
    times = []
    with context:
        jax.block_until_ready(fn(*args))
        for _ in range(CALLS):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(name: str, pairs: int = 3) -> dict[str, list[float]]:
    """Per-process median ms of each variant, ``pairs`` processes each."""
    out: dict[str, list[float]] = {"checked": [], "unchecked": []}
    for _ in range(pairs):
        for variant in out:
            result = subprocess.run(
                [sys.executable, "-m", "benchmarks.check_cost", "--one", name,
                 variant], capture_output=True, text=True, check=True)
            out[variant].append(float(result.stdout.split()[-1]))
    return out


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[0] == "--one":
        print(f"{_one(argv[1], argv[2]):.4f}")
        return
    name = argv[0]
    pairs = int(argv[1]) if len(argv) > 1 else 3
    ms = measure(name, pairs)
    checked, unchecked = (statistics.median(ms[v]) for v in ("checked",
                                                              "unchecked"))
    print(f"{name}: checked {checked:.3f} ms {ms['checked']}, unchecked "
          f"{unchecked:.3f} ms {ms['unchecked']}, ratio "
          f"{checked / unchecked:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
