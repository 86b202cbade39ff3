"""Every benchmark behind bench/RESULTS.md as one command.

    python -m bench.suite --list                     # the runs, with their exact commands
    python -m bench.suite --only quality             # every quality run (a name prefix selects)
    python -m bench.suite --only zsre-reserved-melo,perf-train
    python -m bench.suite                            # everything: many CPU hours; a GPU box helps

Each run is ``python -m <module> <args> --out <out>/<name>`` in its own process, one after the
other, with the same arguments the tables in bench/RESULTS.md were measured with (stream sizes
were chosen to finish on a 2-core CPU; raise ``--n-edits`` by hand for longer streams). Runs that
fail are reported at the end and make the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SMALL = ("--batch-size", "10", "--threads", "1", "--seed", "0")


@dataclass(frozen=True)
class Run:
    """One benchmark process."""

    name: str
    module: str
    args: tuple[str, ...]

    def command(self, out: Path) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args, "--out", str(out / self.name)]


def _quality(name: str, dataset: str, method: str, n: int, every: int, n_locality: int, *extra: str) -> Run:
    args = ("--dataset", dataset, "--method", method, "--n-edits", str(n), "--every", str(every),
            "--n-locality", str(n_locality), *SMALL, *extra)
    return Run(f"quality-{name}", "melo_eval.cli", args)


RUNS: tuple[Run, ...] = (
    # zsRE: development stream (1,000 edits), reserved file (final numbers), the four methods.
    _quality("zsre-dev-1k-melo", "zsre", "melo", 1000, 500, 200),
    *(_quality(f"zsre-dev-30-{m}", "zsre", m, 30, 30, 30) for m in ("melo", "melo-paper", "grace", "lora")),
    _quality("zsre-dev-30-melo-daemon", "zsre", "melo", 30, 10, 30, "--daemon"),
    _quality("zsre-reserved-melo", "zsre", "melo", 100, 50, 100, "--reserved"),
    _quality("zsre-reserved-melo-split", "zsre", "melo", 100, 50, 100, "--reserved", "--conflict-policy", "split"),
    _quality("zsre-reserved-melo-paper", "zsre", "melo-paper", 100, 100, 100, "--reserved"),
    _quality("zsre-reserved-lora", "zsre", "lora", 100, 100, 100, "--reserved"),
    _quality("zsre-reserved-grace", "zsre", "grace", 50, 50, 100, "--reserved"),
    # CounterFact (development split), both conflict policies.
    _quality("counterfact-melo", "counterfact", "melo", 100, 50, 100),
    _quality("counterfact-melo-split", "counterfact", "melo", 100, 50, 100, "--conflict-policy", "split"),
    # Hallucination (GRACE's construction; prompts need 512 tokens).
    *(_quality(f"hallucination-{m}", "hallucination", m, 30, 10 if m == "melo" else 30, 100,
               "--max-length-tokens", "512") for m in ("melo", "grace")),
    # Label shift on MiniLM.
    _quality("scotus-melo", "scotus", "melo", 200, 100, 200),
    *(_quality(f"scotus-{m}", "scotus", m, 100, 100, 200) for m in ("melo-paper", "grace", "lora")),
    _quality("huffpost-melo", "huffpost", "melo", 200, 100, 200),
    _quality("huffpost-grace", "huffpost", "grace", 50, 50, 200),
    # Routing studies (no training).
    Run("key-spread-zsre", "bench.key_spread",
        ("--dataset", "zsre", "--n-edits", "1000", "--n-locality", "300", "--layers", "23", "--fractions", "0.45",
         "--conflict-policies", "forget,split", "--threads", "1")),
    Run("key-spread-counterfact", "bench.key_spread",
        ("--dataset", "counterfact", "--n-edits", "200", "--layers", "23", "--fractions", "0.25,0.35,0.45",
         "--conflict-policies", "forget,split", "--threads", "1")),
    # Performance.
    Run("perf-train", "bench.perf_train", ("--sizes", "1,10,100", "--naive-iterations", "10", "--threads", "1")),
    Run("perf-routing", "bench.perf_routing", ("--edits", "0,100,10000", "--repeats", "20")),
    Run("perf-memory", "bench.perf_memory", ("--backbone", "smollm2-135m", "--edits", "1000")),
    Run("perf-serving", "bench.perf_serving",
        ("--backbone", "smollm2-135m", "--edits", "100", "--requests", "120", "--concurrency", "4")),
    Run("perf-daemon", "bench.perf_daemon", ("--backbone", "tiny-gpt2", "--batch-sizes", "1", "10", "100")),
    Run("perf-scaling", "bench.perf_scaling", ()),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the runs and their commands, run nothing")
    parser.add_argument("--only", default="", help="comma-separated run names or name prefixes (e.g. quality-scotus)")
    parser.add_argument("--out", type=Path, default=Path("var/bench/suite"))
    return parser.parse_args(argv)


def select(only: str) -> list[Run]:
    """The runs whose name starts with one of the comma-separated prefixes (all when empty)."""
    prefixes = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [r for r in RUNS if not prefixes or any(r.name.startswith(p) for p in prefixes)]
    unknown = [p for p in prefixes if not any(r.name.startswith(p) for r in RUNS)]
    if unknown:
        raise SystemExit(f"no run is named {', '.join(unknown)}; see python -m bench.suite --list")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or list) the selected benchmarks one after the other; 1 if any failed."""
    args = parse_args(argv)
    runs = select(args.only)
    if args.list:
        for run in runs:
            print(f"{run.name}: python -m {run.module} {' '.join(run.args)} --out {args.out / run.name}")
        return 0
    failed = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(run.command(args.out))
        print(f"[{i}/{len(runs)}] {run.name}: exit {code} after {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(run.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
