"""Issue 12 item 5 at scale: 2,000 mixed valid and hostile events make one block per batch of valid edits.

Embedded default, tiny-gpt2. Hostile events of ten kinds (bad JSON, wrong types, lone surrogates,
NaN, oversize metadata, over the token budget, wrong task, redelivered ids, ...) are interleaved at
random with valid zsRE edits; every hostile one must be dead-lettered or acknowledged as a duplicate
with a reason, and the valid ones must land in blocks of the batch size, not fragments of it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    assert_exactly_once_and_verified,
    zsre_events,
)

BATCH = 10


def hostile(rng: random.Random, n: int, valid: list[dict]) -> bytes | dict:
    base = {**zsre_events(1, start=900 + n % 100)[0], "edit_id": f"bad-{n}"}
    kind = n % 10
    if kind == 0:
        return b'{"edit_id": "x", "model": '
    if kind == 1:
        return {**base, "prompt": 42}
    if kind == 2:
        prompt = "\\ud800 x"  # a JSON escape of a lone surrogate: valid syntax, not a character
        return f'{{"edit_id": "sur-{n}", "model": "{MODEL}", "task": "generate", "prompt": "{prompt}", "target": " y"}}'.encode()
    if kind == 3:
        return json.dumps({**base, "rephrases": [float("nan")]}).encode()
    if kind == 4:
        return {**base, "metadata": {"blob": "x" * 70_000}}
    if kind == 5:
        return {**base, "prompt": "ab " * 633}  # within 2,000 characters, over 256 tokens
    if kind == 6:
        return {**base, "task": "classify"}
    if kind == 7:
        return rng.choice(valid)  # a redelivery: a duplicate, never applied twice
    if kind == 8:
        return {**base, "target": "   "}
    return b"\xff\xfe binary"


def test_2000_mixed_events_make_one_block_per_batch_of_valid_edits(tmp_path: Path) -> None:
    rng = random.Random(7)
    valid = zsre_events(1200)
    stream: list[dict | bytes] = list(valid)
    for n in range(800):
        stream.insert(rng.randrange(len(stream) + 1), hostile(rng, n, valid[: max(1, len(valid) // 2)]))
    deployment = Deployment(tmp_path, batch_max_size=BATCH)
    deployment.write_config()
    deployment.feed(stream)

    assert deployment.run(timeout_s=900) == 0, deployment.log_text()[-3000:]

    assert_exactly_once_and_verified(deployment, {e["edit_id"] for e in valid})
    store = deployment.store()
    batches = [m for m in store.versions(MODEL) if m.kind == "edit"]
    blocks = store.manifest(MODEL, store.current(MODEL)).stats["blocks"]
    print(f"2,000 events ({len(valid)} valid): {blocks} blocks in {len(batches)} versions")
    # The trainer puts at most edits_per_block edits in one block (issue 16); bisection adds none.
    expected = sum(math.ceil(len(m.edit_ids) / m.melo_config["edits_per_block"]) for m in batches)
    assert blocks == expected, "a batch was split into more blocks than its own"
    # Batches are cut by size, or by max_wait_s at a poll boundary: a few partial ones are normal.
    assert len(batches) <= math.ceil(len(valid) / BATCH) * 1.05, f"{len(batches)} batches for {len(valid)} valid edits"
    rejected = [r for r in deployment.read_topic("results") if r["status"] == "rejected"]
    assert {r["reason"] for r in rejected} >= {"too_many_tokens", "schema"}
