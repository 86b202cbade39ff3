"""The tiny test backbones: every family builds, tokenizes any English text, and is deterministic."""

import hashlib
import subprocess
import sys

import pytest
import torch

from melo_runtime.tiny import FAMILIES, tiny_model


def _weights_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_gives_same_weights_and_other_seed_differs(family):
    first, _ = tiny_model(family)
    again, _ = tiny_model(family)
    other, _ = tiny_model(family, seed=1)
    assert _weights_digest(first) == _weights_digest(again)
    assert _weights_digest(first) != _weights_digest(other)


def test_weights_are_identical_in_a_fresh_process():
    script = (
        "import hashlib, torch\n"
        "from melo_runtime.tiny import tiny_model\n"
        "m, _ = tiny_model('gpt2')\n"
        "d = hashlib.sha256()\n"
        "for n, t in sorted(m.state_dict().items()):\n"
        "    d.update(n.encode()); d.update(t.contiguous().numpy().tobytes())\n"
        "print(d.hexdigest())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    model, _ = tiny_model("gpt2")
    assert out.stdout.strip() == _weights_digest(model)


def test_building_a_model_leaves_the_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_english_text_and_pads(family):
    _, tokenizer = tiny_model(family)
    text = "Who wrote 'The Old Man and the Sea'? Ernest Hemingway, 1952."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    batch = tokenizer([text, "Hi"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, len(text))
    assert batch.attention_mask[1].sum().item() == 2
    assert tokenizer.pad_token_id == 0


def test_bert_classifier_carries_the_given_labels():
    model, _ = tiny_model("bert", labels=["sports", "politics", "science"])
    assert model.config.id2label == {0: "sports", 1: "politics", 2: "science"}
    assert model.classifier.out_features == 3
    assert model.config.num_hidden_layers == 12


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_runs_on_a_padded_batch(family):
    model, tokenizer = tiny_model(family)
    batch = tokenizer(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        if family == "t5":
            logits = model(**batch, decoder_input_ids=torch.zeros(2, 1, dtype=torch.long)).logits
        else:
            logits = model(**batch).logits
    assert torch.isfinite(logits).all()


def test_unsupported_family_or_task_is_rejected_with_the_value():
    with pytest.raises(ValueError, match="'opt'"):
        tiny_model("opt")
    with pytest.raises(ValueError, match="'generate'"):
        tiny_model("bert", task="generate")


def test_a_tiny_model_is_the_same_while_another_thread_draws_random_numbers():
    import threading

    import torch

    from melo_runtime.pretrained import backbone_fingerprint
    from melo_runtime.rng import GLOBAL_RNG_LOCK

    expected = backbone_fingerprint(tiny_model("gpt2")[0])
    stop = threading.Event()

    def draw() -> None:  # what from_pretrained does in a writer thread: initialise, i.e. draw
        while not stop.is_set():
            with GLOBAL_RNG_LOCK:
                torch.rand(256)

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        assert [backbone_fingerprint(tiny_model("gpt2")[0]) for _ in range(3)] == [expected] * 3
    finally:
        stop.set()
        thread.join(5)
