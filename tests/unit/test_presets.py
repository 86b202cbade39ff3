"""Presets are found from a model's module structure, for every family a user is likely to bring."""

from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from melo_runtime.presets import derive_preset, preset_for
from melo_runtime.tiny import tiny_model
from tests import checkpoints


def _model(family: str):
    config_name, model_name, extra = {**checkpoints._GENERATE, **checkpoints._CLASSIFY}[family]
    special = {"vocab_size": 99, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if family in ("t5", "bart"):
        special["decoder_start_token_id"] = 0
    config = getattr(transformers, config_name)(**checkpoints._sizes(family), **special, **extra)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def test_shipped_tiny_backbones_keep_their_official_layouts():
    expected = {
        "bert": ("bert.encoder.layer.4.output.dense", ["bert.encoder.layer.9.output.dense",
                 "bert.encoder.layer.10.output.dense", "bert.encoder.layer.11.output.dense"], 4, 50),
        "gpt2": ("transformer.h.3.mlp.c_fc", ["transformer.h.4.mlp.c_fc", "transformer.h.5.mlp.c_fc"], 2, 4),
        # The scope preset gives a decoder one rank-1 block per edit (presets.SCOPE_BLOCKS).
        "llama": ("model.layers.2.mlp.up_proj", [f"model.layers.{i}.mlp.{p}" for i in (3, 4, 5)
                  for p in ("up_proj", "down_proj")], 1, 1),
        "t5": ("encoder.block.2.layer.1.DenseReluDense.wo", ["encoder.block.3.layer.1.DenseReluDense.wi",
               "encoder.block.3.layer.1.DenseReluDense.wo", "decoder.block.3.layer.2.DenseReluDense.wi",
               "decoder.block.3.layer.2.DenseReluDense.wo"], 2, 100),
    }
    for family, (key, targets, rank, per_block) in expected.items():
        config = preset_for(tiny_model(family)[0])
        assert (config.key_module, config.target_modules) == (key, targets), family
        assert (config.rank_per_block, config.edits_per_block) == (rank, per_block), family
        assert config.r_init > 0


LAYOUTS = {
    "llama": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "mistral": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "qwen2": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "qwen3": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "gemma": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "gemma2": ("decoder", "model.layers.3.mlp.up_proj", "model.layers.5.mlp.down_proj"),
    "phi3": ("decoder", "model.layers.3.mlp.gate_up_proj", "model.layers.5.mlp.down_proj"),
    "gpt_neox": ("decoder", "gpt_neox.layers.3.mlp.dense_h_to_4h", "gpt_neox.layers.5.mlp.dense_4h_to_h"),
    "opt": ("decoder", "model.decoder.layers.3.fc1", "model.decoder.layers.5.fc2"),
    "gptj": ("decoder", "transformer.h.3.mlp.fc_in", "transformer.h.5.mlp.fc_out"),
    "gpt2": ("gpt2", "transformer.h.4.mlp.c_fc", "transformer.h.5.mlp.c_fc"),
    "t5": ("encoder-decoder", "encoder.block.5.layer.1.DenseReluDense.wi", "decoder.block.5.layer.2.DenseReluDense.wo"),
    "bart": ("encoder-decoder", "model.encoder.layers.5.fc1", "model.decoder.layers.5.fc2"),
    "bert": ("encoder", "bert.encoder.layer.3.output.dense", "bert.encoder.layer.5.output.dense"),
    "roberta": ("encoder", "roberta.encoder.layer.3.output.dense", "roberta.encoder.layer.5.output.dense"),
    "deberta-v2": ("encoder", "deberta.encoder.layer.3.output.dense", "deberta.encoder.layer.5.output.dense"),
    "distilbert": ("encoder", "distilbert.transformer.layer.3.ffn.lin2", "distilbert.transformer.layer.5.ffn.lin2"),
}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_preset_is_found_from_the_module_structure_of_each_family(family):
    layout, first_target, last_target = LAYOUTS[family]
    preset = derive_preset(_model(family))
    assert preset.layout == layout
    assert preset.config.target_modules[0] == first_target
    assert preset.config.target_modules[-1] == last_target
    assert preset.config.key_module not in preset.config.target_modules
    if preset.config.task == "generate":  # generation editors key edits by scope (docs/generality.md)
        assert preset.config.key_source == "scope" and "scope key" in preset.calibration()
        preset = derive_preset(_model(family), key_source="hidden")
    assert preset.config.r_init > 0 and "median pairwise L2 distance" in preset.calibration()


class _ToyConfig(transformers.PretrainedConfig):
    model_type = "toy-melo"


class ToyForCausalLM(nn.Module):
    """An architecture no preset names: layers ``blocks.N`` with linears ``widen`` / ``narrow``."""

    def __init__(self, with_stack: bool = True) -> None:
        super().__init__()
        self.config = _ToyConfig(vocab_size=50, is_encoder_decoder=False)
        self.embed = nn.Embedding(50, 16)
        width = 3 if with_stack else 0
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"widen": nn.Linear(16, 40), "narrow": nn.Linear(40, 16)}) for _ in range(width)
        )
        self.head = nn.Linear(16, 50)

    def generate(self, *args, **kwargs):  # marks the model generative, as families.is_causal_lm expects
        raise NotImplementedError

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.embed(input_ids).cumsum(1)  # every position sees its context
        for block in self.blocks:
            hidden = hidden + block["narrow"](torch.relu(block["widen"](hidden)))
        return SimpleNamespace(logits=self.head(hidden))


def test_unknown_architecture_gets_a_generic_preset_from_layer_shapes():
    preset = derive_preset(ToyForCausalLM())
    assert preset.layout == "decoder" and preset.stack == "blocks"
    assert preset.config.key_module == "blocks.0.widen"
    assert preset.config.target_modules == ["blocks.1.widen", "blocks.1.narrow", "blocks.2.widen", "blocks.2.narrow"]


def test_architecture_without_a_layer_stack_is_one_error_naming_the_settings_to_set():
    with pytest.raises(ValueError, match=r"melo\.key_module.*melo\.target_modules"):
        derive_preset(ToyForCausalLM(with_stack=False))


def test_task_that_does_not_fit_the_head_is_rejected():
    with pytest.raises(ValueError, match="classify needs a sequence-classification head"):
        derive_preset(_model("llama"), "classify")


def test_the_paper_key_keeps_the_decoder_layout_of_ten_edits_per_block():
    model = tiny_model("llama")[0]
    hidden = preset_for(model, key_source="hidden")
    assert (hidden.rank_per_block, hidden.edits_per_block) == (4, 10)
    scope = preset_for(model)
    assert (scope.key_source, scope.rank_per_block, scope.edits_per_block) == ("scope", 1, 1)
