"""A user's own checkpoint, loaded by path, edits, publishes and serves like a shipped backbone.

Every family is saved with save_pretrained (tiny random weights, character-level tokenizer), loaded
through melo_runtime.backbones.load_backbone, edited, published to a snapshot store and served over
HTTP by a replica that loaded the same checkpoint again: in float32 and in bfloat16, on the CPU.
"""

import dataclasses
import json

import pytest
import torch
from fastapi.testclient import TestClient

from daemon.server import create_app
from daemon.serving_state import ServingState, VersionHistory
from daemon.snapshot_store_fs import FsSnapshotStore
from melo_runtime import Edit, MeloEditor
from melo_runtime.backbones import load_backbone, resolve_device
from melo_runtime.presets import derive_preset
from melo_runtime.pretrained import backbone_fingerprint
from tests.checkpoints import (
    CLASSIFY_FAMILIES,
    GENERATE_FAMILIES,
    LABELS,
    save_checkpoint,
)

# Tiny random models have near-uniform logits: larger steps than the official recipe learn one edit.
LEARN = {"lr": 0.05, "iterations": 150, "rank_per_block": 4}
# Gemma2 normalises the MLP output (post_feedforward_layernorm) before the residual: a LoRA delta
# there is scale-free, and large steps oscillate on a random model.
LEARN_FAMILY = {"gemma2": {"lr": 0.02, "iterations": 200}}
PROMPT, OTHER = "The capital of Xland is", "A cat sat on"


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_checkpoint(family, tmp_path_factory.mktemp("ckpt") / family)
        return made[family]

    return get


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_generator_checkpoint_by_path_learns_an_edit_and_reloads_it(checkpoint_dir, tmp_path, family, dtype):
    path = checkpoint_dir(family)
    model, tokenizer = load_backbone(path, dtype=dtype, device="cpu")
    assert model.dtype == getattr(torch, dtype)
    config = dataclasses.replace(derive_preset(model).config, **(LEARN | LEARN_FAMILY.get(family, {})))
    editor = MeloEditor(model, tokenizer, config)
    other_before = editor.generate([OTHER], max_new_tokens=4)

    result = editor.apply_batch([Edit(edit_id="e1", prompt=PROMPT, target="Bo")])

    assert result.learned == {"e1": True}
    assert editor.generate([PROMPT], max_new_tokens=4) == ["Bo"]
    assert editor.generate([OTHER], max_new_tokens=4) == other_before
    served = _publish_and_serve(tmp_path, path, dtype, editor, "/v1/generate", {"prompts": [PROMPT], "max_new_tokens": 4})
    assert served["results"][0]["output"] == "Bo" and served["results"][0]["route"]["block"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", CLASSIFY_FAMILIES)
def test_classifier_checkpoint_by_path_learns_a_label_edit_and_reloads_it(checkpoint_dir, tmp_path, family, dtype):
    path = checkpoint_dir(family)
    model, tokenizer = load_backbone(path, dtype=dtype, device="cpu")
    assert model.config.id2label == dict(enumerate(LABELS))
    editor = MeloEditor(model, tokenizer, dataclasses.replace(derive_preset(model).config, **LEARN))
    before = editor.classify([PROMPT])[0]
    flipped = LABELS[1 - LABELS.index(before)]

    result = editor.apply_batch([Edit(edit_id="e1", prompt=PROMPT, target=flipped)])

    assert result.learned == {"e1": True}
    assert editor.classify([PROMPT]) == [flipped]
    served = _publish_and_serve(tmp_path, path, dtype, editor, "/v1/classify", {"texts": [PROMPT]})
    assert served["results"][0]["label"] == flipped


def _publish_and_serve(tmp_path, path, dtype, editor, route, body) -> dict:
    """Publish the editor as version 1 and ask a replica with its own load of the checkpoint."""
    store = FsSnapshotStore(tmp_path / "snapshots")
    weights = backbone_fingerprint(load_backbone(path, dtype=dtype, device="cpu")[0])
    meta = {"base_model": {"id": str(path), "weights_sha256": weights}, "edit_ids": ["e1"]}
    assert store.publish("m", editor.export_files(), parent=None, meta=meta).version == 1
    assert store.verify("m", 1) == []
    model, tokenizer = load_backbone(path, dtype=dtype, device="cpu")
    state = ServingState(store, "m", model, tokenizer, weights_sha256=backbone_fingerprint(model))
    state.refresh()
    with TestClient(create_app(state, history=VersionHistory(state)), raise_server_exceptions=False) as client:
        response = client.post(route, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 1
    return response.json()


def test_fine_tuned_classifier_keeps_its_head_and_labels(checkpoint_dir):
    path = checkpoint_dir("bert")
    saved = json.loads((path / "config.json").read_text())["id2label"]
    model, _ = load_backbone(path, device="cpu")
    again, _ = load_backbone(path, device="cpu")
    assert {str(k): v for k, v in model.config.id2label.items()} == saved
    assert torch.equal(model.classifier.weight, again.classifier.weight)


def test_classifier_given_other_labels_gets_a_seeded_head_of_that_size(checkpoint_dir):
    path = checkpoint_dir("roberta")
    first, _ = load_backbone(path, labels=["a", "b", "c"], device="cpu")
    second, _ = load_backbone(path, labels=["a", "b", "c"], device="cpu")
    assert first.config.id2label == {0: "a", 1: "b", 2: "c"}
    weights = [dict(m.named_parameters()) for m in (first, second)]
    head = [name for name in weights[0] if name.startswith("classifier") and name.endswith("weight")][-1]
    assert weights[0][head].shape[0] == 3 and torch.equal(weights[0][head], weights[1][head])


def test_qwen2_checkpoint_keeps_the_tokenizer_it_was_saved_with(checkpoint_dir):
    # AutoTokenizer would rebuild Qwen2's own BPE class around tokenizer.json, which encodes most
    # words of a character-level vocabulary to nothing: the cause of the reported reshape crash.
    _, tokenizer = load_backbone(checkpoint_dir("qwen2"), device="cpu")
    assert len(tokenizer("Who").input_ids) == 3


def test_text_that_tokenizes_to_nothing_is_a_clear_error(checkpoint_dir):
    model, tokenizer = load_backbone(checkpoint_dir("qwen2"), device="cpu")
    editor = MeloEditor(model, tokenizer, derive_preset(model).config)
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        editor.generate([""])


def test_checkpoint_directory_without_weights_says_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"lacks weights .*tokenizer files"):
        load_backbone(tmp_path, device="cpu")


def test_unknown_backbone_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped backbone .* nor an existing path"):
        load_backbone(str(tmp_path / "nope"))


def test_hf_id_missing_from_the_local_cache_names_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=rf"hf:acme/none is not in the local Hugging Face cache \({tmp_path}\)"):
        load_backbone("hf:acme/none")


def test_hf_id_loads_from_the_local_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / "0123abcd"
    save_checkpoint("llama", snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    model, _ = load_backbone("hf:acme/tiny", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_bad_dtype_and_missing_cuda_are_clear_errors():
    with pytest.raises(ValueError, match="dtype='int8' must be one of"):
        load_backbone("tiny-gpt2", dtype="int8")
    with pytest.raises(ValueError, match="device='tpu' is not"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="has no CUDA device"):
            resolve_device("cuda:1")


def test_shipped_backbone_loads_in_bfloat16():
    model, _ = load_backbone("tiny-llama", dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
