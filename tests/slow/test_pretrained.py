"""The real offline backbones load from their wheels and behave like the pretrained models they are."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from melo_runtime.backbones import BACKBONES, load_backbone
from melo_runtime.pretrained import (
    backbone_fingerprint,
    load_minilm,
    load_smollm2,
    minilm_dir,
    smollm2_cache_path,
    smollm2_gguf,
)

pytestmark = pytest.mark.slow


def _mean_pooled(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Sentence embeddings the way sentence-transformers builds them for this model: masked mean, L2-normalised."""
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def test_minilm_puts_paraphrases_closer_than_unrelated_sentences():
    model, tokenizer = load_minilm()
    guitar, guitar_again, markets, weather = _mean_pooled(
        model,
        tokenizer,
        [
            "A man is playing a guitar on stage.",
            "Someone performs a song with an acoustic guitar.",
            "Stock markets fell sharply after the interest rate decision.",
            "Heavy snow is expected in the mountains tomorrow.",
        ],
    )
    similar = torch.dot(guitar, guitar_again).item()
    assert similar > torch.dot(guitar, markets).item() + 0.2
    assert similar > torch.dot(guitar, weather).item() + 0.2


def test_minilm_classifier_keeps_pretrained_encoder_and_gets_a_seeded_head():
    encoder, _ = load_minilm()
    classifier, _ = load_minilm(["billing", "shipping", "returns"])
    again, _ = load_minilm(["billing", "shipping", "returns"])
    other_seed, _ = load_minilm(["billing", "shipping", "returns"], seed=1)

    assert classifier.config.id2label == {0: "billing", 1: "shipping", 2: "returns"}
    assert classifier.classifier.out_features == 3
    assert backbone_fingerprint(classifier.bert) == backbone_fingerprint(encoder)
    assert backbone_fingerprint(classifier) == backbone_fingerprint(again)
    assert not torch.equal(classifier.classifier.weight, other_seed.classifier.weight)
    assert not classifier.training


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """A cache directory of this module's own, so the first load must build it from the GGUF file.

    Removed afterwards: pytest keeps recent temp dirs, and each copy is ~520 MB.
    """
    path = tmp_path_factory.mktemp("smollm2-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def smollm2_from_gguf(smollm2_cache):
    return load_smollm2(cache_dir=smollm2_cache)


def test_smollm2_first_load_dequantizes_the_gguf_and_writes_a_safetensors_cache(smollm2_cache, smollm2_from_gguf):
    model, _ = smollm2_from_gguf
    cached = smollm2_cache_path(smollm2_cache)

    assert model.name_or_path == str(smollm2_gguf().parent)
    assert {"model.safetensors", "config.json", "tokenizer.json", "melo-source.json"} <= {
        path.name for path in cached.iterdir()
    }
    assert json.loads((cached / "melo-source.json").read_text())["bytes"] == smollm2_gguf().stat().st_size
    assert [path.name for path in smollm2_cache.iterdir()] == [cached.name]  # no staging leftovers
    assert {type(module).__name__ for name, module in model.named_modules() if name.endswith("_proj")} == {"Linear"}
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576


def test_smollm2_second_load_reads_the_cache_and_gives_identical_weights(smollm2_cache, smollm2_from_gguf):
    first, first_tokenizer = smollm2_from_gguf
    model, tokenizer = load_smollm2(cache_dir=smollm2_cache)

    assert model.name_or_path == str(smollm2_cache_path(smollm2_cache))
    assert backbone_fingerprint(model) == backbone_fingerprint(first)
    assert tokenizer("The capital of France is").input_ids == first_tokenizer("The capital of France is").input_ids


def test_smollm2_completes_the_capital_of_france_with_paris(smollm2_from_gguf):
    model, tokenizer = smollm2_from_gguf
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    continuation = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation


def test_backbone_fingerprint_changes_when_one_weight_changes():
    model, _ = load_minilm()
    before = backbone_fingerprint(model)
    with torch.no_grad():
        model.encoder.layer[5].output.dense.weight[0, 0] += 1e-3
    assert backbone_fingerprint(model) != before


@pytest.mark.parametrize("name", [name for name in BACKBONES if name.startswith("tiny-")])
def test_load_backbone_builds_each_tiny_model_for_its_task(name):
    model, tokenizer = load_backbone(name)
    assert model.can_generate() == (BACKBONES[name] == "generate")
    assert backbone_fingerprint(model) == backbone_fingerprint(load_backbone(name)[0])
    assert tokenizer("hello").input_ids


def test_load_backbone_gives_minilm_a_classifier_head_with_the_callers_labels():
    model, tokenizer = load_backbone("minilm-l6", labels=["spam", "ham"])
    assert model.config.id2label == {0: "spam", 1: "ham"}
    assert model.name_or_path == str(minilm_dir())
    assert tokenizer.tokenize("Hello World") == ["hello", "world"]


def test_load_backbone_reuses_the_smollm2_cache_dir(smollm2_cache, smollm2_from_gguf):
    model, _ = load_backbone("smollm2-135m", cache_dir=smollm2_cache)
    assert model.name_or_path == str(smollm2_cache_path(smollm2_cache))


def test_load_backbone_rejects_unknown_names_listing_the_known_ones():
    with pytest.raises(ValueError, match="backbone 'gpt2-xl' is neither a shipped backbone .*tiny-bert.*minilm-l6.*smollm2-135m"):
        load_backbone("gpt2-xl")


def test_load_backbone_rejects_labels_for_a_generator():
    with pytest.raises(ValueError, match="tiny-gpt2.*takes no labels"):
        load_backbone("tiny-gpt2", labels=["a", "b"])


def test_gguf_file_loads_by_path_as_a_dense_causal_lm_in_the_dtype_asked():
    model, tokenizer = load_backbone(smollm2_gguf(), dtype="bfloat16", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    assert all(type(m).__name__ != "GGUFLinear" for m in model.modules())
    assert tokenizer("Paris").input_ids
