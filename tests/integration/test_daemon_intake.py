"""Issue 12 item 5: refused edits are isolated without fragmenting the good ones into many blocks.

Events within the character limits (2,000 / 500) but over the editor's 256-token budget used to reach
the trainer, fail a whole batch and make the writer bisect it: every half became a block of its own.
They are now refused at intake with reason ``too_many_tokens``, so blocks = batches of valid edits.
"""

from __future__ import annotations

import math
from pathlib import Path

from melo_testkit.daemon_harness import (
    MODEL,
    Deployment,
    assert_exactly_once_and_verified,
    zsre_events,
)


def test_edits_over_the_token_budget_are_dead_lettered_and_good_edits_keep_one_block_per_batch(tmp_path: Path) -> None:
    deployment = Deployment(tmp_path, batch_max_size=10)
    deployment.write_config()
    good = zsre_events(40)
    # 1,900 characters: inside max_prompt_chars, ~950 tokens of tiny-gpt2, over max_length_tokens=256.
    long = [{**event, "edit_id": f"long-{i}", "prompt": "ab " * 633} for i, event in enumerate(zsre_events(10, start=500))]
    stream = []
    for i, event in enumerate(good):
        stream.append(event)
        if i % 4 == 1 and long:
            stream.append(long.pop())
    deployment.feed(stream)

    assert deployment.run() == 0, deployment.log_text()[-3000:]

    assert_exactly_once_and_verified(deployment, {e["edit_id"] for e in good})
    store = deployment.store()
    edit_versions = [m for m in store.versions(MODEL) if m.kind == "edit"]
    assert [len(m.edit_ids) for m in edit_versions] == [10, 10, 10, 10]
    # The trainer puts at most edits_per_block edits in one block (issue 16): a batch of 10 fills
    # ceil(10 / edits_per_block) blocks, never more (no bisection fragments).
    per_block = edit_versions[-1].melo_config["edits_per_block"]
    assert edit_versions[-1].stats["blocks"] == 4 * math.ceil(10 / per_block), "blocks = the batches' own blocks"
    refused = [r for r in deployment.read_topic("results") if r["status"] == "rejected"]
    assert {r["edit_id"] for r in refused} == {f"long-{i}" for i in range(10)}
    assert {r["reason"] for r in refused} == {"too_many_tokens"}
    assert all("max_length_tokens=256" in r["detail"] for r in refused)
    dlq = deployment.read_topic("dlq")
    assert sorted(d["reason"] for d in dlq) == ["too_many_tokens"] * 10
