"""Text tables and a PNG chart of benchmark results."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from benchmarks.results import RunResult

MODE_ORDER = ("xla", "interpret", "tpu_interpret", "fast")
MODE_COLORS = {"xla": "#4c72b0", "interpret": "#dd8452",
               "tpu_interpret": "#c44e52", "fast": "#55a868"}


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: header, width and cell formatter."""

    header: str
    width: int
    cell: Callable[[RunResult], str]


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sig(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.2e}"


def _status(r: RunResult) -> str:
    if r.ok:
        return "ok"
    return r.status if not r.phase else f"{r.status}@{r.phase}"


RESULT_COLUMNS = (
    Column("case", 24, lambda r: r.case),
    Column("mode", 13, lambda r: r.mode),
    Column("status", 18, _status),
    Column("first s", 9, lambda r: _num(r.first_call_s, ".2f")),
    Column("per-call ms", 12, lambda r: _sig(r.per_call_ms)),
    Column("calls", 6, lambda r: str(r.n_calls) if r.ok else "-"),
    Column("max err", 9, lambda r: _num(r.max_abs_err, ".1e")),
    Column("HLO", 7, lambda r: _num(r.hlo_instructions, "d")),
    Column("eqns", 6, lambda r: _num(r.jaxpr_eqns, "d")),
)


def _row(cells: Sequence[str], columns: Sequence[Column]) -> str:
    return "  ".join(c.rjust(col.width) if i > 1 else c.ljust(col.width)
                     for i, (c, col) in enumerate(zip(cells, columns, strict=True)))


def sort_results(results: Sequence[RunResult],
                 case_order: Sequence[str] = ()) -> list[RunResult]:
    """Results ordered by ``case_order`` (then name) and by mode."""
    rank = {name: i for i, name in enumerate(case_order)}
    mode_rank = {m: i for i, m in enumerate(MODE_ORDER)}
    return sorted(results, key=lambda r: (rank.get(r.case, len(rank)), r.case,
                                          mode_rank.get(r.mode, 99), r.mode))


def format_results_table(results: Sequence[RunResult]) -> str:
    """One row per (case, mode), with failures and their short errors."""
    lines = [_row([c.header for c in RESULT_COLUMNS], RESULT_COLUMNS)]
    lines.append("-" * len(lines[0]))
    errors = []
    previous_case = None
    for r in results:
        if previous_case is not None and r.case != previous_case:
            lines.append("")
        previous_case = r.case
        lines.append(_row([c.cell(r) for c in RESULT_COLUMNS], RESULT_COLUMNS))
        if r.error and not r.ok:
            errors.append(f"  {r.case} / {r.mode}: {r.error}")
    if errors:
        lines += ["", "failures:"] + errors
    return "\n".join(lines)


def _by_key(results: Sequence[RunResult]) -> dict[tuple[str, str], RunResult]:
    return {r.key: r for r in results}


def _ratio(num: RunResult | None, den: RunResult | None, field: str) -> str:
    if num is None or den is None or not (num.ok and den.ok):
        return "-"
    a, b = getattr(num, field), getattr(den, field)
    if not a or not b:
        return "-"
    return f"{a / b:.3g}x"


RATIO_SPECS = (
    ("fast/xla call", "fast", "xla", "per_call_ms"),
    ("interp/fast call", "interpret", "fast", "per_call_ms"),
    ("tpu_i/fast call", "tpu_interpret", "fast", "per_call_ms"),
    ("interp/fast 1st", "interpret", "fast", "first_call_s"),
    ("tpu_i/fast 1st", "tpu_interpret", "fast", "first_call_s"),
    ("interp/xla call", "interpret", "xla", "per_call_ms"),
)


def format_ratio_table(results: Sequence[RunResult]) -> str:
    """Per case: fast against each other mode (>1x means fast is faster,
    except fast/xla, which is fast's slowdown against plain XLA)."""
    by_key = _by_key(results)
    cases = list(dict.fromkeys(r.case for r in results))
    width = 17
    header = "case".ljust(24) + "".join(s[0].rjust(width) for s in RATIO_SPECS)
    lines = [header, "-" * len(header)]
    for case in cases:
        cells = [_ratio(by_key.get((case, num)), by_key.get((case, den)), field)
                 for _, num, den, field in RATIO_SPECS]
        lines.append(case.ljust(24) + "".join(c.rjust(width) for c in cells))
    return "\n".join(lines)


def format_matrix(results: Sequence[RunResult], field: str, fmt) -> str:
    """A case x mode matrix of one field; failures show their status."""
    by_key = _by_key(results)
    cases = list(dict.fromkeys(r.case for r in results))
    modes = [m for m in MODE_ORDER if any(r.mode == m for r in results)]
    lines = ["case".ljust(24) + "".join(m.rjust(15) for m in modes)]
    for case in cases:
        cells = []
        for mode in modes:
            r = by_key.get((case, mode))
            if r is None:
                cells.append("")
            elif r.ok:
                cells.append(fmt(getattr(r, field)))
            else:
                cells.append(r.status)
        lines.append(case.ljust(24) + "".join(c.rjust(15) for c in cells))
    return "\n".join(lines)


def full_report(results: Sequence[RunResult]) -> str:
    """Everything printed at the end of a run."""
    return "\n\n".join([
        format_results_table(results),
        "per-call time (ms, median):\n" + format_matrix(results, "per_call_ms", _sig),
        "first call (s, trace+compile+run):\n"
        + format_matrix(results, "first_call_s", lambda v: _num(v, ".2f")),
        "ratios:\n" + format_ratio_table(results),
    ])


def draw_chart(results: Sequence[RunResult], path: str, title: str = "") -> None:
    """Log-scale bars of per-call and first-call time per case and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = _by_key(results)
    cases = list(dict.fromkeys(r.case for r in results))
    modes = [m for m in MODE_ORDER if any(r.mode == m for r in results)]
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 0.8 * len(cases) + 3), 9),
                             sharex=True)
    panels = (("per_call_ms", "per-call time (ms)"),
              ("first_call_s", "first call (s)"))
    width = 0.8 / max(len(modes), 1)
    for ax, (field, label) in zip(axes, panels, strict=True):
        _draw_panel(ax, by_key, cases, modes, field, width)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", which="major", alpha=0.3)
    axes[0].legend(ncol=len(modes), fontsize=8, loc="upper left")
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(cases, rotation=45, ha="right", fontsize=8)
    fig.suptitle(title or "Pallas TPU kernels on CPU: time per mode "
                 "(x = failed, timed out or skipped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _draw_panel(ax, by_key, cases, modes, field, width) -> None:
    values = [getattr(r, field) for r in by_key.values()
              if r.ok and getattr(r, field)]
    floor = min(values) / 2 if values else 1e-3
    for m_idx, mode in enumerate(modes):
        xs, heights, missing = [], [], []
        for c_idx, case in enumerate(cases):
            x = c_idx + (m_idx - (len(modes) - 1) / 2) * width
            r = by_key.get((case, mode))
            value = getattr(r, field) if r is not None and r.ok else None
            if value and not math.isnan(value):
                xs.append(x)
                heights.append(value)
            elif r is not None:
                missing.append(x)
        ax.bar(xs, heights, width, label=mode, color=MODE_COLORS.get(mode))
        ax.plot(missing, [floor] * len(missing), "x",
                color=MODE_COLORS.get(mode), markersize=7)
