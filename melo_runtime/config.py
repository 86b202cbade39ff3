"""MeloConfig: where the keys come from, which layers get block LoRA, and how blocks are trained.

This module declares the fields; :mod:`melo_runtime.presets` derives them for a given model
(``preset_for(model)``), as PEFT's LoraConfig only declares.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


from melo_runtime.vectordb import CONFLICT_POLICIES

TASKS = ("generate", "classify")
KEY_SOURCES = ("hidden", "scope")
MAX_CONTEXT_PREFIXES = 8
# Fields added after snapshots were first published, with the defaults that keep older snapshots'
# behaviour (see MeloConfig.to_dict).
LATER_FIELD_DEFAULTS: dict[str, Any] = {
    "key_source": "hidden",
    "key_encoder": "",
    "train_chat_form": False,
    "train_context_prefixes": 0,
    "max_iterations": 300,
    "retry_rounds": 3,
    "index_not_learned": False,
    "margin_loss": 0.0,
    "train_stream_wordings": 0,
    "stream_wordings_radius": 0.8,
    "train_question_forms": False,
}
MAX_STREAM_WORDINGS = 16


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
    # Where an edit's key comes from (docs/generality.md): "hidden" = the paper's key, the key
    # module's output at the last token; "scope" = a sentence encoder's embedding of the clause that
    # names the edit's subject, plus a code of the subject (melo_runtime/scope.py). Snapshots written
    # before this field existed load as "hidden".
    key_source: str = "hidden"
    key_encoder: str = ""  # "scope" only: "minilm-l6" (shipped) or a sentence-transformers directory
    # Generation edits: also train each edit asked through the tokenizer's chat template, and after
    # this many short neutral lead-ins, so the block answers the question however it is framed.
    train_chat_form: bool = False
    train_context_prefixes: int = 0
    # Training budget (melo_runtime/trainer.py). ``edits_per_block`` also caps how many edits share one
    # block: a bigger batch trains several blocks at once. Past ``iterations``, training goes on while
    # the rows still improve (loss, margin gap or right tokens), up to ``max_iterations``; edits still
    # not learned are retrained up to ``retry_rounds`` times, each in a fresh block of its own
    # (bench/RESULTS.md, "Every edit learned").
    max_iterations: int = 300
    retry_rounds: int = 3
    # False (default): an edit not learned within that budget keeps no key and is reported not_learned.
    # True: it is indexed anyway and counts as applied (learned=False), the behaviour before the
    # guarantee; for delivery tests whose deliberately tiny budget learns nothing.
    index_not_learned: bool = False
    # 0 (default): a row leaves training as soon as greedy decoding reproduces its target. > 0: it
    # trains on (within the same budget) until its mean target-token loss is at most this, so the
    # edit holds with a margin rather than on a knife's edge (a reworded question moves the logits).
    margin_loss: float = 0.0
    # Scope editors: also train each edit on up to this many earlier edits' wordings of the same
    # question (masked-question distance <= stream_wordings_radius, inside the routing radius), with
    # its own subject written in (melo_runtime/wordings.py). 0 (default): none, and no pool is kept.
    train_stream_wordings: int = 0
    stream_wordings_radius: float = 0.8
    # Generation edits of a model with a chat template: also train each edit's question in the plain
    # question-answer layouts ("Q: ... A:", "Question: ...\nAnswer:"), so an edit made as a cloze
    # ("The capital of Australia is") answers the question asked that way (melo_runtime/augment.py).
    train_question_forms: bool = False

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
        if not 0 <= self.margin_loss < 10:
            raise ValueError(f"margin_loss={self.margin_loss!r} must be in [0, 10)")
        if self.max_rephrases < 0:
            raise ValueError(f"max_rephrases={self.max_rephrases!r} must be >= 0")
        if self.key_source not in KEY_SOURCES:
            raise ValueError(f"key_source={self.key_source!r} must be one of {KEY_SOURCES}")
        if self.key_source == "scope" and not self.key_encoder:
            raise ValueError("key_source='scope' needs key_encoder: 'minilm-l6' or a sentence encoder directory")
        if not 0 <= self.train_context_prefixes <= MAX_CONTEXT_PREFIXES:
            raise ValueError(
                f"train_context_prefixes={self.train_context_prefixes!r} must be in 0..{MAX_CONTEXT_PREFIXES}"
            )
        if not 0 <= self.train_stream_wordings <= MAX_STREAM_WORDINGS:
            raise ValueError(
                f"train_stream_wordings={self.train_stream_wordings!r} must be in 0..{MAX_STREAM_WORDINGS}"
            )
        if not 0 < self.stream_wordings_radius <= 2:
            raise ValueError(f"stream_wordings_radius={self.stream_wordings_radius!r} must be in (0, 2]")
        if self.conflict_policy not in CONFLICT_POLICIES:
            raise ValueError(f"conflict_policy={self.conflict_policy!r} must be one of {CONFLICT_POLICIES}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field, except fields added after the first snapshots were
        published while they hold their defaults: an older snapshot's config.json (which lacks them)
        round-trips byte for byte, and :meth:`from_dict` fills them in again."""
        data = asdict(self)
        for name, default in LATER_FIELD_DEFAULTS.items():
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeloConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (they signal a version mismatch)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MeloConfig has no field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)
