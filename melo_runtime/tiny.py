"""Tiny, seeded, randomly initialised models of every supported family, for tests and smoke runs.

Each family exercises one architecture path of the editor in seconds on a CPU:

- ``bert``  -- BertForSequenceClassification (encoder, ``nn.Linear``), 12 layers so the official BERT
  layer names (key ``layer.4``, LoRA on ``layer.9..11``) exist;
- ``gpt2``  -- GPT2LMHeadModel (decoder-only, transformers' ``Conv1D`` whose weight is (d_in, d_out));
- ``llama`` -- LlamaForCausalLM (decoder-only, ``nn.Linear``, rotary positions, grouped KV heads);
- ``t5``    -- T5ForConditionalGeneration (encoder-decoder).

The tokenizer is character level over printable ASCII, built in code so nothing is downloaded; any
English text tokenizes, other characters map to ``<unk>``. Weights depend only on ``(family, task,
labels, seed)``: the same call returns the same tensors in every process.
"""

from __future__ import annotations

import string
import unicodedata
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

from melo_runtime.rng import seeded

FAMILIES = ("bert", "gpt2", "llama", "t5")
DEFAULT_LABELS = ("negative", "positive")

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
_SPECIALS = (PAD, UNK, BOS, EOS)
# T5 expects the decoder to start from the pad id, so the pad token must be id 0 for every family.
_CHARS = string.printable[:95]  # digits, letters, punctuation and space; no tabs or newlines

_HIDDEN = 32
_HEADS = 2
_FFN = 64
_MAX_POSITIONS = 512


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over printable ASCII with ``<pad>=0, <unk>, <s>, </s>``.

    It adds no special tokens around the text, so token positions map one to one onto characters
    (after NFC normalisation). Padding is on the right by default; callers may pass
    ``padding_side="left"`` per call.
    """
    vocab = {token: index for index, token in enumerate(_SPECIALS + tuple(_CHARS))}
    # BPE with no merges and no pre-tokenizer splits every string into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.normalizer = normalizers.NFC()
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="right",
        model_max_length=_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def tiny_model(
    family: str,
    *,
    task: str | None = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Build a tiny seeded model of ``family`` and its tokenizer, in eval mode.

    Args:
        family: one of ``"bert"``, ``"gpt2"``, ``"llama"``, ``"t5"``.
        task: ``"classify"`` (only ``bert``) or ``"generate"`` (the others); ``None`` picks the
            family's task.
        labels: class names of the classifier head, in id order (``bert`` only); default
            ``("negative", "positive")``.
        seed: weights are a pure function of the arguments, identical across processes.

    Returns:
        ``(model, tokenizer)``; ``model.config.id2label`` holds ``labels`` for a classifier.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not a tiny family; choose one of {FAMILIES}")
    natural_task = "classify" if family == "bert" else "generate"
    task = natural_task if task is None else task
    if task != natural_task:
        raise ValueError(
            f"task={task!r} is not available for tiny family {family!r}; it supports {natural_task!r}"
        )
    if labels is not None and family != "bert":
        raise ValueError(f"labels are only meaningful for the 'bert' classifier, not family={family!r}")
    tokenizer = tiny_tokenizer()
    config = _config(family, tokenizer, labels)
    # Build under a forked RNG so a seeded construction neither depends on nor disturbs global state.
    with seeded(seed):
        model = _MODEL_CLASSES[family](config)
    model.eval()
    return model, tokenizer


def _config(family: str, tokenizer: PreTrainedTokenizerFast, labels: Sequence[str] | None):
    special = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "bert":
        names = [unicodedata.normalize("NFC", str(label)).strip() for label in (labels or DEFAULT_LABELS)]
        if len(names) < 2 or len(set(names)) != len(names) or not all(names):
            raise ValueError(f"labels={list(labels or ())!r} must be at least two distinct non-empty names")
        return BertConfig(
            hidden_size=_HIDDEN,
            num_hidden_layers=12,
            num_attention_heads=_HEADS,
            intermediate_size=_FFN,
            max_position_embeddings=_MAX_POSITIONS,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: index for index, name in enumerate(names)},
            **special,
        )
    if family == "gpt2":
        return GPT2Config(
            n_embd=_HIDDEN,
            n_layer=6,
            n_head=_HEADS,
            n_inner=_FFN,
            n_positions=_MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **special,
        )
    if family == "llama":
        return LlamaConfig(
            hidden_size=_HIDDEN,
            num_hidden_layers=6,
            num_attention_heads=_HEADS,
            num_key_value_heads=1,
            intermediate_size=_FFN,
            max_position_embeddings=_MAX_POSITIONS,
            tie_word_embeddings=False,
            **special,
        )
    return T5Config(
        d_model=_HIDDEN,
        d_kv=_HIDDEN // _HEADS,
        d_ff=_FFN,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=_HEADS,
        dropout_rate=0.0,
        decoder_start_token_id=tokenizer.pad_token_id,
        **special,
    )


_MODEL_CLASSES = {
    "bert": BertForSequenceClassification,
    "gpt2": GPT2LMHeadModel,
    "llama": LlamaForCausalLM,
    "t5": T5ForConditionalGeneration,
}
