"""Issue 14: outcomes you can see from the CLI and the daemon.

`melo rollback` / `melo retract` with a running daemon wait for the outcome and fail with the
writer's reason; configuration mistakes are one line and a non-zero exit, never a traceback; events
for another model and rejected events leave a receipt, a DLQ record and a log line.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.settings import Settings
from tests.integration.api_harness import MODEL, WriterThread
from melo_testkit.services import wait_until

REPO = Path(__file__).resolve().parents[2]


def melo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real `melo` CLI in its own process."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "daemon", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def write_config(root: Path, extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "spool" / "melo.edits").mkdir(parents=True, exist_ok=True)
    path = root / "melo.toml"
    path.write_text(
        f'model = "{MODEL}"\ndata_dir = "{root / "data"}"\nspool_dir = "{root / "spool"}"\n{extra}'
        "[batch]\nmax_size = 4\nmax_wait_s = 0.3\n[metrics]\nenabled = false\n"
        "[melo]\nrank_per_block = 8\niterations = 100\nlr = 0.02\nlr_step = 50\n"
    )
    return path


def outbox(settings: Settings, topic: str) -> list[dict]:
    path = Path(settings.data_dir) / "outbox" / f"{topic}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[Path, Settings, WriterThread]]:
    config = write_config(tmp_path / "melo")
    settings = Settings.load(config)
    with WriterThread(settings) as writer:
        yield config, settings, writer


def spool_edit(settings: Settings, name: str, events: list[dict]) -> None:
    path = Path(settings.spool_dir) / "melo.edits" / name
    path.with_suffix(".tmp").write_text("".join(json.dumps(e) + "\n" for e in events))
    path.with_suffix(".tmp").rename(path)


def test_failed_rollback_and_retract_with_a_running_daemon_exit_non_zero_with_the_reason(running):
    config, _, _ = running
    rollback = melo("rollback", "--to", "999", "--reason", "typo", "--config", str(config))
    assert rollback.returncode == 1, rollback.stdout + rollback.stderr
    assert "failed" in rollback.stdout and "999" in rollback.stdout and "control_failed" in rollback.stdout
    retract = melo("retract", "no-such-edit", "--reason", "typo", "--config", str(config))
    assert retract.returncode == 1, retract.stdout + retract.stderr
    assert "no-such-edit" in retract.stdout and "nothing to retract" in retract.stdout
    assert "Traceback" not in rollback.stderr + retract.stderr


def test_retract_with_a_running_daemon_waits_for_the_new_version(running):
    config, settings, writer = running
    spool_edit(settings, "0001.jsonl", [{"edit_id": "sky", "model": MODEL, "task": "generate",
                                         "prompt": "The sky is", "target": " green"}])
    wait_until(lambda: writer.worker.version == 1, 60, "version 1")
    done = melo("retract", "sky", "--reason", "wrong", "--config", str(config))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published version 2" in done.stdout
    queued = melo("rollback", "--to", "1", "--reason", "undo", "--no-wait", "--config", str(config))
    assert queued.returncode == 0 and "not waiting" in queued.stdout
    wait_until(lambda: writer.worker.version == 3, 60, "the queued rollback")


def test_events_for_another_model_and_rejected_events_get_a_receipt_a_dlq_record_and_a_log_line(
    running, caplog: pytest.LogCaptureFixture
):
    _, settings, writer = running
    with caplog.at_level("WARNING", logger="melo.worker"):
        spool_edit(settings, "0001.jsonl", [
            {"edit_id": "elsewhere", "model": "zsre", "task": "generate", "prompt": "A", "target": " b"},
            {"edit_id": "blank", "model": MODEL, "task": "generate", "prompt": " ", "target": " b"},
        ])
        wait_until(lambda: len(outbox(settings, "melo.edit-results")) == 2, 30, "two receipts")
    receipts = {r["edit_id"]: r for r in outbox(settings, "melo.edit-results")}
    assert (receipts["elsewhere"]["status"], receipts["elsewhere"]["reason"]) == ("rejected", "wrong_model")
    assert (receipts["blank"]["status"], receipts["blank"]["reason"]) == ("rejected", "empty_prompt")
    dead = outbox(settings, "melo.edits.dlq")
    assert [d["reason"] for d in dead] == ["wrong_model", "empty_prompt"]
    assert json.loads(base64.b64decode(dead[0]["value_b64"]))["edit_id"] == "elsewhere"
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2 and "wrong_model" in lines[0] and "empty_prompt" in lines[1]


@pytest.mark.parametrize(
    ("extra", "command", "expected"),
    [
        ("[batch]\nmax_sise = 3\n", "snapshots list", "[batch] max_sise"),
        ("[batch\n", "snapshots list", "not valid TOML"),
        ('device = "tpu"\n', "snapshots list", "device"),
        ('spool_dir = "/nonexistent/spool"\n', "run --until-idle", "/nonexistent/spool"),
    ],
)
def test_configuration_errors_are_one_line_and_a_non_zero_exit_without_traceback(tmp_path, extra, command, expected):
    config = tmp_path / "bad.toml"
    config.write_text(f'model = "{MODEL}"\ndata_dir = "{tmp_path / "data"}"\n{extra}')
    result = melo(*command.split(), "--config", str(config))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    debug = melo("--debug", *command.split(), "--config", str(config))
    assert "Traceback" in debug.stderr and debug.returncode == result.returncode


def test_missing_config_file_and_version():
    missing = melo("snapshots", "list", "--config", "/nonexistent/melo.toml")
    assert missing.returncode == 2 and "/nonexistent/melo.toml" in missing.stderr and "Traceback" not in missing.stderr
    version = melo("--version")
    assert version.returncode == 0 and version.stdout.startswith("melo ")


def test_status_edits_show_and_inspect_route_describe_a_running_deployment(running):
    config, settings, writer = running
    spool_edit(settings, "0001.jsonl", [
        {"edit_id": "sky", "model": MODEL, "task": "generate", "prompt": "The sky is", "target": " green"},
        {"edit_id": "blank", "model": MODEL, "task": "generate", "prompt": " ", "target": " b"},
    ])
    wait_until(lambda: writer.worker.version == 1, 60, "version 1")
    wait_until(lambda: writer.worker.source.committed() != {}, 30, "the committed spool position")

    status = melo("status", "--config", str(config))
    assert status.returncode == 0, status.stderr
    assert "CURRENT version 1" in status.stdout
    assert f"writer: {writer.worker.options.owner}" in status.stdout
    assert "pending: 0 events" in status.stdout
    assert "blank: empty_prompt" in status.stdout

    shown = melo("edits", "show", "sky", "--config", str(config))
    assert shown.returncode == 0 and "edit sky: applied in version 1" in shown.stdout, shown.stdout
    unknown = melo("edits", "show", "never-sent", "--config", str(config))
    assert unknown.returncode == 1 and "no receipt" in unknown.stdout

    hit = melo("inspect", "route", "The sky is", "--config", str(config))
    assert hit.returncode == 0 and "version 1: block 0, cluster #" in hit.stdout and "sky" in hit.stdout, hit.stdout
    miss = melo("inspect", "route", "Numbers like 7 and 9", "--config", str(config))
    assert miss.returncode == 0 and "outside every cluster" in miss.stdout

    brief = melo("snapshots", "show", "--config", str(config))
    assert brief.stdout.startswith("version 1 (CURRENT): edit") and len(brief.stdout.splitlines()) < 12
    assert json.loads(melo("snapshots", "show", "1", "--json", "--config", str(config)).stdout)["edit_ids"] == ["sky"]


def test_a_training_block_shows_a_live_progress_line(tmp_path):
    import io
    import threading

    from tqdm import tqdm

    from daemon.wiring import build_worker

    settings = Settings.load(write_config(tmp_path / "melo"))
    screen = io.StringIO()
    shown: list[tqdm] = []

    def display(description: str) -> tqdm:
        shown.append(tqdm(desc=description, total=None, file=screen, bar_format="{desc}: {elapsed} elapsed"))
        return shown[-1]

    worker = build_worker(settings, training_display=display)
    spool_edit(settings, "0001.jsonl", [{"edit_id": "sky", "model": MODEL, "task": "generate",
                                         "prompt": "The sky is", "target": " green"}])
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True})
    thread.start()
    thread.join(120)
    assert worker.version == 1
    assert len(shown) == 1
    assert "training block 0 (1 edits): 00:0" in screen.getvalue()
