"""Presets: which module gives the key, which linears get block LoRA, and a radius measured on the model.

The layout is read from the model's module structure, not from its ``model_type`` string, so a
family we never named (a fine-tune, a renamed fork) gets a preset as long as it looks like a
transformer: a repeated stack of layers (an ``nn.ModuleList``) whose layers hold an MLP with an
"up" linear (hidden -> wider) and a "down" linear (wider -> hidden). Module names are matched first
(``mlp.up_proj``, ``mlp.c_fc``, ``fc1``, ``intermediate.dense`` ...); a layer whose names are all
unknown falls back to shapes. Three layouts follow from the model kind:

- Encoder (BERT, RoBERTa, DeBERTa-v2, DistilBERT ...): key = the MLP's down linear at layer
  ``round(4L/12)``, LoRA on the down linear of the top 3 layers, p=4, 50 edits/block
  [official BERT-base: key ``layer.4.output.dense``, LoRA ``layer.9-11.output.dense``].
- Decoder-only (Llama, Mistral, Qwen2/3, Gemma/Gemma2, Phi-3, GPT-NeoX, OPT, GPT-J ...): key = the
  MLP's up linear at 77% depth (capped below the lowest LoRA layer), LoRA on the up and down linears
  of the top 3 layers, p=4, 10 edits/block, R_init 0.45 x the calibration median [tuned on
  SmolLM2-135M, bench/RESULTS.md "SmolLM2 preset tuning"]. GPT-2's Conv1D MLP (``mlp.c_fc``) keeps
  the official GPT2-XL layout instead: key ``c_fc`` of the layer below LoRA, LoRA on ``c_fc`` of the
  top 2 layers, p=2, 4 edits/block.
- Encoder-decoder (T5, BART ...): key = the down linear of the encoder's second-to-last layer, LoRA
  on the MLP linears of the top encoder layer and of the top decoder layer, p=2, 100 edits/block
  [official T5-small: key block 4, LoRA block 5]. The decoder layer is our addition: the decoder reads
  the encoder only through cross-attention, and an edit of the encoder alone barely moves it.

When no layout can be found, :func:`derive_preset` raises one ValueError telling the user to set
``melo.key_module`` and ``melo.target_modules`` by hand.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)
from transformers.pytorch_utils import Conv1D

from melo_runtime.config import KEY_SOURCES, TASKS, MeloConfig
from melo_runtime.families import (
    forward_inputs,
    is_causal_lm,
    is_classifier,
    is_encoder_decoder,
    model_device,
)
from melo_runtime.keys import keys_at_last_token

# R_init as a fraction of the median distance between keys of unrelated random inputs. Keys of
# one prompt are identical (distance 0) and paraphrases land well inside this; unrelated inputs
# sit near the median. bench/ tunes the absolute value per backbone through MeloConfig.r_init.
R_INIT_FRACTION = 0.25
# Decoder-only layout: key depth and radius measured on SmolLM2-135M (30 layers; bench/RESULTS.md,
# "SmolLM2 preset tuning"). Keys at 77% depth (layer 23) separate held-out rephrases from
# unrelated NQ questions better than the top key layer (26). Trained zsRE smoke (100 dev edits,
# batches of 10) at 0.45 x median: rewrite 1.000, NQ locality 1.000, held-out rephrase accuracy
# 0.326 against 0.241 for the former layer-26 / 0.25 x preset. Margin: routing alone at 0.5 x
# already lets NQ locality fall to 0.993. Other decoder families share the layout untuned.
LLAMA_KEY_DEPTH = 0.77
LLAMA_R_INIT_FRACTION = 0.45
PROBES, PROBE_TOKENS = 32, 12

# Relative module paths (inside one layer of the stack) of the MLP's linears, by role.
_UP = (
    r"mlp\.up_proj",
    r"mlp\.gate_up_proj",  # Phi-3 fuses gate and up
    r"mlp\.c_fc",  # GPT-2 (Conv1D)
    r"mlp\.fc_in",  # GPT-J
    r"mlp\.dense_h_to_4h",  # GPT-NeoX
    r"mlp\.fc1",  # CLIP-style
    r"fc1",  # OPT, BART
    r"ffn\.lin1",  # DistilBERT
    r"intermediate\.dense",  # BERT, RoBERTa, DeBERTa-v2
    r"layer\.\d+\.DenseReluDense\.wi(_[01])?",  # T5 (gated variants have wi_0 and wi_1)
)
_DOWN = (
    r"mlp\.down_proj",
    r"mlp\.c_proj",
    r"mlp\.fc_out",
    r"mlp\.dense_4h_to_h",
    r"mlp\.fc2",
    r"fc2",
    r"ffn\.lin2",
    r"output\.dense",
    r"layer\.\d+\.DenseReluDense\.wo",
)
_MISSING_LAYOUT = (
    "set melo.key_module (the module whose output is an input's key, below every LoRA layer) and "
    "melo.target_modules (the nn.Linear / Conv1D modules that get block LoRA) in the settings, "
    "or build a MeloConfig by hand; `melo preset --backbone PATH` shows what was found"
)


@dataclass(frozen=True)
class Mlp:
    """The MLP linears of one layer, as full module names."""

    up: tuple[str, ...]  # hidden -> wider (several when gated: T5's wi_0 and wi_1)
    down: str  # wider -> hidden


# The shipped key for generation edits (docs/generality.md; bench/RESULTS.md "Scope study"): the
# MiniLM scope key, whose radius is an angle between unit embeddings, the same for every backbone.
# 1.1 (cosine >= 0.40 between the questions, subject masked) lets 0.94 of held-out zsRE rephrases
# (0.55 of CounterFact's, reworded relations) reach their edit; 0.09 of held-out questions about the
# same subject that ask something else get in too. Other subjects never do (the subject code).
SCOPE_R_INIT = 1.1
SCOPE_PRESET = {
    "key_source": "scope",
    "key_encoder": "minilm-l6",
    "r_init": SCOPE_R_INIT,
    "train_chat_form": True,
    "train_context_prefixes": 0,
    # Edits about one subject whose questions are close (one passage's sentences) conflict; "split"
    # keeps each as a cluster of its own instead of forgetting it (bench/RESULTS.md, hallucination:
    # forgotten 8 of 10 -> 0, edit success 0.41 -> 1.00).
    "conflict_policy": "split",
    # Train each block until its rows' target loss is <= 0.1, not merely until greedy decoding is
    # right: a reworded question moves the logits, and an edge-of-argmax edit flips back (CounterFact,
    # 30 edits: held-out rephrase 0.333 -> 0.400, asked as a chat 0.367 -> 0.533; zsRE unchanged).
    "margin_loss": 0.1,
    # Also train each edit on up to 6 earlier edits' wordings of its question (masked-question
    # distance <= 0.8, inside the routing radius), its subject written in (zsRE dev, 1,000 edits:
    # held-out rephrases 0.893 -> 0.916, routed ones answered 0.929 -> 0.953, 2.8x the training time;
    # bench/RESULTS.md "Wordings mined from the stream").
    "train_stream_wordings": 6,
    "stream_wordings_radius": 0.8,
    # Also train each edit's question as "Q: ... A:" and "Question: ...\nAnswer:": a block trained on a
    # cloze alone answered a routed question asked in another layout with an empty reply (40 hand-
    # written facts: held-out rewordings 0.600 -> 0.950, 2x the training time on those cloze edits;
    # models with a chat template only; bench/RESULTS.md "Question layouts").
    "train_question_forms": True,
}


# Blocks of the scope preset, per layout: (rank, edits per block). A block shared by ten edits answers
# a reworded question with a *sibling's* target (zsRE dev, 1,000 edits: 54 of the 91 rephrases that
# reached their block and missed said a same-block sibling's answer); one rank-1 block per edit does not,
# and trains faster (SmolLM2, 100 edits: held-out rephrase 0.920, chat 0.980; bench/RESULTS.md
# "One block per edit"). Measured on the decoder layout only; the others keep their own.
SCOPE_BLOCKS = {"decoder": (1, 1)}


@dataclass(frozen=True)
class Preset:
    """A derived preset and how it was found (what ``melo preset`` prints)."""

    config: MeloConfig
    layout: str  # "encoder" | "decoder" | "gpt2" | "encoder-decoder"
    stack: str  # module path of the (encoder) layer stack
    depth: int  # layers in that stack
    r_init_fraction: float
    key_median_distance: float  # median pairwise distance of the calibration keys

    def calibration(self) -> str:
        """One sentence saying what r_init was calibrated on."""
        if self.config.key_source == "scope":
            return (
                f"scope key ({self.config.key_encoder} embedding + subject code): r_init {SCOPE_R_INIT} chosen on "
                "zsRE/CounterFact development data by routing alone (bench/RESULTS.md, Scope study); the same for "
                "every backbone"
            )
        return (
            f"{self.r_init_fraction} x median pairwise L2 distance ({self.key_median_distance:.6g}) between keys at "
            f"{self.config.key_module} of {PROBES} seeded random {PROBE_TOKENS}-token sequences sharing their last token"
        )


@dataclass(frozen=True)
class _Layout:
    """What the module structure decided, before the radius is calibrated."""

    name: str
    stack: str
    depth: int
    key: str
    targets: list[str]
    rank: int
    per_block: int
    fraction: float


def derive_preset(model: nn.Module, task: str | None = None, key_source: str | None = None) -> Preset:
    """The preset for ``model`` found from its module structure.

    Generation editors get the scope key (:data:`SCOPE_PRESET`: the shipped MiniLM encoder plus the
    edit's subject, chat-form training rows); classifiers, or ``key_source="hidden"``, the paper's
    hidden-state key with ``r_init`` calibrated on the model itself.

    Raises ValueError when the task does not fit the model's head, or when no layer stack with a
    recognisable MLP exists (the message names ``melo.key_module`` / ``melo.target_modules``).
    """
    task = task or ("classify" if is_classifier(model) else "generate")
    if task not in TASKS:
        raise ValueError(f"task={task!r} must be one of {TASKS}")
    if (task == "classify") != is_classifier(model):
        raise ValueError(
            f"task={task!r} does not fit {type(model).__name__}: classify needs a sequence-classification "
            "head, generate a language-model head"
        )
    modules = dict(model.named_modules())
    layout = _encoder_decoder(model, modules) if is_encoder_decoder(model) else _single_stack(model, modules)
    key_source = key_source or ("scope" if task == "generate" else "hidden")
    if key_source not in KEY_SOURCES:
        raise ValueError(f"key_source={key_source!r} must be one of {KEY_SOURCES}")
    scope = SCOPE_PRESET if key_source == "scope" else {}
    median = float("nan") if scope else key_median_distance(model, layout.key)
    rank, per_block = layout.rank, layout.per_block
    if scope:
        rank, per_block = SCOPE_BLOCKS.get(layout.name, (rank, per_block))
    config = MeloConfig(
        task=task,
        key_module=layout.key,
        target_modules=layout.targets,
        rank_per_block=rank,
        r_init=scope["r_init"] if scope else round(layout.fraction * median, 6),
        edits_per_block=per_block,
        **{name: value for name, value in scope.items() if name != "r_init"},
    )
    return Preset(config, layout.name, layout.stack, layout.depth, layout.fraction, median)


def preset_for(
    model: nn.Module, task: str | None = None, overrides: dict | None = None, key_source: str | None = None
) -> MeloConfig:
    """The :class:`MeloConfig` of :func:`derive_preset` (the preset an editor of ``model`` starts from),
    with ``overrides`` of its fields on top (ValueError naming any name that is not a field). An
    override of ``key_source`` picks that key's preset before the other overrides apply."""
    key_source = key_source or (overrides or {}).get("key_source")
    preset = asdict(derive_preset(model, task, key_source).config)
    unknown = set(overrides or {}) - set(preset)
    if unknown:
        raise ValueError(f"unknown [melo] settings {sorted(unknown)}: MeloConfig fields are {sorted(preset)}")
    return MeloConfig.from_dict(preset | dict(overrides or {}))


def _single_stack(model: nn.Module, modules: dict[str, nn.Module]) -> _Layout:
    """Encoder-only or decoder-only: one stack of layers."""
    stack = _pick(model, modules, _stacks(modules), "layer")
    depth = len(modules[stack])
    _need_depth(model, depth)
    mlps = [_mlp(model, modules, f"{stack}.{i}") for i in range(depth)]
    if not _is_decoder_only(model):
        lora = _top_layers(depth, 3)
        key = mlps[min(round(depth * 4 / 12), lora[0] - 1)].down
        return _Layout("encoder", stack, depth, key, [mlps[i].down for i in lora], 4, 50, R_INIT_FRACTION)
    if isinstance(modules[mlps[0].up[-1]], Conv1D):
        lora = _top_layers(depth, 2)
        key = mlps[lora[0] - 1].up[-1]
        return _Layout("gpt2", stack, depth, key, [mlps[i].up[-1] for i in lora], 2, 4, R_INIT_FRACTION)
    lora = _top_layers(depth, 3)
    key = mlps[min(round(depth * LLAMA_KEY_DEPTH), lora[0] - 1)].up[-1]
    targets = [name for i in lora for name in (mlps[i].up[-1], mlps[i].down)]
    return _Layout("decoder", stack, depth, key, targets, 4, 10, LLAMA_R_INIT_FRACTION)


def _encoder_decoder(model: nn.Module, modules: dict[str, nn.Module]) -> _Layout:
    """T5, BART ...: the encoder's stack gives the key, both stacks' top layers get LoRA."""
    parts = {path: path.split(".") for path in _stacks(modules)}
    encoder = _pick(model, modules, [p for p, names in parts.items() if "encoder" in names and "decoder" not in names], "encoder")
    decoder = _pick(model, modules, [p for p, names in parts.items() if "decoder" in names], "decoder")
    depth = len(modules[encoder])
    _need_depth(model, depth)
    lora = _top_layers(depth, 1)
    key = _mlp(model, modules, f"{encoder}.{lora[0] - 1}").down
    tops = [_mlp(model, modules, f"{encoder}.{i}") for i in lora]
    tops.append(_mlp(model, modules, f"{decoder}.{len(modules[decoder]) - 1}"))
    targets = [name for mlp in tops for name in (*mlp.up, mlp.down)]
    return _Layout("encoder-decoder", encoder, depth, key, targets, 2, 100, R_INIT_FRACTION)


def _is_decoder_only(model: nn.Module) -> bool:
    """Causal LMs, and classifiers whose architecture has a causal LM but no masked LM (Llama, Qwen2,
    GPT-2 ... with a classification head); BERT-like encoders have a masked LM."""
    if is_causal_lm(model):
        return True
    model_type = getattr(model.config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _need_depth(model: nn.Module, depth: int) -> None:
    if depth < 2:
        raise ValueError(f"{type(model).__name__} has {depth} layer(s); MELO needs at least 2 (a key layer below a LoRA layer)")


def _linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _stacks(modules: dict[str, nn.Module]) -> list[str]:
    """Paths of every ModuleList whose items all contain a linear layer (candidate layer stacks)."""
    return [
        path
        for path, module in modules.items()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and all(any(_linear(m) for m in layer.modules()) for layer in module)
    ]


def _pick(model: nn.Module, modules: dict[str, nn.Module], candidates: list[str], what: str) -> str:
    """The longest candidate stack (ties: the shallowest path)."""
    if not candidates:
        raise ValueError(
            f"found no {what} stack (an nn.ModuleList of layers holding linear layers) in "
            f"{type(model).__name__}; {_MISSING_LAYOUT}"
        )
    return max(candidates, key=lambda path: (len(modules[path]), -path.count(".")))


def _mlp(model: nn.Module, modules: dict[str, nn.Module], layer: str) -> Mlp:
    """The up and down linears of one layer: by name, else by shape."""
    prefix = layer + "."
    local = {name[len(prefix):]: module for name, module in modules.items() if name.startswith(prefix) and _linear(module)}
    up = _first_role(local, _UP, several=True)
    down = _first_role(local, _DOWN, several=False)
    if up and down:
        return Mlp(tuple(prefix + name for name in up), prefix + down[0])
    by_shape = _mlp_by_shape(local)
    if by_shape is None:
        raise ValueError(
            f"layer {layer!r} of {type(model).__name__} has no MLP with recognisable up/down linears "
            f"(linears: {sorted(local)}); {_MISSING_LAYOUT}"
        )
    return Mlp(tuple(prefix + name for name in by_shape[0]), prefix + by_shape[1])


def _first_role(local: dict[str, nn.Module], patterns: tuple[str, ...], *, several: bool) -> list[str]:
    for pattern in patterns:
        matches = [name for name in local if re.fullmatch(pattern, name)]
        if matches and (several or len(matches) == 1):
            return matches
    return []


def _dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape  # Conv1D stores (d_in, d_out)
    return int(d_in), int(d_out)


def _mlp_by_shape(local: dict[str, nn.Module]) -> tuple[list[str], str] | None:
    """Up = the linears hidden -> widest, down = the one linear widest -> hidden; None if ambiguous."""
    dims = {name: _dims(module) for name, module in local.items()}
    if not dims:
        return None
    wide = max(d_out for _, d_out in dims.values())
    ups = [name for name, (d_in, d_out) in dims.items() if d_out == wide and d_in < wide]
    if not ups:
        return None
    hidden = dims[ups[-1]][0]
    downs = [name for name, (d_in, d_out) in dims.items() if d_in == wide and d_out == hidden]
    if len(downs) != 1:
        return None
    return ups, downs[0]


def _top_layers(depth: int, wanted: int) -> list[int]:
    """Indices of the top ``wanted`` layers, leaving at least one layer below them for the key."""
    count = min(wanted, depth - 1)
    return list(range(depth - count, depth))


def key_median_distance(model: nn.Module, key_module: str) -> float:
    """Median pairwise L2 distance between keys at ``key_module`` of seeded random token sequences
    that end with the same token (float64 on the CPU, whatever the model's dtype).

    Key scales differ by orders of magnitude between backbones and layers (the official radii run
    from 0.1 for BERT to 75 for T5), so a fixed number per family would be wrong for other depths
    and widths. Measuring the spread of keys on the model itself gives a radius on the right scale.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.vocab_size)
    low = min(4, vocab - 1)  # skip the few special tokens most vocabularies start with
    input_ids = torch.randint(low, vocab, (PROBES, PROBE_TOKENS), generator=generator)
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
        raise ValueError(f"keys at {key_module!r} do not vary between inputs; choose another melo.key_module")
    return median


def calibrate_r_init(model: nn.Module, key_module: str, fraction: float = R_INIT_FRACTION) -> float:
    """``fraction`` x :func:`key_median_distance`: how much of the key spread one edit may claim."""
    return round(fraction * key_median_distance(model, key_module), 6)
