"""Runs every (case, mode) pair in a fresh subprocess and reports.

``python -m benchmarks [--cases GLOB ...] [--modes MODE ...] [--json F]
[--png F] [--quick] ...``; see ``--help``. Each pair runs in its own
``python -m benchmarks.worker`` process (so first-call times include all
tracing and compilation, and a crash or hang is contained); a process that
fails or times out is recorded as such and the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from benchmarks import cases as cases_lib
from benchmarks import report
from benchmarks.results import (RunResult, environment, load_results,
                                merge_results, save_report)
from benchmarks.worker import TimingConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings shared by every subprocess of a run."""

    timeout_s: float
    timing: TimingConfig


@dataclasses.dataclass(frozen=True)
class Job:
    """One (case, mode) pair; ``skip_reason`` set when it will not run."""

    case: cases_lib.Case
    mode: str
    skip_reason: str | None = None


def plan_jobs(cases: Sequence[cases_lib.Case], modes: Sequence[str],
              skip_slow: bool) -> list[Job]:
    """Every (case, mode) pair, marking slow pairs skipped if asked."""
    jobs = []
    for case in cases:
        for mode in modes:
            reason = None
            if skip_slow and mode in case.slow_modes:
                reason = "slow mode skipped (--skip-slow-modes)"
            jobs.append(Job(case=case, mode=mode, skip_reason=reason))
    return jobs


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _worker_command(job: Job, out_path: str, timing: TimingConfig) -> list[str]:
    return [sys.executable, "-m", "benchmarks.worker", job.case.name, job.mode,
            "--out", out_path, "--repeats", str(timing.repeats),
            "--min-time", str(timing.min_time_s), "--budget", str(timing.budget_s)]


def _stderr_summary(stderr: str, limit: int = 300) -> str:
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else "no output"
    return text[:limit]


def run_job(job: Job, options: RunOptions) -> RunResult:
    """Runs one job in a fresh subprocess and returns what it recorded."""
    if job.skip_reason:
        return RunResult(case=job.case.name, mode=job.mode, status="skipped",
                         error=job.skip_reason)
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        out_path = os.path.join(tmp, "result.json")
        start = time.perf_counter()
        proc = subprocess.Popen(
            _worker_command(job, out_path, options.timing), cwd=REPO_ROOT,
            env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=options.timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return RunResult(
                case=job.case.name, mode=job.mode, status="timeout",
                error=f"no result within --timeout {options.timeout_s:g} s",
                wall_s=time.perf_counter() - start)
        wall = time.perf_counter() - start
        if os.path.exists(out_path):
            with open(out_path) as f:
                result = RunResult.from_dict(json.load(f))
            result.wall_s = wall
            return result
        return RunResult(
            case=job.case.name, mode=job.mode, status="error", phase="process",
            error=f"exit code {proc.returncode}: {_stderr_summary(stderr)}",
            wall_s=wall)


def describe(result: RunResult) -> str:
    """A one-line progress summary of a result."""
    if result.status == "skipped":
        return f"skipped ({result.error})"
    if not result.ok:
        where = f" in {result.phase}" if result.phase else ""
        return f"{result.status.upper()}{where}: {result.error}"
    parts = [f"first {result.first_call_s:.2f} s",
             f"per-call {report._sig(result.per_call_ms)} ms (n={result.n_calls})",
             f"err {report._num(result.max_abs_err, '.1e')}",
             f"HLO {report._num(result.hlo_instructions, 'd')}"]
    text = "ok  " + ", ".join(parts)
    if result.warnings:
        text += f"  [warnings: {'; '.join(result.warnings)}]"
    return text


def run_all(jobs: Sequence[Job], options: RunOptions) -> list[RunResult]:
    """Runs jobs one after the other, printing a line per job."""
    results = []
    for index, job in enumerate(jobs, start=1):
        label = f"[{index}/{len(jobs)}] {job.case.name} / {job.mode}"
        if not job.skip_reason:
            print(f"{label} ...", flush=True)
        result = run_job(job, options)
        wall = f"  [{result.wall_s:.1f} s]" if result.wall_s else ""
        print(f"{label}: {describe(result)}{wall}", flush=True)
        results.append(result)
    return results


def _parse_list(values: Sequence[str] | None) -> list[str]:
    return [v for item in values or () for v in item.split(",") if v]


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="*", help="case names, globs or families "
                   "(space or comma separated); default: all")
    p.add_argument("--modes", nargs="*", help=f"subset of {cases_lib.ALL_MODES}")
    p.add_argument("--skip-slow-modes", action="store_true",
                   help="skip the (case, mode) pairs a case marks as slow")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds per subprocess (default 900)")
    p.add_argument("--repeats", type=int, default=TimingConfig.repeats,
                   help="target number of timed calls (default %(default)s)")
    p.add_argument("--budget", type=float, default=TimingConfig.budget_s,
                   help="max seconds of timed calls per run (default %(default)s)")
    p.add_argument("--min-time", type=float, default=TimingConfig.min_time_s,
                   help="min seconds of timed calls per run (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="3 repeats, 2 s budget, "
                   "300 s timeout, slow modes skipped")
    p.add_argument("--json", help="write results to this JSON file")
    p.add_argument("--png", help="draw a chart to this PNG file")
    p.add_argument("--load", nargs="+", metavar="JSON",
                   help="do not run: merge these result files and report them")
    p.add_argument("--list", action="store_true", help="list cases and exit")
    return p


def _options(args: argparse.Namespace) -> RunOptions:
    if args.quick:
        args.skip_slow_modes = True
        return RunOptions(timeout_s=min(args.timeout, 300.0), timing=TimingConfig(
            repeats=3, min_time_s=0.05, budget_s=2.0))
    return RunOptions(timeout_s=args.timeout, timing=TimingConfig(
        repeats=args.repeats, min_time_s=args.min_time, budget_s=args.budget))


def _list_cases() -> None:
    for case in cases_lib.all_cases():
        slow = f"  [slow: {', '.join(sorted(case.slow_modes))}]" if case.slow_modes else ""
        print(f"{case.name:26s} {case.family:10s} {case.description}{slow}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    if args.list:
        _list_cases()
        return 0
    case_order = [c.name for c in cases_lib.all_cases()]
    if args.load:
        loaded = [load_results(path) for path in args.load]
        results = merge_results(r for r, _ in loaded)
        meta = {"merged_from": list(args.load), "sources": [m for _, m in loaded]}
    else:
        modes = _parse_list(args.modes) or list(cases_lib.ALL_MODES)
        unknown = set(modes) - set(cases_lib.ALL_MODES)
        if unknown:
            raise SystemExit(f"unknown modes {sorted(unknown)}")
        options = _options(args)
        jobs = plan_jobs(cases_lib.select_cases(_parse_list(args.cases)), modes,
                         args.skip_slow_modes)
        print(f"{len(jobs)} runs, timeout {options.timeout_s:g} s each", flush=True)
        results = run_all(jobs, options)
        meta = {**environment(), "argv": list(argv if argv is not None else sys.argv[1:]),
                "timing": dataclasses.asdict(options.timing),
                "timeout_s": options.timeout_s}
    results = report.sort_results(results, case_order)
    print()
    print(report.full_report(results))
    if args.json:
        save_report(args.json, results, meta)
        print(f"\nwrote {args.json}")
    if args.png:
        report.draw_chart(results, args.png)
        print(f"wrote {args.png}")
    return 0
