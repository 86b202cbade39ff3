"""What every performance benchmark shares: the machine it ran on, latency summaries, report files.

A figure is only worth recording with the exact command, machine and date that produced it
(issue 6), so every ``bench/perf_*.py`` report starts with :func:`environment` and is written by
:func:`write_report` as ``<name>.json`` plus a ``<name>.md`` table ready for bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from melo_eval import datasets
from melo_runtime import Edit

REPO_ROOT = Path(__file__).resolve().parents[1]


def environment(threads: int) -> dict[str, Any]:
    """The machine, software and command of this run, as recorded beside every figure."""
    return {
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(arg) for arg in [Path(sys.executable).name, "-m", _module_name(), *sys.argv[1:]]),
        "git_commit": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_cores_visible": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "torch_threads": threads,
        "accelerator": "cuda" if torch.cuda.is_available() else "none (CPU only; no GPU was lent to this task)",
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).stem


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by the nearest-rank method: always one of ``values``.

    Nearest rank never interpolates, so "p99 = x" means at least 99% of samples took <= x.
    """
    if not values:
        raise ValueError("percentile of no samples; the run measured nothing")
    if not 0 <= q <= 100:
        raise ValueError(f"q={q} must be within [0, 100]")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p90, p99 and max of a list of latencies, in milliseconds."""
    return {
        "count": len(seconds),
        "mean_ms": round(1000 * sum(seconds) / len(seconds), 2),
        "p50_ms": round(1000 * percentile(seconds, 50), 2),
        "p90_ms": round(1000 * percentile(seconds, 90), 2),
        "p99_ms": round(1000 * percentile(seconds, 99), 2),
        "max_ms": round(1000 * max(seconds), 2),
    }


def zsre_edits(count: int, data_dir: Path = datasets.DEFAULT_DATA_DIR, *, offset: int = 0) -> list[Edit]:
    """``count`` real zsRE edits (development file, file order, no rephrases) starting at ``offset``.

    Rephrases are left out as the quality harness does (they are held out there), so each edit
    indexes exactly one key; a producer that sends rephrases adds one key per rephrase.
    """
    stream = datasets.zsre_stream(data_dir, n_edits=offset + count, n_locality=0)
    return [Edit(case.edit_id, case.prompt, case.target, subject=case.subject) for case in stream.cases[offset:]]


def write_report(out: Path, name: str, report: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` (the full report) and ``<out>/<name>.md``; return both paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    env = report["environment"]
    footer = (
        f"\n\nCommand: `{env['command']}`  \n"
        f"Machine: {env['cpu']}, {env['cpu_cores_visible']} cores visible (shared with other jobs; load "
        f"{env['load_average_1m_at_start']} at start), torch {env['torch']} with {env['torch_threads']} thread(s), "
        f"accelerator: {env['accelerator']}.  \nDate: {env['date_utc']}, commit {env['git_commit']}.\n"
    )
    md_path.write_text(markdown + footer, encoding="utf-8")
    return json_path, md_path
