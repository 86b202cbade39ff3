"""Scope keys: subjects found, masked and coded; paraphrases in, neighbours and other questions out."""

import numpy as np
import pytest

from melo_runtime.chat import chat_inputs

from melo_runtime.scope import (
    SUBJECT_PLACEHOLDER,
    ScopeKeys,
    SubjectIndex,
    infer_subject,
    load_encoder,
    mentions,
    normalized_subject,
    mask_subject,
    subject_clause,
    subject_code,
)
from melo_runtime import Edit, MeloEditor
from melo_runtime.vectordb import VectorDB

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


@pytest.mark.parametrize(
    ("prompt", "subject"),
    [
        ("Q: What is the product made by UniFirst? A:", "UniFirst"),
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux"),
        ("Q: In which year was the University of Cambridge founded? A:", "University of Cambridge"),
        ("Q: Of what series is Luna 1 a part of? A:", "Luna 1"),
        ("What is the capital of France?", "France"),
        ("Tesla's chief executive officer is", "Tesla"),
        ("Nintendo's most famous character is", "Nintendo"),
        ("The Beatles' first album was", "Beatles"),
        ("The iPhone is made by", "iPhone"),
        ("Q: Which company sells eBay? A:", "eBay"),
    ],
)
def test_subject_is_inferred_as_the_longest_named_run_skipping_question_words(prompt, subject):
    assert infer_subject(prompt) == subject


def test_a_prompt_without_a_named_entity_has_no_inferred_subject():
    assert infer_subject("what year did the war end?") is None


def test_mentions_tolerates_case_accents_plurals_and_possessives():
    assert mentions("Rudolf Těsnohlídek", "What was the cause of the death of rudolf tesnohlideks?")
    assert mentions("Peoples Drug", "What year did Peoples Drugs end?")
    assert mentions("UniFirst", "What is UniFirst's main product?")
    assert not mentions("Danielle Darrieux", "Michel Rocard is a native speaker of")
    assert not mentions("Luna 1", "When was Luna 2 launched?")


def test_subject_clause_drops_the_lead_in_and_masks_the_subject():
    text = "Two species have been recorded in Kentucky. Hamid Algar writes in"
    assert subject_clause(text, "hamid algar") == f"{SUBJECT_PLACEHOLDER} writes in"
    assert subject_clause(text, "") == text  # no subject: the whole text


def test_masking_keeps_the_function_words_after_the_subject():
    # A function word joins two subject words into one run, but one after the subject's last word
    # is part of the question: "MSN Music, by" must not embed as a bare placeholder.
    assert mask_subject("MSN Music, by", "msn music") == f"{SUBJECT_PLACEHOLDER}, by"
    assert mask_subject("Which country is Ghana in?", "ghana") == f"Which country is {SUBJECT_PLACEHOLDER} in?"
    assert mask_subject("Leonardo da Vinci painted the", "leonardo da vinci") == f"{SUBJECT_PLACEHOLDER} painted the"
    assert mask_subject("Leonardo da Vinci", "leonardo vinci") == SUBJECT_PLACEHOLDER


def test_subject_codes_are_fixed_per_subject_and_far_apart():
    assert np.array_equal(subject_code("luna 1"), subject_code("luna 1"))
    assert not subject_code("").any()
    assert np.linalg.norm(subject_code("luna 1") - subject_code("luna 2")) > 2.0


def test_subject_index_finds_every_known_subject_a_query_names():
    index = SubjectIndex(["danielle darrieux", "unifirst", "luna 1"])
    assert index.find("Where Danielle Darrieux is from, people speak") == ["danielle darrieux"]
    assert index.find("Tell me about UniFirst's uniforms and Luna 1") == ["luna 1", "unifirst"]
    assert index.find("Michel Rocard is a native speaker of") == []


