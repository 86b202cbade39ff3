"""Attach MELO to a Hugging Face model by module name: block LoRA layers, key hook, prefix replay.

Attaching is idempotent and leaves module names unchanged for everything but the wrapped linears
(whose original becomes ``<name>.base``), so a second editor on the same model reuses the same
layers and hooks. The attached modules hold no edits: each editor passes its own block factors per
call, which is how several snapshot versions can serve from one model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from melo_runtime.block_lora import BlockLoRALayer, linear_dims
from melo_runtime.config import MeloConfig
from melo_runtime.families import forward_inputs, model_device
from melo_runtime.keys import KeyHook
from melo_runtime.prefix_cache import install_prefix_replay

_KEY_HOOK = "_melo_key_hook"
# (key_module, target_modules) -> (key_dim, first LoRA layer) already probed on this model. A new editor
# per snapshot version re-attaches to a model that is serving: skip the probe forward when it has run.
_CHECKED = "_melo_attach_checked"


@dataclass(frozen=True)
class Attachment:
    """The parts of a model an editor works through."""

    layers: dict[str, BlockLoRALayer]  # target module name -> its block LoRA wrapper
    key_module: str
    key_dim: int
    prefix_layers: tuple[nn.Module, ...]  # frozen layers below the first LoRA layer, in order


def attach(model: nn.Module, config: MeloConfig) -> Attachment:
    """Wrap ``config.target_modules``, hook ``config.key_module`` and prepare prefix replay.

    Freezes the base model's parameters (MELO trains only block factors). Raises ValueError when a
    module is missing, is not linear, or when the key module does not run before every LoRA layer.
    """
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    if config.key_module not in modules:
        raise ValueError(f"key_module={config.key_module!r} is not a module of this model (see model.named_modules())")
    layers = {name: _wrap(model, modules, name, config) for name in config.target_modules}
    key = modules[config.key_module]
    if not getattr(key, _KEY_HOOK, False):
        key.register_forward_hook(KeyHook(config.key_module))
        setattr(key, _KEY_HOOK, True)
    checked: dict[tuple[str, tuple[str, ...]], tuple[int, str]] = model.__dict__.setdefault(_CHECKED, {})
    signature = (config.key_module, tuple(config.target_modules))
    if signature not in checked:
        checked[signature] = _check_execution_order(model, key, config.key_module, layers)
    key_dim, first_lora = checked[signature]
    prefix = _frozen_prefix(model, first_lora)
    for layer in prefix:
        install_prefix_replay(layer)
    return Attachment(layers=layers, key_module=config.key_module, key_dim=key_dim, prefix_layers=prefix)


def _wrap(model: nn.Module, modules: dict[str, nn.Module], name: str, config: MeloConfig) -> BlockLoRALayer:
    module = modules.get(name)
    if module is None:
        raise ValueError(f"target_modules entry {name!r} is not a module of this model (see model.named_modules())")
    if isinstance(module, BlockLoRALayer):
        return module
    if name == config.key_module or name.startswith(config.key_module + ".") or config.key_module.startswith(name + "."):
        raise ValueError(
            f"target_modules entry {name!r} overlaps key_module={config.key_module!r}; "
            "the key must be computed below every LoRA layer"
        )
    try:
        linear_dims(module)
    except TypeError as error:
        raise ValueError(f"target_modules entry {name!r}: {error}") from error
    parent_name, _, child = name.rpartition(".")
    wrapper = BlockLoRALayer(name, module)
    setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper)
    return wrapper


def _check_execution_order(
    model: nn.Module, key: nn.Module, key_name: str, layers: dict[str, BlockLoRALayer]
) -> tuple[int, str]:
    """Run one probe forward; the key module must finish before any LoRA layer starts.

    Returns the key dimension (last axis of the key module's output) and the LoRA layer that runs first.
    """
    events: list[str] = []
    key_dim: list[int] = []
    # The hooks see every thread's forward while installed; record only this probe's own.
    probe_thread = threading.get_ident()

    def key_done(module: nn.Module, inputs: object, output: object) -> None:
        if threading.get_ident() != probe_thread:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        key_dim.append(int(hidden.shape[-1]))
        events.append(key_name)

    def lora_starts(name: str) -> None:
        if threading.get_ident() == probe_thread:
            events.append(name)

    handles = [key.register_forward_hook(key_done)]
    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(lambda module, inputs, name=name: lora_starts(name)))
    try:
        device = model_device(model)
        input_ids = torch.arange(1, 5, device=device).unsqueeze(0) % model.config.vocab_size
        with torch.no_grad():
            model(**forward_inputs(model, input_ids, torch.ones_like(input_ids)))
    finally:
        for handle in handles:
            handle.remove()
    if key_name not in events:
        raise ValueError(f"key_module={key_name!r} did not run in a forward pass; choose a module on the main path")
    first_key = events.index(key_name)
    early = [name for name in events[:first_key] if name != key_name]
    if early:
        raise ValueError(
            f"LoRA layer {early[0]!r} runs before key_module={key_name!r}; the key must be computed below "
            "every LoRA layer (choose a lower key_module or higher target_modules)"
        )
    missing = sorted(set(layers) - set(events))
    if missing:
        raise ValueError(f"target_modules entry {missing[0]!r} did not run in a forward pass; choose modules on the main path")
    first_lora = next(name for name in events if name != key_name)
    return key_dim[0], first_lora


def _frozen_prefix(model: nn.Module, first_lora: str) -> tuple[nn.Module, ...]:
    """Layers of the stack holding the first LoRA layer to run that lie below it.

    The stack is the LoRA layer's outermost ``nn.ModuleList`` ancestor (``transformer.h``,
    ``model.layers``, ``encoder.block`` ...), whose layers run in index order, once per forward.
    None of them contains a LoRA layer: it would have run before the first one.
    """
    parts = first_lora.split(".")
    for cut in range(1, len(parts)):
        stack = model.get_submodule(".".join(parts[:cut]))
        if isinstance(stack, nn.ModuleList) and parts[cut].isdigit():
            return tuple(stack[i] for i in range(int(parts[cut])))
    return ()
