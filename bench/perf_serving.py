"""Serving throughput: requests/s and latency of ``POST /v1/generate``, edited model vs base model.

    python -m bench.perf_serving --backbone smollm2-135m --edits 100 --requests 120 --concurrency 4

Two snapshots of one backbone go into a fresh FsSnapshotStore: ``perf-base`` (an editor with no
edits: every row routes to the base model) and ``perf-edited`` (``--edits`` real zsRE edits,
trained with the shipped preset). Each is served by the real server (``python -m daemon serve``,
uvicorn, its own process on a loopback port) and loaded by a bounded generator: ``--concurrency``
threads send ``--requests`` requests of one prompt each (after ``--warmup`` uncounted ones) and
stop at the count or at ``--time-cap`` seconds, whichever comes first. Scenarios:

* ``base``: the base snapshot, asked the edited prompts (nothing routes);
* ``edited-hit``: the edited snapshot, asked the edited prompts (each row routes to a block);
* ``edited-miss``: the edited snapshot, asked zsRE prompts that were not edited (key search only).

Generation stops at ``--max-new-tokens`` or at the end-of-sequence token, so an edit that teaches
a short answer also shortens its responses: the mean output length is reported beside the speed.

Servers run one at a time, so scenarios never compete for the CPU with each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from tqdm import tqdm

from melo_eval import datasets
from bench.perf_common import REPO_ROOT, environment, latency_summary, write_report, zsre_edits
from melo_eval.tables import markdown_table
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.pretrained import backbone_fingerprint
from melo_testkit.services import free_port, wait_until
from melo_runtime.presets import preset_for

BASE_MODEL, EDITED_MODEL = "perf-base", "perf-edited"
SERVER_START_TIMEOUT_S = 180.0  # a cold SmolLM2 load on a busy 2-core machine
STOP_TIMEOUT_S = 15.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.perf_serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m", help="a melo_runtime.backbones name (generate task)")
    parser.add_argument("--edits", type=int, default=100, help="zsRE edits in the edited snapshot")
    parser.add_argument("--iterations", type=int, default=None, help="training steps per block (default: preset)")
    parser.add_argument("--requests", type=int, default=120, help="counted requests per scenario")
    parser.add_argument("--warmup", type=int, default=8, help="uncounted requests per scenario, sent first")
    parser.add_argument("--concurrency", type=int, default=4, help="client threads")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per scenario before stopping early")
    parser.add_argument("--server-threads", type=int, default=2, help="torch threads in the server process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads here, while training the edits")
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--out", type=Path, default=Path("bench/out/perf"))
    args = parser.parse_args(argv)
    for name in ("edits", "requests", "concurrency", "max_new_tokens", "server_threads", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.warmup < 0 or args.time_cap <= 0:
        parser.error("--warmup must be >= 0 and --time-cap > 0")
    return args


def publish_snapshots(root: Path, args: argparse.Namespace, edits: list) -> dict[str, Any]:
    """Publish the base (no edits) and edited snapshots; return what the report needs about them."""
    model, tokenizer = load_backbone(args.backbone)
    preset = preset_for(model, "generate")
    config = preset
    if args.iterations:  # a fixed small budget (smoke runs): serve every edit's key, learned or not
        config = dataclasses.replace(preset, iterations=args.iterations, max_iterations=args.iterations,
                                     retry_rounds=0, index_not_learned=True)
    store = FsSnapshotStore(root)
    meta = {"base_model": {"id": args.backbone, "weights_sha256": backbone_fingerprint(model)},
            "melo_config": config.to_dict()}
    store.publish(BASE_MODEL, MeloEditor(model, tokenizer, config).export_files(), parent=None, meta=meta)
    editor = MeloEditor(model, tokenizer, config)
    k = config.edits_per_block
    learned = 0
    started = time.perf_counter()
    for i in tqdm(range(0, len(edits), k), desc=f"training {len(edits)} edits", unit="block"):
        result = editor.apply_batch(edits[i : i + k])
        learned += sum(result.learned.values())
    train_s = time.perf_counter() - started
    store.publish(EDITED_MODEL, editor.export_files(), parent=None, meta=meta | {"edit_ids": [e.edit_id for e in edits]})
    return {"config": config.to_dict(), "edits_learned": learned, "train_seconds": round(train_s, 1), **editor.stats()}


@dataclass
class Server:
    """One ``python -m daemon serve`` process on a loopback port."""

    url: str
    process: subprocess.Popen
    log_path: Path


@contextmanager
def serve(root: Path, model: str, backbone: str, threads: int, log_dir: Path) -> Iterator[Server]:
    """Run the real serving process for ``model`` until the block exits; stop it by PID."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("MELO_")}
    env |= {
        "MELO_MODEL": model,
        "MELO_BACKBONE": backbone,
        "MELO_DATA_DIR": str(root / "data"),
        "MELO_SNAPSHOT_ROOT": str(root),
        "MELO_SERVE__FOLLOW": "current",
        "MELO_SERVE__POLL_S": "3600",  # nothing is published while measuring
        "OMP_NUM_THREADS": str(threads),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    log_path = log_dir / f"serve-{model}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "daemon", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log_path)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"server for {model} exited with {process.returncode}; see {log_path}")
            return httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200

        wait_until(ready, SERVER_START_TIMEOUT_S, f"the {model} server at {server.url} to be ready")
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)