@pytest.fixture(scope="module")
def scoped_db():
    """A vector DB of three real facts keyed by the shipped MiniLM scope key (radius of the preset)."""
    from melo_runtime.presets import SCOPE_R_INIT

    facts = [
        ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
        ("Q: What is the product made by UniFirst? A:", "unmanned aircraft", "UniFirst"),
        ("Q: Of what series is Luna 1 a part of? A:", "Luna programme", "Luna 1"),
    ]
    subjects = [normalized_subject(s) for _, _, s in facts]
    scope = ScopeKeys(load_encoder("minilm-l6")).with_subjects(subjects)
    db = VectorDB(scope.dim, SCOPE_R_INIT, conflict_policy="split")
    db.insert(scope.edit_keys([p for p, _, _ in facts], subjects), [t for _, t, _ in facts], [0, 0, 0], ["dd", "uf", "luna"])
    return scope, db


def _routed(scope, db, texts):
    return [None if hit is None else hit.edit_id for hit in scope.search(db, texts)]


def test_held_out_paraphrases_reach_their_edit_and_neighbours_do_not(scoped_db):
    scope, db = scoped_db
    assert _routed(scope, db, [
        "Where Danielle Darrieux is from, people speak the language of",
        "What will be the product of UniFirst?",
        "Which series does Luna 1 belong to?",
    ]) == ["dd", "uf", "luna"]
    assert _routed(scope, db, [
        "Michel Rocard is a native speaker of",  # same relation, another subject
        "Q: What is the product made by Siemens? A:",
        "When was Luna 1 launched?",  # same subject, another question
        "who wrote the big lebowski",
    ]) == [None, None, None, None]



def test_a_chat_follow_up_that_names_nobody_is_routed_by_the_subject_named_earlier(scoped_db):
    scope, db = scoped_db
    conversation = [
        {"role": "user", "content": "Who is Danielle Darrieux?"},
        {"role": "assistant", "content": "A French actress and singer."},
        {"role": "user", "content": "What is her mother tongue?"},
    ]
    _, questions = chat_inputs(None, [conversation])
    assert questions == ["What is her mother tongue?"] and questions[0].context == "Who is Danielle Darrieux?"
    assert _routed(scope, db, questions) == ["dd"]
    assert _routed(scope, db, ["What is her mother tongue?"]) == [None]  # asked alone: about whom?
    # The context lends a subject only to a question that names none, and the radius still applies.
    other = [*conversation[:2], {"role": "user", "content": "What is the capital of France?"}]
    switched = [*conversation[:2], {"role": "user", "content": "When was Luna 1 launched?"}]
    assert _routed(scope, db, chat_inputs(None, [other, switched])[1]) == [None, None]


def test_a_scope_editor_answers_the_edit_asked_as_a_chat_and_leaves_other_chats_alone(make_editor):
    editor = make_editor("llama", learnable=True)
    editor.tokenizer.chat_template = CHAT_TEMPLATE
    result = editor.apply_batch([Edit("uf", "Q: What is the product made by UniFirst? A:", " uniform", subject="UniFirst")])
    assert result.learned == {"uf": True}
    asked = [{"role": "user", "content": "What is the product made by UniFirst?"}]
    other = [{"role": "user", "content": "What is the product made by Siemens?"}]
    assert [r is not None for r in editor.route(["What will be the product of UniFirst?", other[0]["content"]])] == [True, False]
    edited, untouched = editor.generate([asked, other], max_new_tokens=8)
    assert edited == "uniform"  # trained in chat form: the reply is the target, then end of turn
    base = make_editor("llama", key_source="hidden")
    base.tokenizer.chat_template = CHAT_TEMPLATE
    assert untouched == base.generate([other], max_new_tokens=8)[0]


