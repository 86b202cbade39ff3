"""Fault campaign: many kill -9 of the writer over one stream, then count what was lost or doubled.

Starts its own Redis and Kafka-protocol broker on loopback ports (melo_testkit/services.py), writes a
Kafka + Redis deployment of tiny-gpt2 (melo_testkit/daemon_harness.py), and repeats: produce a
random chunk of zsRE edits, start ``melo run``, kill it with SIGKILL at a random moment after it
took the lease — or let it crash itself at a random stage of its loop (``MELO_CRASH_AT``, also an
``os._exit`` without cleanup). A final clean run drains the stream. Then it reports:

- lost: accepted edits in no published version, or without an ``applied`` receipt;
- twice: edits in more than one version;
- verify: versions whose blobs or manifest chain fail ``verify``;
- unannounced: versions never announced on ``melo.snapshots``.

    python -m tests.slow.fault_campaign --kills 100 --out /tmp/campaign

Exit status 0 only for 0 lost / 0 twice / every version verified and announced. Bounded: at most
``--kills`` kills, each run at most ``--run-timeout-s``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.crash import STAGES
from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    kill9,
    wait_for_log,
    zsre_events,
)
from melo_testkit.services import KafkaBroker, RedisServer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="kill -9 / injected crashes to perform")
    parser.add_argument("--edits", type=int, default=300, help="edit events in the stream")
    parser.add_argument("--stage-share", type=float, default=0.3,
                        help="share of kills injected at a random loop stage (MELO_CRASH_AT) instead of a random time")
    parser.add_argument("--max-delay-s", type=float, default=3.0, help="random SIGKILL moment: 0..this after the lease")
    parser.add_argument("--run-timeout-s", type=float, default=180.0, help="bound on any single daemon run")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="keep the deployment and report here (default: temp)")
    return parser.parse_args(argv)


def one_kill(d: Deployment, rng: random.Random, args: argparse.Namespace) -> str:
    """Run the daemon once and kill it; returns how ("time" or the stage), or "exited" if it finished first."""
    if rng.random() < args.stage_share:
        stage = rng.choice([s for s in STAGES if s != "control"])
        proc = d.spawn(until_idle=True, crash_at=f"{stage}:1")
        code = proc.wait(timeout=args.run_timeout_s)
        return f"stage:{stage}" if code == 137 else "exited"
    starts = d.log_text().count("writer token")
    proc = d.spawn(until_idle=False)
    try:
        wait_for_log(d, "writer token", starts + 1, proc, args.run_timeout_s)
        time.sleep(rng.uniform(0.0, args.max_delay_s))  # picks WHEN to kill; waits for nothing
        return "time" if proc.poll() is None else "exited"
    finally:
        kill9(proc)


def report(d: Deployment, expected: set[str]) -> dict[str, Any]:
    """Count lost / twice / unverified / unannounced from the stores and the output topics."""
    store = d.store()
    manifests = store.versions(MODEL)
    counts: Counter = Counter(i for m in manifests for i in m.edit_ids)
    receipts = {r["edit_id"] for r in d.read_topic("results", expect_at_least=len(expected)) if r["status"] == "applied"}
    announced = {a["version"] for a in d.read_topic("snapshots", expect_at_least=len(manifests))}
    versions = [m.version for m in manifests]
    return {
        "edits": len(expected),
        "versions": len(versions),
        "lost": sorted(expected - set(counts)),
        "without_applied_receipt": sorted(expected - receipts),
        "twice": sorted(i for i, c in counts.items() if c > 1),
        "unverified": [v for v in versions if store.verify(MODEL, v)],
        "unannounced": sorted(set(versions) - announced),
        "current_is_latest": store.current(MODEL) == (versions[-1] if versions else None),
    }


def campaign(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    events = zsre_events(args.edits)
    redis, broker = RedisServer(), KafkaBroker()
    redis.start()
    broker.start()
    try:
        d = Deployment(root, bootstrap=broker.bootstrap, redis_url=redis.url, name="campaign", lease_ttl_s=4.0)
        d.write_config()
        fed, kinds = 0, Counter()
        started = time.monotonic()
        while sum(v for k, v in kinds.items() if k != "exited") < args.kills:
            if fed < len(events):
                chunk = rng.randint(1, max(1, 2 * len(events) // max(args.kills, 1)))
                d.feed(events[fed:fed + chunk])
                fed += chunk
            kinds[one_kill(d, rng, args)] += 1
            if kinds["exited"] > 2 * args.kills:
                break  # the stream is drained and runs finish before the kill: stop, bounded
        d.feed(events[fed:])
        final = d.spawn(until_idle=True)
        final_status = final.wait(timeout=args.run_timeout_s * 2)
        result = report(d, {e["edit_id"] for e in events})
        result.update(kills=sum(v for k, v in kinds.items() if k != "exited"), kinds=dict(kinds),
                      final_status=final_status, seconds=round(time.monotonic() - started, 1))
        return result
    finally:
        broker.close()
        redis.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.out or Path(tempfile.mkdtemp(prefix="melo-campaign-"))
    result = campaign(root / "deployment", args)
    (root / "fault_campaign.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    ok = (not result["lost"] and not result["twice"] and not result["unverified"] and not result["unannounced"]
          and not result["without_applied_receipt"] and result["final_status"] == 0)
    print(f"fault campaign: {result['kills']} kills ({result['kinds']}), {result['edits']} edits, "
          f"{result['versions']} versions in {result['seconds']}s: lost {len(result['lost'])}, twice "
          f"{len(result['twice'])}, unverified {len(result['unverified'])}, unannounced "
          f"{len(result['unannounced'])}, missing applied receipts {len(result['without_applied_receipt'])}; "
          f"report {root / 'fault_campaign.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
