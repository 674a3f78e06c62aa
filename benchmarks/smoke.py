"""CI-sized guard on the compile cost of fast interpret.

Compiles the (8,128) bitonic sort under ``fast_interpret`` and counts the
instructions of the optimised HLO (a noise-free proxy for compile time),
checks the output against ``jnp``, and compares the count with the budget
stored in ``benchmarks/hlo_budget.json``. Only a large regression (more than
``tolerance`` times the budget) fails. A budget of ``null`` means "not set
yet": the count is reported and the check passes; ``--update`` stores it.

    python -m benchmarks.smoke [--update]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

BUDGET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "hlo_budget.json")
BUDGET_KEY = "sort_8x128_fast_hlo_instructions"
TOLERANCE_KEY = "tolerance"
DEFAULT_TOLERANCE = 1.5


@dataclasses.dataclass(frozen=True)
class SmokeResult:
    """Outcome of the HLO budget check."""

    hlo_instructions: int
    budget: int | None
    tolerance: float
    correct: bool
    compile_s: float

    @property
    def limit(self) -> float | None:
        return None if self.budget is None else self.budget * self.tolerance

    @property
    def passed(self) -> bool:
        return self.correct and (self.limit is None or self.hlo_instructions <= self.limit)

    def summary(self) -> str:
        """A human-readable verdict."""
        head = (f"sort (8,128) under fast interpret: {self.hlo_instructions} "
                f"optimised-HLO instructions, compiled in {self.compile_s:.2f} s, "
                f"output {'matches' if self.correct else 'DOES NOT MATCH'} jnp")
        if self.budget is None:
            return (f"{head}\nno budget stored under {BUDGET_KEY!r} in "
                    f"{BUDGET_PATH}; run with --update to store this count")
        verdict = "OK" if self.passed else "REGRESSION"
        return (f"{head}\nbudget {self.budget}, limit {self.limit:.0f} "
                f"(x{self.tolerance:g}): {verdict}")


def load_budget(path: str = BUDGET_PATH) -> tuple[int | None, float]:
    """(budget or None, tolerance) from the budget file."""
    with open(path) as f:
        data = json.load(f)
    return data.get(BUDGET_KEY), float(data.get(TOLERANCE_KEY, DEFAULT_TOLERANCE))


def store_budget(count: int, path: str = BUDGET_PATH) -> None:
    """Writes ``count`` as the new budget, keeping the other keys."""
    with open(path) as f:
        data = json.load(f)
    data[BUDGET_KEY] = count
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def measure_sort_hlo() -> tuple[int, bool, float]:
    """(HLO instruction count, output correct, compile seconds) of the
    (8,128) sort under ``fast_interpret.FastInterpretParams()``.

    Raises ImportError if ``fast_interpret`` cannot be imported.
    """
    import fast_interpret
    import jax

    from benchmarks import sort_kernel
    from benchmarks.worker import count_hlo_instructions

    x = sort_kernel._random_input(128)
    params = fast_interpret.FastInterpretParams()
    fn = jax.jit(lambda a: sort_kernel.bitonic_sort(a, interpret=params))
    start = time.perf_counter()
    compiled = fn.lower(x).compile()
    compile_s = time.perf_counter() - start
    got = jax.block_until_ready(compiled(x))
    correct = sort_kernel.bitwise_equal(got, sort_kernel.reference_sort(x))
    return count_hlo_instructions(compiled.as_text()), correct, compile_s


def check_hlo_budget(path: str = BUDGET_PATH) -> SmokeResult:
    """Measures the sort and compares it with the stored budget."""
    budget, tolerance = load_budget(path)
    count, correct, compile_s = measure_sort_hlo()
    return SmokeResult(hlo_instructions=count, budget=budget, tolerance=tolerance,
                       correct=correct, compile_s=compile_s)


def main(argv=None) -> int:
    """Entry point of ``python -m benchmarks.smoke``; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", action="store_true",
                        help="store the measured count as the new budget")
    parser.add_argument("--budget-file", default=BUDGET_PATH)
    args = parser.parse_args(argv)
    result = check_hlo_budget(args.budget_file)
    print(result.summary())
    if args.update:
        if not result.correct:
            print("not storing a budget for an incorrect result", file=sys.stderr)
            return 1
        store_budget(result.hlo_instructions, args.budget_file)
        print(f"stored {result.hlo_instructions} in {args.budget_file}")
        return 0
    if not result.passed:
        print(f"FAILED: {result.summary()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