def test_generate_rejects_a_chat_that_does_not_end_with_a_user_question(make_editor):
    editor = make_editor("llama")
    editor.tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="must end with a user message"):
        editor.generate([[{"role": "assistant", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"role='robot'"):
        editor.generate([[{"role": "robot", "content": "hi"}]])


def test_scope_snapshot_reloads_with_its_subjects_and_routes_identically(make_editor):
    from melo_runtime.tiny import tiny_model

    editor = make_editor("gpt2", index_not_learned=True)  # routing only: index the key learned or not
    editor.apply_batch([Edit("dd", "The mother tongue of Danielle Darrieux is", " English", subject="Danielle Darrieux")])
    files = editor.export_files()
    model, tokenizer = tiny_model("gpt2")
    loaded = MeloEditor.from_files(files, model, tokenizer)
    queries = ["Danielle Darrieux's mother tongue is", "The mother tongue of Michel Rocard is"]
    assert loaded.route(queries) == editor.route(queries)
    assert loaded.route(queries)[0] is not None and loaded.route(queries)[1] is None
    assert loaded.export_files() == files


def test_a_snapshot_keyed_by_another_encoder_is_refused_naming_both(make_editor):
    import json

    from melo_runtime.tiny import tiny_model

    files = make_editor("gpt2").export_files()
    scope = json.loads(files["scope.json"])
    scope["encoder"]["weights_sha256"] = "0" * 64
    scope["encoder"]["name"] = "my-encoder"
    files["scope.json"] = json.dumps(scope).encode()
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(ValueError, match="made by sentence encoder 'my-encoder'.*loads 'minilm-l6'"):
        MeloEditor.from_files(files, model, tokenizer)


def test_snapshots_written_before_scope_keys_load_with_the_paper_key(make_editor):
    import json

    from melo_runtime.tiny import tiny_model

    editor = make_editor("gpt2", key_source="hidden", index_not_learned=True)
    editor.apply_batch([Edit("a", "The capital of France is", " Lyon")])
    files = editor.export_files()
    config = json.loads(files["config.json"])
    # A hidden-key editor writes the config.json of a snapshot made before these fields existed.
    assert not {"key_source", "key_encoder", "train_chat_form", "train_context_prefixes"} & set(config)
    model, tokenizer = tiny_model("gpt2")
    loaded = MeloEditor.from_files(files, model, tokenizer)
    assert loaded.config.key_source == "hidden" and "scope.json" not in files
    assert loaded.route(["The capital of France is"]) == editor.route(["The capital of France is"])


def test_context_prefixes_are_written_by_the_base_model_and_train_extra_rows_that_do_not_decide_learned():
    from melo_runtime import augment
    from melo_runtime.encoding import TextEncoder
    from melo_runtime.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    prefixes = augment.context_prefixes(model, tokenizer, TextEncoder(model, tokenizer), 2)
    assert len(prefixes) == 2 and all(p.endswith(". ") and len(p) > 4 for p in prefixes)
    assert prefixes[0].startswith("The") and prefixes[1].startswith("Therefore")
    assert prefixes == augment.context_prefixes(model, tokenizer, TextEncoder(model, tokenizer), 2)  # deterministic
    rows = [augment.TrainingRow("e", "Q: Who founded Zorblax? A:", " Mira", indexed=True)]
    # No chat template (a base model): no chat-form row.
    assert [r.indexed for r in augment.expand(rows, tokenizer, chat_form=True, prefixes=[])] == [True]
    tokenizer.chat_template = CHAT_TEMPLATE
    expanded = augment.expand(rows, tokenizer, chat_form=True, prefixes=prefixes)
    assert [r.indexed for r in expanded] == [True, False, False, False]
    assert expanded[1].text.endswith("<s>assistant: ") and "user: Who founded Zorblax?</s>" in expanded[1].text
    assert expanded[1].target == "Mira"  # the chat reply: the target without its leading space
    assert [r.text for r in expanded[2:]] == [p + rows[0].text for p in prefixes]


def test_question_forms_ask_the_edit_in_plain_question_layouts_other_than_its_own():
    from melo_runtime import augment
    from melo_runtime.tiny import tiny_model

    _, tokenizer = tiny_model("llama")
    cloze = [augment.TrainingRow("c", "The capital of Zorblax is", " Mira", indexed=True)]
    # A base model (no chat template of its own) completes text: no question-form rows.
    assert augment.expand(cloze, tokenizer, chat_form=False, prefixes=[], question_forms=True) == cloze
    tokenizer.chat_template = CHAT_TEMPLATE
    expanded = augment.expand(cloze, tokenizer, chat_form=False, prefixes=[], question_forms=True)
    assert [(r.text, r.target, r.indexed) for r in expanded[1:]] == [
        ("Q: The capital of Zorblax is A:", " Mira", False),
        ("Question: The capital of Zorblax is\nAnswer:", " Mira", False),
    ]
    # A prompt already in one of the layouts is not repeated; the other layout asks its question.
    asked = [augment.TrainingRow("q", "Q: Who founded Zorblax? A:", " Mira", indexed=True)]
    expanded = augment.expand(asked, tokenizer, chat_form=False, prefixes=[], question_forms=True)
    assert [r.text for r in expanded] == ["Q: Who founded Zorblax? A:", "Question: Who founded Zorblax?\nAnswer:"]
    assert augment.expand(asked, tokenizer, chat_form=False, prefixes=[]) == asked  # off by default


def test_config_json_leaves_out_later_fields_only_at_their_defaults():
    import dataclasses

    from melo_runtime.config import LATER_FIELD_DEFAULTS, MeloConfig

    defaults = {f.name: f.default for f in dataclasses.fields(MeloConfig)}
    assert {name: defaults[name] for name in LATER_FIELD_DEFAULTS} == LATER_FIELD_DEFAULTS
    config = MeloConfig(task="generate", key_module="k", target_modules=["t"], rank_per_block=2, r_init=1.0,
                        edits_per_block=4, key_source="scope", key_encoder="minilm-l6")
    data = config.to_dict()
    assert data["key_source"] == "scope" and "train_chat_form" not in data and "max_iterations" not in data
    assert MeloConfig.from_dict(data) == config


def test_long_inputs_are_embedded_by_their_end_so_a_shared_opening_does_not_merge_them():
    encoder = load_encoder("minilm-l6")
    opening = "This is a Wikipedia passage about Ada Lovelace. " + "She was a writer and a mathematician. " * 30
    first, second = encoder.encode([opening + "She was born in London.", opening + "She died of cancer in 1852."])
    assert float(np.linalg.norm(first - second)) > 0.2


def test_a_word_that_normalizes_to_several_words_does_not_break_masking():
    # NFKD turns "½" into "1⁄2": two words where the text had one.
    assert subject_clause("Q: Is ½ of UniFirst owned by a bank? A:", "unifirst") == (
        f"Is ½ of {SUBJECT_PLACEHOLDER} owned by a bank?"
    )


def test_the_clause_drops_a_qa_wrapper_so_a_prompt_and_its_chat_question_embed_alike():
    # Without this, "A" after a subject was taken for the article "a" and masked with it.
    assert subject_clause("Q: What is the home ground of Ajax A:", "ajax") == f"What is the home ground of {SUBJECT_PLACEHOLDER}"
    assert subject_clause("Q: Who founded Ajax? A:", "ajax") == subject_clause("Who founded Ajax?", "ajax")


def test_the_subjectless_key_is_embedded_only_once_some_edit_has_no_subject(make_editor):
    import json

    from melo_runtime.tiny import tiny_model

    scope = ScopeKeys(load_encoder("minilm-l6")).with_subjects(["unifirst"])
    keys, rows = scope.query_keys(["What will be the product of UniFirst?", "who wrote the big lebowski"])
    assert not scope.anonymous and rows.tolist() == [0]  # one candidate: the subject the query names
    assert np.allclose(keys[0, -64:], subject_code("unifirst"))
    both = scope.with_subjects([""])
    assert both.anonymous and not scope.anonymous  # a copy: readers of the old one are unaffected
    assert both.query_keys(["What will be the product of UniFirst?", "who wrote the big lebowski"])[1].tolist() == [0, 0, 1]

    editor = make_editor("gpt2", index_not_learned=True)  # routing only
    editor.apply_batch([Edit("anon", "what is the product made by the firm", " uniforms")])  # no named subject
    assert editor.route(["what will be the product made by the firm"])[0] is not None
    files = editor.export_files()
    assert json.loads(files["scope.json"])["anonymous_edits"] is True
    model, tokenizer = tiny_model("gpt2")
    assert MeloEditor.from_files(files, model, tokenizer).route(["what will be the product made by the firm"]) == (
        editor.route(["what will be the product made by the firm"])
    )
    # A scope.json written before the flag existed may hold subject-less edits: they are still searched.
    stored = json.loads(files["scope.json"])
    del stored["anonymous_edits"]
    files["scope.json"] = json.dumps(stored).encode()
    model, tokenizer = tiny_model("gpt2")
    assert MeloEditor.from_files(files, model, tokenizer).route(["what will be the product made by the firm"])[0] is not None
