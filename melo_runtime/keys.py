"""Edit keys: the key module's output at each row's last non-padding token, and routing from it.

The hook is installed once on the key module. It acts only inside an editor call that names this
module as its key module, and only on the first forward of the call (the prompt): decoding steps of
``generate`` find the blocks already decided and keep them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from melo_runtime.encoding import TextEncoder
from melo_runtime.routing import CallState, KeysCaptured, current_state, use_state

_KEY_CHUNK = 64  # prompts per key-only forward pass


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # argmax of (mask * position) is the largest position whose mask is 1.
    return (attention_mask.long() * positions).argmax(dim=1)


def keys_at_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rows of ``hidden`` [batch, seq, dim] taken at each row's last real token -> [batch, dim] float32.

    ``hidden`` may also be flattened to [batch * seq, dim] (OPT's MLP sees its input that way).
    """
    if hidden.dim() == 2 and hidden.shape[0] == attention_mask.numel():
        hidden = hidden.view(*attention_mask.shape, hidden.shape[-1])
    if hidden.dim() != 3 or hidden.shape[:2] != attention_mask.shape:
        raise RuntimeError(
            f"key module output of shape {tuple(hidden.shape)} does not match the attention mask "
            f"{tuple(attention_mask.shape)}; choose a key_module whose output is [batch, seq, dim]"
        )
    index = last_token_index(attention_mask.to(hidden.device))
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, index].float()


def hidden_keys(model: nn.Module, encoder: TextEncoder, key_module: str, texts: list[str]) -> torch.Tensor:
    """The paper's keys of ``texts`` [n, dim] float32: forward passes that stop at ``key_module``."""
    chunks = []
    for start in range(0, len(texts), _KEY_CHUNK):
        batch = encoder.prompts(texts[start : start + _KEY_CHUNK])
        state = CallState(key_module=key_module, attention_mask=batch.key_mask, capture_only=True)
        with use_state(state), torch.no_grad():
            try:
                model(**batch.inputs)
            except KeysCaptured:
                pass
        if state.keys is None:
            raise RuntimeError(f"key module {key_module!r} did not run during the forward pass")
        chunks.append(state.keys)
    return torch.cat(chunks)


class KeyHook:
    """Forward hook on the key module: computes keys, routes rows, or stops a key-only pass."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        state = current_state()
        if state is None or state.key_module != self.name or state.attention_mask is None:
            return
        if state.blocks is not None and not state.capture_only:
            return  # already routed: a decoding step of generate, or a call with fixed blocks
        hidden = output[0] if isinstance(output, tuple) else output
        keys = keys_at_last_token(hidden, state.attention_mask)
        if state.capture_only:
            state.keys = keys.detach()
            raise KeysCaptured
        if state.router is not None:
            state.keys = keys.detach()
            state.blocks = state.router(state.keys)
