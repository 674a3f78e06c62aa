"""Measures one (case, mode) pair in the current process.

Run by the runner as ``python -m benchmarks.worker CASE MODE --out FILE`` in
a fresh subprocess, so that the first call really includes tracing and
compilation, and so that a crash or hang cannot take the whole run down.
The result (including any failure) is written to FILE as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import re
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import cases as cases_lib
from benchmarks import modes as modes_lib
from benchmarks.results import RunResult, short_error
from benchmarks.sort_kernel import count_eqns

_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+ = ")


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How many timed calls to make after the first one.

    Calls continue until at least ``repeats`` calls *and* ``min_time_s`` of
    timed work are done, and stop early once ``budget_s`` is spent (at least
    one call is always made) or ``max_calls`` is reached.
    """

    repeats: int = 20
    min_time_s: float = 0.5
    budget_s: float = 10.0
    max_calls: int = 2000


class PhaseError(Exception):
    """An exception tagged with the measurement phase that raised it."""

    def __init__(self, phase: str, cause: BaseException):
        super().__init__(f"{phase}: {cause}")
        self.phase = phase
        self.cause = cause


@contextlib.contextmanager
def _phase(name: str):
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - recorded, not swallowed.
        raise PhaseError(name, exc) from exc


def count_hlo_instructions(hlo_text: str) -> int:
    """Instruction lines (``name = ...``) in an HLO module's text."""
    return sum(1 for line in hlo_text.splitlines() if _HLO_INSTRUCTION.match(line))


def optimized_hlo_instructions(fn: Callable[..., Any], *args) -> int:
    """Instruction count of ``jax.jit(fn)``'s optimised HLO for ``args``."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return count_hlo_instructions(jitted.lower(*args).compile().as_text())


def max_abs_error(got: Any, want: Any) -> float:
    """Max |got - want| over all leaves, compared in float64."""
    errors = [0.0]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        if g.shape != w.shape:
            raise ValueError(f"shape mismatch: {g.shape} vs {w.shape}")
        if g.size:
            errors.append(float(np.max(np.abs(g - w))))
    return max(errors)


def time_calls(fn: Callable[..., Any], args: tuple, cfg: TimingConfig) -> list[float]:
    """Wall times (s) of repeated blocked calls, per ``cfg``."""
    times: list[float] = []
    total = 0.0
    while len(times) < cfg.max_calls:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
        if len(times) >= cfg.repeats and total >= cfg.min_time_s:
            break
        if total >= cfg.budget_s:
            break
    return times


def _build(case: cases_lib.Case, mode: modes_lib.Mode):
    """The jitted function to time and the context to trace it in."""
    if mode.make_interpret is None:
        return jax.jit(case.reference), contextlib.nullcontext()
    interpret = mode.make_interpret()
    fn = jax.jit(functools.partial(case.kernel, interpret=interpret))
    if case.force_mode:
        return fn, modes_lib.forced_interpret(interpret)
    return fn, contextlib.nullcontext()


def _measure(result: RunResult, case: cases_lib.Case, mode: modes_lib.Mode,
             timing: TimingConfig) -> None:
    with _phase("inputs"):
        args = case.make_args(np.random.default_rng(cases_lib.case_seed(case.name)))
        jax.block_until_ready(args)
        jax.block_until_ready(jnp.zeros(()) + 1)  # Initialise the backend.
    with _phase("setup"):
        fn, context = _build(case, mode)
    with context:
        with _phase("first_call"):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            result.first_call_s = time.perf_counter() - start
        with _phase("timing"):
            times = time_calls(fn, args, timing)
            result.n_calls = len(times)
            result.per_call_ms = 1e3 * statistics.median(times)
        _optional(result, "hlo_instructions",
                  lambda: optimized_hlo_instructions(fn, *args))
        _optional(result, "jaxpr_eqns",
                  lambda: count_eqns(jax.make_jaxpr(fn)(*args)))
    with _phase("reference"):
        want = out if mode.make_interpret is None else jax.jit(case.reference)(*args)
        result.max_abs_err = max_abs_error(out, want)


def _optional(result: RunResult, field: str, compute: Callable[[], Any]) -> None:
    try:
        setattr(result, field, compute())
    except Exception as exc:  # noqa: BLE001 - kept as a warning.
        result.warnings.append(f"{field}: {short_error(exc)}")


def set_device_count(case: cases_lib.Case) -> None:
    """Simulates the CPU devices a multi-device case needs (before JAX starts)."""
    if case.num_devices > 1:
        jax.config.update("jax_num_cpu_devices", case.num_devices)


def run(case_name: str, mode_name: str, timing: TimingConfig) -> RunResult:
    """Measures ``case_name`` under ``mode_name``; failures are recorded."""
    result = RunResult(case=case_name, mode=mode_name, status="ok")
    start = time.perf_counter()
    try:
        case = cases_lib.get_case(case_name)
        with _phase("setup"):
            set_device_count(case)
        _measure(result, case, modes_lib.MODES[mode_name], timing)
    except PhaseError as exc:
        result.status, result.phase = "error", exc.phase
        result.error = short_error(exc.cause)
        traceback.print_exception(exc.cause)
    except Exception as exc:  # noqa: BLE001 - e.g. unknown case name.
        result.status, result.phase = "error", "setup"
        result.error = short_error(exc)
        traceback.print_exc()
    result.wall_s = time.perf_counter() - start
    return result


def main() -> None:
    """Entry point of ``python -m benchmarks.worker``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("case")
    parser.add_argument("mode", choices=sorted(modes_lib.MODES))
    parser.add_argument("--out", required=True, help="JSON result file")
    parser.add_argument("--repeats", type=int, default=TimingConfig.repeats)
    parser.add_argument("--min-time", type=float, default=TimingConfig.min_time_s)
    parser.add_argument("--budget", type=float, default=TimingConfig.budget_s)
    args = parser.parse_args()
    timing = TimingConfig(repeats=args.repeats, min_time_s=args.min_time,
                          budget_s=args.budget)
    result = run(args.case, args.mode, timing)
    with open(args.out, "w") as f:
        json.dump(dataclasses.asdict(result), f)


if __name__ == "__main__":
    main()