@dataclass
class LoadResult:
    """What one bounded load run observed."""

    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    routed: int = 0
    output_chars: int = 0
    elapsed_s: float = 0.0
    stopped_by_time_cap: bool = False


def run_load(
    url: str,
    prompts: Sequence[str],
    *,
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    time_cap_s: float,
) -> LoadResult:
    """Send ``requests`` one-prompt requests from ``concurrency`` threads; stop early at ``time_cap_s``.

    Prompts are taken round-robin. A request counts once it is answered (any status); a non-200
    answer or a transport error is recorded in ``errors`` and not in the latencies.
    """
    result = LoadResult()
    tickets = itertools.count()
    lock = threading.Lock()
    deadline = time.monotonic() + time_cap_s

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(time_cap_s, 30.0)) as http:
            while True:
                ticket = next(tickets)
                if ticket >= requests:
                    return
                if time.monotonic() >= deadline:
                    result.stopped_by_time_cap = True
                    return
                body = {"prompts": [prompts[ticket % len(prompts)]], "max_new_tokens": max_new_tokens}
                started = time.perf_counter()
                try:
                    response = http.post("/v1/generate", json=body)
                except httpx.HTTPError as error:
                    with lock:
                        result.errors.append(f"{type(error).__name__}: {error}")
                    continue
                took = time.perf_counter() - started
                with lock:
                    if response.status_code != 200:
                        result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                        continue
                    result.latencies_s.append(took)
                    rows = response.json()["results"]
                    result.routed += sum(row["route"] is not None for row in rows)
                    result.output_chars += sum(len(row["output"]) for row in rows)

    threads = [threading.Thread(target=client, name=f"load-{i}") for i in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.elapsed_s = time.perf_counter() - started
    return result


def summarize(name: str, model: str, result: LoadResult, args: argparse.Namespace) -> dict[str, Any]:
    """One scenario's row: throughput over the counted requests, latency percentiles, routed share."""
    done = len(result.latencies_s)
    if not done:
        raise RuntimeError(f"scenario {name}: no request succeeded; first errors: {result.errors[:3]}")
    return {
        "scenario": name,
        "snapshot": model,
        "requests_ok": done,
        "errors": len(result.errors),
        "error_samples": result.errors[:3],
        "stopped_by_time_cap": result.stopped_by_time_cap,
        "elapsed_s": round(result.elapsed_s, 2),
        "requests_per_s": round(done / result.elapsed_s, 2),
        "routed_fraction": round(result.routed / done, 3),
        "mean_output_chars": round(result.output_chars / done, 1),
        **latency_summary(result.latencies_s),
    }


def render(report: dict[str, Any]) -> str:
    """Markdown for bench/RESULTS.md."""
    rows = report["scenarios"]
    snap = report["edited_snapshot"]
    head = (
        f"`POST /v1/generate` on `{report['backbone']}`, one prompt per request, {report['max_new_tokens']} new tokens "
        f"(greedy), {report['concurrency']} concurrent clients, {report['requests']} counted requests per scenario after "
        f"{report['warmup']} warm-up requests (time cap {report['time_cap_s']:.0f} s); server: `python -m daemon serve` "
        f"(uvicorn, own process, {report['server_threads']} torch threads). Edited snapshot: {snap['edits']} zsRE edits "
        f"in {snap['blocks']} blocks, {snap['clusters']} clusters ({snap['edits_learned']} learned)."
    )
    table = markdown_table(
        ["scenario", "ok / errors", "req/s", "p50 ms", "p99 ms", "max ms", "rows routed", "mean output chars"],
        [[r["scenario"], f"{r['requests_ok']} / {r['errors']}", r["requests_per_s"], r["p50_ms"], r["p99_ms"],
          r["max_ms"], f"{100 * r['routed_fraction']:.0f}%", r["mean_output_chars"]] for r in rows],
    )
    return f"{head}\n\n{table}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run every scenario and write ``perf_serving.json`` / ``perf_serving.md`` into ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    edits = zsre_edits(args.edits, args.data_dir)
    unedited = [e.prompt for e in zsre_edits(min(args.edits, 100), args.data_dir, offset=args.edits)]
    edited = [e.prompt for e in edits]
    scenarios = [("base", BASE_MODEL, edited), ("edited-hit", EDITED_MODEL, edited), ("edited-miss", EDITED_MODEL, unedited)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="melo-perf-serving-") as tmp:
        root = Path(tmp)
        snapshot = publish_snapshots(root, args, edits)
        for name, model, prompts in scenarios:
            with serve(root, model, args.backbone, args.server_threads, root) as server:
                load = dict(concurrency=args.concurrency, max_new_tokens=args.max_new_tokens, time_cap_s=args.time_cap)
                if args.warmup:
                    run_load(server.url, prompts, requests=args.warmup, **load)
                result = run_load(server.url, prompts, requests=args.requests, **load)
            rows.append(summarize(name, model, result, args))
            print(f"{name}: {rows[-1]['requests_per_s']} req/s, p99 {rows[-1]['p99_ms']} ms, errors {rows[-1]['errors']}")
    report = {
        "environment": env,
        "backbone": args.backbone,
        "requests": args.requests,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "max_new_tokens": args.max_new_tokens,
        "time_cap_s": args.time_cap,
        "server_threads": args.server_threads,
        "edited_snapshot": snapshot,
        "scenarios": rows,
    }
    json_path, md_path = write_report(args.out, "perf_serving", report, render(report))
    print(md_path.read_text(encoding="utf-8"))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
