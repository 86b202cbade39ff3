"""Issue 14: the Python client (daemon/client.py) against the real server and the real writer."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from daemon.client import MeloClient, MeloError
from tests.integration.api_harness import ADMIN, MODEL, PRODUCER, LiveServer, WriterThread, api_settings
from melo_testkit.services import wait_until


@pytest.fixture
def melo(tmp_path) -> Iterator[MeloClient]:
    settings = api_settings(tmp_path / "melo")
    with WriterThread(settings), LiveServer.for_settings(settings) as server, \
            MeloClient(server.url, producer_token=PRODUCER, admin_token=ADMIN) as client:
        yield client


def serves(client: MeloClient, version: int) -> None:
    wait_until(lambda: client.generate(["x"], max_new_tokens=1).version == version, 30, f"version {version}")


def test_client_edits_waits_queries_retracts_and_rolls_back(melo):
    assert melo.model == MODEL
    assert melo.edit("sky", "The sky is", " green") == "sky"
    status = melo.status("sky", wait=120)
    assert status.status == "applied" and status.version is not None and status.serving == status.version
    answer = melo.generate(["The sky is", "Numbers like 7"], max_new_tokens=6)
    assert answer.outputs[0].startswith(" green") and answer.routes[0] is not None and answer.routes[1] is None
    reply, generation = melo.chat([{"role": "user", "content": "Hello"}], max_tokens=4)
    assert isinstance(reply, str) and generation.version == status.version

    retracted = melo.retract("sky", reason="wrong fact")
    assert retracted.status == "published" and retracted.version == status.version + 1
    assert melo.status("sky").status == "retracted"
    serves(melo, retracted.version)
    assert melo.generate(["The sky is"], max_new_tokens=6).routes == [None]

    rolled = melo.rollback(status.version, reason="it was right after all")
    assert rolled.status == "published"
    assert [v["version"] for v in melo.versions()][0] == rolled.version


def test_client_raises_melo_error_with_the_servers_reason(melo):
    with pytest.raises(MeloError) as refused:
        melo.submit([{"edit_id": "e", "model": MODEL, "task": "generate", "prompt": " ", "target": "x"}])
    assert refused.value.status == 422 and refused.value.detail[0]["reason"] == "empty_prompt"
    with pytest.raises(MeloError) as missing:
        melo.rollback(999, reason="no such version")
    assert missing.value.status == 404 and "999" in str(missing.value.detail)
    anonymous = MeloClient(melo.base_url)
    with pytest.raises(MeloError) as unauthorized:
        anonymous.edit("e2", "A", " b")
    assert unauthorized.value.status == 401
    anonymous.close()


def test_importing_the_client_loads_no_torch():
    code = "import sys, daemon.client; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
