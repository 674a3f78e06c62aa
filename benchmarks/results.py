"""The record of one benchmark run, and JSON (de)serialisation of a report."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any

STATUSES = ("ok", "error", "timeout", "skipped")
_EXCEPTION_LINE = re.compile(r"^[\w.]+(Error|Exception|Failure)\b")


@dataclasses.dataclass
class RunResult:
    """What one (case, mode) subprocess measured, or why it did not.

    Times: ``first_call_s`` is trace + compile + first run (blocked until
    ready) in a fresh process; ``per_call_ms`` is the median of the timed
    calls that follow. ``max_abs_err`` compares with the xla reference;
    ``hlo_instructions`` counts instruction lines of the optimised HLO.
    """

    case: str
    mode: str
    status: str
    error: str | None = None
    phase: str | None = None
    first_call_s: float | None = None
    per_call_ms: float | None = None
    n_calls: int = 0
    max_abs_err: float | None = None
    hlo_instructions: int | None = None
    jaxpr_eqns: int | None = None
    wall_s: float | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def key(self) -> tuple[str, str]:
        return self.case, self.mode

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunResult":
        """Builds a result from its JSON dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def short_error(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of message`` (or where it was raised), truncated."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    detail = lines[0] if lines else _raise_site(exc)
    causes = [line for line in lines[1:] if _EXCEPTION_LINE.match(line)]
    if causes and "Traceback" in detail:  # A callback's wrapped exception.
        detail = f"{detail.split('Traceback')[0].strip()} {causes[-1]}"
    text = f"{type(exc).__name__}: {detail}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _raise_site(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    code = tb.tb_frame.f_code
    return f"(raised in {code.co_name} at {os.path.basename(code.co_filename)}:{tb.tb_lineno})"


def environment() -> dict[str, Any]:
    """Versions and machine facts stored beside the results."""
    import jax
    import jaxlib

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }


def save_report(path: str, results: Sequence[RunResult],
                meta: dict[str, Any]) -> None:
    """Writes ``{"meta": ..., "results": [...]}`` to ``path``."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    payload = {"meta": meta,
               "results": [dataclasses.asdict(r) for r in results]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")


def load_results(path: str) -> tuple[list[RunResult], dict[str, Any]]:
    """Reads a report written by ``save_report``."""
    with open(path) as f:
        payload = json.load(f)
    return ([RunResult.from_dict(d) for d in payload["results"]],
            payload.get("meta", {}))


def merge_results(groups: Iterable[Sequence[RunResult]]) -> list[RunResult]:
    """Concatenates result lists; a later (case, mode) replaces an earlier
    one unless the later one was merely skipped."""
    merged: dict[tuple[str, str], RunResult] = {}
    for group in groups:
        for result in group:
            old = merged.get(result.key)
            if old is None or result.status != "skipped" or old.status == "skipped":
                merged[result.key] = result
    return list(merged.values())
