"""What differs between architecture families: module layout and how to call the forward pass.

Everything else in the editor works by module name on any Hugging Face model; this module is the one
place that knows decoder-only models need position ids that skip left padding and encoder-decoder
models need decoder inputs. Where each family keeps its layers is found by :mod:`melo_runtime.presets`.
"""

from __future__ import annotations

import torch
from torch import nn


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
