"""MeloConfig: where the keys come from, which layers get block LoRA, and how blocks are trained.

``MeloConfig.for_model(model)`` gives a working preset for BERT, GPT-2, Llama-style and T5 models of
any depth (the official MELO layout scaled to the model's depth) with an initial cluster radius
calibrated on the model itself -- see :func:`calibrate_r_init` for why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from melo_runtime.families import family_of, forward_inputs, is_classifier, model_device
from melo_runtime.keys import keys_at_last_token
from melo_runtime.vectordb import CONFLICT_POLICIES

TASKS = ("generate", "classify")

# R_init as a fraction of the median distance between keys of unrelated random inputs. Keys of
# one prompt are identical (distance 0) and paraphrases land well inside this; unrelated inputs
# sit near the median. bench/ tunes the absolute value per backbone through MeloConfig.r_init.
R_INIT_FRACTION = 0.25
# Llama family: key depth and radius measured on SmolLM2-135M (30 layers; bench/RESULTS.md,
# "SmolLM2 preset tuning"). Keys at 77% depth (layer 23) separate held-out rephrases from
# unrelated NQ questions better than the top key layer (26). Trained zsRE smoke (100 dev edits,
# batches of 10) at 0.45 x median: rewrite 1.000, NQ locality 1.000, held-out rephrase accuracy
# 0.326 against 0.241 for the former layer-26 / 0.25 x preset. Margin: routing alone at 0.5 x
# already lets NQ locality fall to 0.993.
LLAMA_KEY_DEPTH = 0.77
LLAMA_R_INIT_FRACTION = 0.45
_PROBES, _PROBE_TOKENS = 32, 12


@dataclass
class MeloConfig:
    """Everything that defines how an editor edits a model; JSON round-trips via to_dict/from_dict."""

    task: str  # "generate" | "classify"
    key_module: str  # full module name whose output at the last real token is an input's key
    target_modules: list[str]  # full names of nn.Linear / Conv1D modules that get block LoRA
    rank_per_block: int  # p: rank of each block's factors
    r_init: float  # initial cluster radius (L2 distance between keys)
    edits_per_block: int  # micro-batch size the preset was measured with
    iterations: int = 50
    lr: float = 1e-2
    lr_step: int = 20
    lr_gamma: float = 0.5
    early_stop: bool = True
    max_prompt_chars: int = 2000
    max_target_chars: int = 500
    max_rephrases: int = 8
    max_length_tokens: int = 256
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    seed: int = 0
    # What a conflict or supersede does with the old cluster's members: "forget" those outside its
    # halved radius, or within R_init of the new key (the paper's rule), or "split" them into
    # clusters of their own, forgetting only a re-edit of the same input (melo_runtime/vectordb.py).
    conflict_policy: str = "forget"
    # Training budget (melo_runtime/trainer.py). ``edits_per_block`` also caps how many edits share one
    # block: a bigger batch trains several blocks at once. Past ``iterations``, training goes on while
    # the loss still falls, up to ``max_iterations``; edits still not learned are retrained up to
    # ``retry_rounds`` times, each in a fresh block of its own (bench/RESULTS.md, "Every edit learned").
    max_iterations: int = 300
    retry_rounds: int = 3
    # False (default): an edit not learned within that budget keeps no key and is reported not_learned.
    # True: it is indexed anyway and counts as applied (learned=False), the behaviour before the
    # guarantee; for delivery tests whose deliberately tiny budget learns nothing.
    index_not_learned: bool = False

    def __post_init__(self) -> None:
        self.target_modules = list(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value cannot work."""
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS}")
        if not self.key_module:
            raise ValueError("key_module is empty; name the module whose output is the key")
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules={self.target_modules!r} must be a non-empty list of distinct names")
        positive = {
            "rank_per_block": self.rank_per_block,
            "r_init": self.r_init,
            "edits_per_block": self.edits_per_block,
            "iterations": self.iterations,
            "max_iterations": self.max_iterations,
            "lr": self.lr,
            "lr_step": self.lr_step,
            "lr_gamma": self.lr_gamma,
            "max_prompt_chars": self.max_prompt_chars,
            "max_target_chars": self.max_target_chars,
            "max_length_tokens": self.max_length_tokens,
            "hnsw_m": self.hnsw_m,
            "hnsw_ef_construction": self.hnsw_ef_construction,
            "hnsw_ef_search": self.hnsw_ef_search,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value!r} must be > 0")
        if self.retry_rounds < 0:
            raise ValueError(f"retry_rounds={self.retry_rounds!r} must be >= 0")
        if self.max_rephrases < 0:
            raise ValueError(f"max_rephrases={self.max_rephrases!r} must be >= 0")
        if self.conflict_policy not in CONFLICT_POLICIES:
            raise ValueError(f"conflict_policy={self.conflict_policy!r} must be one of {CONFLICT_POLICIES}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeloConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they signal a version mismatch)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MeloConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    @classmethod
    def for_model(cls, model: nn.Module, task: str | None = None) -> MeloConfig:
        """The preset for ``model``'s family, scaled to its depth, with a calibrated ``r_init``.

        Layouts (L = number of layers, official MELO configs in brackets):

        - BERT: key ``layer[round(4L/12)].output.dense``, LoRA on the top 3 layers' ``output.dense``,
          p=4, 50 edits/block [BERT-base: key 4, LoRA 9-11].
        - GPT-2: key ``h[L-3].mlp.c_fc``, LoRA on ``c_fc`` of the top 2 layers, p=2
          [GPT2-XL: key h.35, LoRA h.36-37].
        - Llama-style: key ``layers[round(0.77 L)].mlp.up_proj`` (the MLP's hidden activations, the
          analogue of GPT-2's ``c_fc``; capped at the layer below the lowest LoRA layer), LoRA on
          ``up_proj`` and ``down_proj`` of the top 3 layers, p=4, R_init 0.45 x the calibration
          median [SmolLM2-135M: key 23, LoRA 27-29, R_init ~10.1; tuned on zsRE dev data].
        - T5: key ``encoder.block[L-2]`` feed-forward ``wo``, LoRA on the feed-forward ``wi``/``wo``
          of the top encoder block [T5-small: key block 4, LoRA block 5] and of the top decoder
          block, p=2. The decoder block is our addition: the decoder reads the encoder only through
          cross-attention, and an edit of the encoder alone barely moves a weakly coupled decoder.
          The key stays below every LoRA layer (the decoder runs after the whole encoder).
        """
        family = family_of(model)
        task = task or ("classify" if is_classifier(model) else "generate")
        if task not in TASKS:
            raise ValueError(f"task={task!r} must be one of {TASKS}")
        if (task == "classify") != is_classifier(model):
            raise ValueError(
                f"task={task!r} does not fit {type(model).__name__}: classify needs a sequence-classification "
                "head, generate a language-model head"
            )
        depth, stack = family.depth, family.layers_path
        if depth < 2:
            raise ValueError(f"model has {depth} layer(s); MELO needs at least 2 (a key layer below a LoRA layer)")
        fraction = R_INIT_FRACTION  # families tuned on a real backbone override it below
        if family.name == "bert":
            lora = _top_layers(depth, 3)
            key_layer = min(round(depth * 4 / 12), lora[0] - 1)
            key = f"{stack}.{key_layer}.output.dense"
            targets = [f"{stack}.{i}.output.dense" for i in lora]
            rank, per_block = 4, 50
        elif family.name == "gpt2":
            lora = _top_layers(depth, 2)
            key = f"{stack}.{lora[0] - 1}.mlp.c_fc"
            targets = [f"{stack}.{i}.mlp.c_fc" for i in lora]
            rank, per_block = 2, 4
        elif family.name == "llama":
            lora = _top_layers(depth, 3)
            key = f"{stack}.{min(round(depth * LLAMA_KEY_DEPTH), lora[0] - 1)}.mlp.up_proj"
            targets = [f"{stack}.{i}.mlp.{proj}" for i in lora for proj in ("up_proj", "down_proj")]
            rank, per_block, fraction = 4, 10, LLAMA_R_INIT_FRACTION
        else:
            lora = _top_layers(depth, 1)
            key = _t5_feed_forward(model, f"{stack}.{lora[0] - 1}", ("wo",))[0]
            blocks = [f"{stack}.{i}" for i in lora] + [f"decoder.block.{len(model.decoder.block) - 1}"]
            feed_forward = ("wi", "wi_0", "wi_1", "wo")
            targets = [name for block in blocks for name in _t5_feed_forward(model, block, feed_forward)]
            rank, per_block = 2, 100
        return cls(
            task=task,
            key_module=key,
            target_modules=targets,
            rank_per_block=rank,
            r_init=calibrate_r_init(model, key, fraction),
            edits_per_block=per_block,
        )


def _top_layers(depth: int, wanted: int) -> list[int]:
    """Indices of the top ``wanted`` layers, leaving at least one layer below them for the key."""
    count = min(wanted, depth - 1)
    return list(range(depth - count, depth))


def _t5_feed_forward(model: nn.Module, block: str, names: tuple[str, ...]) -> list[str]:
    # Encoder blocks are [self-attention, feed-forward]; decoder blocks add cross-attention between.
    prefix = f"{block}.layer.{len(model.get_submodule(block).layer) - 1}.DenseReluDense."
    modules = dict(model.named_modules())
    found = [prefix + name for name in names if prefix + name in modules]
    if not found:
        raise ValueError(f"T5 block {block!r} has none of the feed-forward modules {names}")
    return found


def calibrate_r_init(model: nn.Module, key_module: str, fraction: float = R_INIT_FRACTION) -> float:
    """``fraction`` x the median pairwise distance between keys of seeded random token sequences
    that end with the same token.

    Key scales differ by orders of magnitude between backbones and layers (the official radii run
    from 0.1 for BERT to 75 for T5), so a fixed number per family would be wrong for other depths
    and widths. Measuring the spread of keys on the model itself gives a radius on the right scale;
    ``fraction`` sets how much of that spread one edit may claim.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    low = min(4, vocab - 1)  # skip the few special tokens most vocabularies start with
    input_ids = torch.randint(low, vocab, (_PROBES, _PROBE_TOKENS), generator=generator)
    # Real prompts often end alike ("?", " is"); the key must tell them apart by their context, so
    # the probes share their last token and the radius is measured against context alone.
    input_ids[:, -1] = (low + vocab) // 2
    input_ids = input_ids.to(model_device(model))
    attention_mask = torch.ones_like(input_ids)
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, inputs: object, output: object) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(keys_at_last_token(hidden, attention_mask))

    handle = model.get_submodule(key_module).register_forward_hook(capture)
    try:
        with torch.no_grad():
            model(**forward_inputs(model, input_ids, attention_mask))
    finally:
        handle.remove()
    keys = captured[0].double().cpu()
    distances = torch.cdist(keys, keys)
    upper = distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)]
    median = float(upper.median())
    if not median > 0:
        raise ValueError(f"keys at {key_module!r} do not vary between inputs; choose another key_module")
    return round(fraction * median, 6)
