"""Tiny random checkpoints of every family a user may bring, written with save_pretrained.

Each is a real Hugging Face directory (config.json, model.safetensors, tokenizer files) with the
character-level tokenizer of melo_runtime.tiny, so a test loads it exactly as a user's checkpoint
would be loaded: by path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from melo_runtime.tiny import tiny_tokenizer

HIDDEN, HEADS, FFN, LAYERS = 32, 2, 64, 6
LABELS = ("negative", "positive")

# family -> (config class, model class, extra config fields); generate families first.
_GENERATE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 1}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"num_key_value_heads": 1, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"num_key_value_heads": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"num_key_value_heads": 1, "head_dim": HIDDEN // HEADS}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"num_key_value_heads": 1, "head_dim": HIDDEN // HEADS}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"num_key_value_heads": 1, "head_dim": HIDDEN // HEADS}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"num_key_value_heads": 1}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", {"rotary_dim": 8}),
    "t5": ("T5Config", "T5ForConditionalGeneration", {}),
    "bart": ("BartConfig", "BartForConditionalGeneration", {}),
}
_CLASSIFY = {
    "bert": ("BertConfig", "BertForSequenceClassification", {}),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", {}),
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", {}),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", {}),
}
GENERATE_FAMILIES = tuple(_GENERATE)
CLASSIFY_FAMILIES = tuple(_CLASSIFY)


def _sizes(family: str) -> dict:
    """The same tiny sizes under each family's own config field names."""
    if family in ("gpt2", "gptj"):
        return {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN, "n_positions": 512}
    if family == "opt":
        return {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "ffn_dim": FFN,
                "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 512}
    if family == "t5":
        return {"d_model": HIDDEN, "d_kv": HIDDEN // HEADS, "d_ff": FFN, "num_layers": LAYERS, "num_heads": HEADS}
    if family == "bart":
        return {"d_model": HIDDEN, "encoder_layers": LAYERS, "decoder_layers": LAYERS, "encoder_attention_heads": HEADS,
                "decoder_attention_heads": HEADS, "encoder_ffn_dim": FFN, "decoder_ffn_dim": FFN,
                "max_position_embeddings": 512}
    if family == "distilbert":
        return {"dim": HIDDEN, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FFN, "max_position_embeddings": 512}
    return {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "intermediate_size": FFN, "max_position_embeddings": 512}


def save_checkpoint(family: str, directory: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny random ``family`` checkpoint (model + tokenizer) into ``directory``; returns it."""
    config_name, model_name, extra = {**_GENERATE, **_CLASSIFY}[family]
    tokenizer = tiny_tokenizer()
    special = {"vocab_size": len(tokenizer), "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family in ("t5", "bart"):
        special["decoder_start_token_id"] = 0 if family == "t5" else 2
    if family in _CLASSIFY:
        special |= {"num_labels": 2, "id2label": dict(enumerate(LABELS)), "label2id": {n: i for i, n in enumerate(LABELS)}}
    config = getattr(transformers, config_name)(**_sizes(family), **special, **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).to(dtype)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
