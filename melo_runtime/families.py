"""What differs between architecture families: module layout and how to call the forward pass.

Everything else in the editor works by module name on any Hugging Face model; this module is the one
place that knows BERT keeps its layers in ``bert.encoder.layer``, decoder-only models need
position ids that skip left padding, and T5 needs decoder inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type -> family; Llama-style decoders share module names (model.layers.N.mlp.up_proj ...).
_FAMILY_OF_MODEL_TYPE = {
    "bert": "bert",
    "roberta": "bert",
    "gpt2": "gpt2",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "t5": "t5",
}

# Where each family keeps its stack of transformer layers, for the wrapped model or the bare one.
_LAYER_LISTS = {
    "bert": ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
    "gpt2": ("transformer.h", "h"),
    "llama": ("model.layers", "layers"),
    "t5": ("encoder.block",),
}


@dataclass(frozen=True)
class Family:
    """The architecture family of a model and the module path of its (encoder) layer stack."""

    name: str  # "bert" | "gpt2" | "llama" | "t5"
    layers_path: str  # e.g. "transformer.h"
    depth: int  # number of layers in that stack


def family_of(model: nn.Module) -> Family:
    """Identify ``model``'s family from ``model.config.model_type``; ValueError if unsupported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = _FAMILY_OF_MODEL_TYPE.get(model_type)
    if name is None:
        raise ValueError(
            f"model_type={model_type!r} has no MELO preset; supported: {sorted(_FAMILY_OF_MODEL_TYPE)}. "
            "Build a MeloConfig by hand with key_module and target_modules for other models."
        )
    modules = dict(model.named_modules())
    for path in _LAYER_LISTS[name]:
        if isinstance(modules.get(path), nn.ModuleList):
            return Family(name=name, layers_path=path, depth=len(modules[path]))
    raise ValueError(f"model of type {model_type!r} has none of the layer stacks {_LAYER_LISTS[name]}")


def is_causal_lm(model: nn.Module) -> bool:
    """True for decoder-only language models (GPT-2, Llama, ...), which are left padded."""
    config = model.config
    return not config.is_encoder_decoder and _is_generative(model)


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for encoder-decoder models such as T5."""
    return bool(model.config.is_encoder_decoder)


def is_classifier(model: nn.Module) -> bool:
    """True for models with a sequence-classification head (``id2label`` gives the label names)."""
    return type(model).__name__.endswith("ForSequenceClassification")


def _is_generative(model: nn.Module) -> bool:
    return hasattr(model, "generate") and type(model).__name__.endswith(("LMHeadModel", "ForCausalLM"))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding, exactly as ``generate`` derives them.

    Passing them explicitly makes a prompt's hidden states (and so its key) independent of how
    much padding its batch needed.
    """
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def forward_inputs(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Keyword arguments for one plain forward pass over a batch of prompts.

    Decoder-only models get explicit position ids (see :func:`position_ids`); encoder-decoder
    models get a one-token decoder input (the decoder start token), enough to run the encoder.
    """
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_encoder_decoder(model):
        start = model.config.decoder_start_token_id
        inputs["decoder_input_ids"] = torch.full(
            (input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device
        )
    elif is_causal_lm(model):
        inputs["position_ids"] = position_ids(attention_mask)
    return inputs


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device
