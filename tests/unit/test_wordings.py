"""The stream's wordings: an edit also trains on earlier edits' wordings of its question."""

import json

import numpy as np
import pytest

from melo_runtime import Edit, MeloEditor
from melo_runtime.scope import ScopeKeys, load_encoder, normalized_subject
from melo_runtime.wordings import HOLE, WordingPool, template_of

EARLIER = [
    ("Q: The star Gliese 876 is part of what constellation? A:", "Gliese 876"),
    ("Q: Which constellation is Delta Serpentis part of? A:", "Delta Serpentis"),  # the new edit's own wording
    ("Q: When was Luna 1 launched? A:", "Luna 1"),  # another question
]
NEW = ("Q: Which constellation is Gliese 638 part of? A:", "Gliese 638")


def _keys(texts_subjects):
    scope = ScopeKeys(load_encoder("minilm-l6"))
    texts = [t for t, _ in texts_subjects]
    subjects = [normalized_subject(s) for _, s in texts_subjects]
    return texts, subjects, scope.edit_keys(texts, subjects)[:, : scope.encoder.dim]


def test_a_new_edit_gets_the_pooled_wordings_of_its_question_with_its_subject_written_in():
    texts, subjects, embeddings = _keys(EARLIER)
    pool = WordingPool(load_encoder("minilm-l6"))
    pool.add(texts, subjects, embeddings)
    assert len(pool) == 3
    pool.add(texts[:1], subjects[:1], embeddings[:1])
    assert len(pool) == 3  # a wording is pooled once
    (new_text,), (new_subject,), (new_embedding,) = _keys([NEW])
    mined = pool.wordings_for(new_text, new_subject, "Gliese 638", new_embedding, radius=0.8, most=6)
    assert mined == ["Q: The star Gliese 638 is part of what constellation? A:"]
    assert pool.wordings_for(new_text, new_subject, "Gliese 638", new_embedding, radius=0.8, most=0) == []
    assert pool.wordings_for(new_text, "", "", new_embedding, radius=0.8, most=6) == []  # no subject: nothing
    # Restored from its stored form, the pool embeds its questions again and finds the same.
    restored = WordingPool.from_list(load_encoder("minilm-l6"), json.loads(json.dumps(pool.to_list())))
    assert restored.wordings_for(new_text, new_subject, "Gliese 638", new_embedding, radius=0.8, most=6) == mined
    with pytest.raises(ValueError, match="not \\[template, clause\\]"):
        WordingPool.from_list(load_encoder("minilm-l6"), [["only one"]])


def test_template_of_cuts_the_subject_out_or_says_none():
    assert template_of("Q: Which constellation is Gliese 638 part of? A:", "gliese 638") == (
        f"Q: Which constellation is {HOLE} part of? A:"
    )
    assert template_of("Q: Which constellation is it part of? A:", "gliese 638") is None
    assert template_of("anything", "") is None


def _training_rows(editor, edit):
    """The rows ``apply_batch([edit])`` would train, nothing trained."""
    rows = editor._validate([edit])  # noqa: SLF001
    return editor._training_rows(rows, editor._edit_keys(rows))  # noqa: SLF001


def test_the_editor_trains_on_stream_wordings_keeps_them_in_its_snapshot_and_not_when_off(make_editor):
    from melo_runtime.tiny import tiny_model

    editor = make_editor("llama", index_not_learned=True, iterations=1, max_iterations=1, retry_rounds=0)
    assert editor.config.train_stream_wordings > 0  # the scope preset's default
    editor.apply_batch([Edit(f"e{i}", text, " Hercules", subject=s) for i, (text, s) in enumerate(EARLIER)])
    new = Edit("new", NEW[0], " Hercules", subject=NEW[1])
    rows = _training_rows(editor, new)
    extra = [r.text for r in rows if not r.indexed and r.text.startswith("Q:")]
    assert extra == ["Q: The star Gliese 638 is part of what constellation? A:"]
    files = editor.export_files()
    assert len(json.loads(files["scope.json"])["wordings"]) == 3
    model, tokenizer = tiny_model("llama")
    loaded = MeloEditor.from_files(files, model, tokenizer)
    again = _training_rows(loaded, new)
    assert [r.text for r in again] == [r.text for r in rows]
    off = make_editor("llama", index_not_learned=True, iterations=1, max_iterations=1, retry_rounds=0, train_stream_wordings=0)
    off.apply_batch([Edit(f"e{i}", text, " Hercules", subject=s) for i, (text, s) in enumerate(EARLIER)])
    assert "wordings" not in json.loads(off.export_files()["scope.json"])
    assert all(r.indexed or not r.text.startswith("Q:") for r in _training_rows(off, new))


def test_config_rejects_out_of_range_stream_wordings(make_editor):
    import dataclasses

    config = make_editor("llama").config
    with pytest.raises(ValueError, match="train_stream_wordings=17"):
        dataclasses.replace(config, train_stream_wordings=17)
    with pytest.raises(ValueError, match="stream_wordings_radius=0"):
        dataclasses.replace(config, stream_wordings_radius=0)
    assert np.isfinite(config.stream_wordings_radius)
