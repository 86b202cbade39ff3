"""Editor state <-> files: safetensors and JSON only, never pickle.

Layout (``docs/contracts.md``)::

    config.json                       MeloConfig.to_dict()
    scope.json                        key_source "scope" only: sentence encoder identity, known subjects
    index.json                        format, block count, layer shapes, the vector DB's state:
                                      cluster records whose members are (block, row) references
    keys/<block:06d>.safetensors      "keys" [rows, dim]: every key indexed with the block, in order
    graph/base.safetensors            "index": the HNSW graph at its last checkpoint (only above
                                      the vector DB's exact-scan size)
    graph/<seq:08d>.safetensors       "ops", "vectors": graph operations since that checkpoint
    blocks/<block:06d>.safetensors    one trained block: "<layer>.A" [p, d_in], "<layer>.B" [d_out, p]

Every file but config.json and index.json is written once and never changes afterwards (a block's
tensors and keys are fixed when its batch is applied; forgetting and retracting drop references,
not rows), so a store that content-addresses files keeps one copy of each, and a version costs new
bytes in proportion to its batch plus the index. Centres are recomputed from the keys at load and
the graph is replayed from its base, exactly as the live editor built them (see docs/vectordb.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import SafetensorError

from melo_runtime.block_lora import BlockFactors
from melo_runtime.config import MeloConfig
from melo_runtime.vectordb import VectorDB

FORMAT = "melo.editor/2"
CONFIG_FILE, INDEX_FILE, SCOPE_FILE = "config.json", "index.json", "scope.json"
# Folders of the vector DB's array files: to_state names an array "<file stem>/<tensor>".
DB_FOLDERS = ("keys/", "graph/")


def block_file(block_id: int) -> str:
    """File name of one block, e.g. ``blocks/000003.safetensors``."""
    return f"blocks/{block_id:06d}.safetensors"


@dataclass
class EditorState:
    """What an editor is made of, apart from the model it edits."""

    config: MeloConfig
    layer_shapes: dict[str, tuple[int, int]]  # layer -> (d_in, d_out)
    blocks: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]  # per block id: layer -> (A, B)
    db: VectorDB
    scope: dict[str, Any] | None = None  # scope.json (key_source "scope"), see melo_runtime/scope.py


def export_files(
    config: MeloConfig,
    factors: Mapping[str, BlockFactors],
    db: VectorDB,
    scope: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """Serialize an editor to ``{file name: bytes}`` (``scope``: its scope.json content, if any)."""
    counts = {layer.count for layer in factors.values()}
    if len(counts) != 1:
        raise RuntimeError(f"layers disagree on the number of blocks: {sorted(counts)}")
    n_blocks = counts.pop()
    db_state, db_arrays = db.to_state()
    index = {
        "format": FORMAT,
        "blocks": n_blocks,
        "layers": {name: [layer.d_in, layer.d_out] for name, layer in factors.items()},
        "db": db_state,
    }
    files = {CONFIG_FILE: _json_bytes(config.to_dict()), INDEX_FILE: _json_bytes(index)}
    if scope is not None:
        files[SCOPE_FILE] = _json_bytes(scope)
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, array in db_arrays.items():
        stem, tensor = name.rsplit("/", 1)
        grouped.setdefault(f"{stem}.safetensors", {})[tensor] = np.ascontiguousarray(array)
    files |= {name: safetensors.numpy.save(tensors) for name, tensors in grouped.items()}
    for block_id in range(n_blocks):
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in factors.items():
            tensors[f"{name}.A"] = layer.a[block_id].detach().cpu().contiguous().clone()
            tensors[f"{name}.B"] = layer.b[block_id].detach().cpu().contiguous().clone()
        files[block_file(block_id)] = safetensors.torch.save(tensors)
    return files


def copy_db(db: VectorDB) -> VectorDB:
    """An independent copy of ``db`` that routes, and evolves, exactly like it.

    Made through the persisted state (``VectorDB.copy``), so every database the editor writes to
    is one a loader would rebuild from that state: live and loaded editors cannot drift apart.
    """
    return db.copy()


def read_files(files: Mapping[str, bytes]) -> EditorState:
    """Parse files written by :func:`export_files`; ValueError naming a missing or malformed file."""
    for required in (CONFIG_FILE, INDEX_FILE):
        if required not in files:
            raise ValueError(f"editor files lack {required!r}; got {sorted(files)}")
    config = MeloConfig.from_dict(_json(files, CONFIG_FILE))
    index = _json(files, INDEX_FILE)
    if index.get("format") != FORMAT:
        raise ValueError(
            f"{INDEX_FILE} has format {index.get('format')!r}; this runtime reads {FORMAT!r} only "
            "(melo.editor/1 stored keys whole in keys.safetensors): re-apply the edits to build a new snapshot"
        )
    shapes = {name: (int(d_in), int(d_out)) for name, (d_in, d_out) in index["layers"].items()}
    if sorted(shapes) != sorted(config.target_modules):
        raise ValueError(f"{INDEX_FILE} layers {sorted(shapes)} differ from config target_modules")
    blocks = []
    for block_id in range(int(index["blocks"])):
        name = block_file(block_id)
        if name not in files:
            raise ValueError(f"editor files lack {name!r} (index.json lists {index['blocks']} blocks)")
        tensors = safetensors.torch.load(files[name])
        block = {}
        for layer, (d_in, d_out) in shapes.items():
            a, b = tensors.get(f"{layer}.A"), tensors.get(f"{layer}.B")
            expected = ((config.rank_per_block, d_in), (d_out, config.rank_per_block))
            if a is None or b is None or (tuple(a.shape), tuple(b.shape)) != expected:
                raise ValueError(f"{name} lacks {layer}.A/.B of shapes {expected}")
            block[layer] = (a, b)
        blocks.append(block)
    arrays = {}
    for name, data in files.items():
        if name.startswith(DB_FOLDERS) and name.endswith(".safetensors"):
            stem = name.removesuffix(".safetensors")
            arrays |= {f"{stem}/{tensor}": array for tensor, array in _safetensors(name, data).items()}
    db = VectorDB.from_state(index["db"], arrays)
    if db.conflict_policy != config.conflict_policy:
        raise ValueError(
            f"{INDEX_FILE} holds a vector DB with conflict_policy {db.conflict_policy!r} but {CONFIG_FILE} says "
            f"{config.conflict_policy!r}; load the files of one snapshot together"
        )
    scope = None
    if config.key_source == "scope":
        if SCOPE_FILE not in files:
            raise ValueError(f"editor files lack {SCOPE_FILE!r}, which key_source='scope' needs")
        scope = _json(files, SCOPE_FILE)
    return EditorState(config=config, layer_shapes=shapes, blocks=blocks, db=db, scope=scope)


def load_blocks(factors: Mapping[str, BlockFactors], state: EditorState) -> None:
    """Append ``state``'s blocks to an editor's empty ``factors``; ValueError when a layer's shape
    in the files is not the model's (files made for another model)."""
    for name, (d_in, d_out) in state.layer_shapes.items():
        layer = factors[name]
        if (layer.d_in, layer.d_out) != (d_in, d_out):
            raise ValueError(
                f"layer {name!r} is {d_in}->{d_out} in the files but {layer.d_in}->{layer.d_out} in this "
                "model; load the files onto the model they were made for"
            )
    for block in state.blocks:
        for name, (a, b) in block.items():
            factors[name].append(a, b)


def write_directory(directory: str | os.PathLike[str], files: Mapping[str, bytes]) -> None:
    """Write ``files`` (name -> bytes, names may hold folders) under ``directory``, created if missing."""
    root = Path(directory)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_directory(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file under ``directory`` by its relative POSIX name (what :func:`write_directory` wrote)."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"directory={str(root)!r} does not exist or is not a directory")
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def _json_bytes(data: Any) -> bytes:
    # Sorted keys and fixed separators: equal content gives equal bytes, hence equal hashes. Compact,
    # because index.json is the one file every version rewrites whole (pipe through `jq` to read).
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _safetensors(name: str, data: bytes) -> dict[str, np.ndarray]:
    try:
        return safetensors.numpy.load(data)
    except SafetensorError as error:
        raise ValueError(f"{name} is not a valid safetensors file: {error}") from error


def _json(files: Mapping[str, bytes], name: str) -> dict[str, Any]:
    try:
        return json.loads(files[name].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} is not valid UTF-8 JSON: {error}") from error
