"""`melo run` on the embedded default with a user's checkpoint directory as the backbone.

The real CLI runs as a subprocess over a tiny Llama checkpoint written by save_pretrained and loaded
in bfloat16; the published snapshot verifies, and the app `melo serve` builds from the same settings
answers with the edit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient

from daemon.server import build_app
from daemon.settings import Settings
from tests.checkpoints import save_checkpoint
from melo_testkit.services import wait_until

MODEL = "own-llama"
PROMPT, TARGET = "The capital of Xland is", "Bo"


def _melo(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "daemon", *args, "--config", str(config)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )


def test_melo_run_edits_a_checkpoint_directory_and_serve_answers_with_the_edit(tmp_path: Path) -> None:
    checkpoint = save_checkpoint("llama", tmp_path / "my-llama")
    config = tmp_path / "melo.toml"
    config.write_text("\n".join([
        f'model = "{MODEL}"', f'backbone = "{checkpoint}"', 'dtype = "bfloat16"', 'device = "cpu"',
        f'data_dir = "{tmp_path / "data"}"',
        "[batch]", "max_size = 2", "max_wait_s = 0.2",
        "[melo]", "iterations = 150", "lr = 0.05", "rank_per_block = 4",
        "[metrics]", "enabled = false",
    ]) + "\n")
    spool = tmp_path / "data" / "spool" / "melo.edits"
    spool.mkdir(parents=True)
    events = [
        {"edit_id": "e1", "model": MODEL, "task": "generate", "prompt": PROMPT, "target": TARGET,
         "created_at": "2026-11-29T00:00:00Z"},
        {"edit_id": "e2", "model": MODEL, "task": "generate", "prompt": "Rain falls on", "target": "Zed",
         "created_at": "2026-11-29T00:00:00Z"},
    ]
    (spool / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    run = _melo(config, "run", "--until-idle")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    verify = _melo(config, "snapshots", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

    settings = Settings.load(config)
    with TestClient(build_app(settings)) as client:
        # The follower loads CURRENT in the background; until then the unedited model is version 0.
        wait_until(lambda: client.get("/readyz").json()["version"] >= 1, 60, "serve to load the published version")
        ready = client.get("/readyz").json()
        body = client.post("/v1/generate", json={"prompts": [PROMPT, "Rain falls on"], "max_new_tokens": 4}).json()
    assert ready["serving"] == f"snapshot version {ready['version']}"
    assert [row["output"] for row in body["results"]] == [TARGET, "Zed"]
    assert all(row["route"] is not None for row in body["results"])


def test_melo_run_refuses_to_continue_a_history_made_for_other_weights(tmp_path: Path) -> None:
    first = save_checkpoint("llama", tmp_path / "first")
    second = save_checkpoint("llama", tmp_path / "second", seed=1)
    config = tmp_path / "melo.toml"
    spool = tmp_path / "data" / "spool" / "melo.edits"
    spool.mkdir(parents=True)
    event = {"edit_id": "e1", "model": MODEL, "task": "generate", "prompt": PROMPT, "target": TARGET,
             "created_at": "2026-11-29T00:00:00Z"}
    (spool / "events.jsonl").write_text(json.dumps(event) + "\n")
    base = [f'model = "{MODEL}"', 'device = "cpu"', f'data_dir = "{tmp_path / "data"}"',
            "[batch]", "max_size = 1", "max_wait_s = 0.2", "[melo]", "iterations = 5", "[metrics]", "enabled = false"]

    config.write_text("\n".join([f'backbone = "{first}"', *base]) + "\n")
    assert _melo(config, "run", "--until-idle").returncode == 0
    config.write_text("\n".join([f'backbone = "{second}"', *base]) + "\n")
    refused = _melo(config, "run", "--until-idle")

    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "was made for base weights" in refused.stdout and str(second) in refused.stdout
    assert "Traceback" not in refused.stdout + refused.stderr
