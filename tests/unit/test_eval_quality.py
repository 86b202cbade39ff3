"""The quality harness: metrics, the replay loop and its report, on tiny models."""

import json

import torch

from melo_eval import cli, lm, quality
from melo_eval.baselines.lora import SequentialLora
from melo_eval.baselines.replay import frozen_prefix, layers_below
from melo_eval.datasets import EditCase, Probe, Stream
from melo_runtime.tiny import tiny_model

TARGETS = ["model.layers.4.mlp.down_proj", "model.layers.5.mlp.down_proj"]


def _stream() -> Stream:
    cases = [
        EditCase(f"e{i}", f"Q: fact number {i}? A:", f" ans{i}", rephrases=(f"Q: the fact {i}? A:",))
        for i in range(4)
    ]
    return Stream("toy", "generate", cases, locality=[Probe("Q: something else? A:", " x")])


def test_exact_match_needs_the_whole_target_at_a_word_boundary():
    assert quality.exact_match(" Paris\nQ:", " Paris")
    assert quality.exact_match("Paris", " Paris")
    assert not quality.exact_match(" Parisian", " Paris")
    assert not quality.exact_match(" Par", " Paris")


def test_frozen_prefix_replay_gives_the_same_loss_as_full_recomputation():
    model, tokenizer = tiny_model("llama")
    batch = lm.encode_pairs(tokenizer, ["Q: a? A:", "Q: bb? A:"], [" x", " yy"])
    full = lm.batch_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
    frozen = layers_below(model, TARGETS)
    assert len(frozen) == 4
    with frozen_prefix(frozen):
        first = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        second = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.equal(first, second)
    assert torch.allclose(lm.batch_loss(second, batch.labels), full)
    assert "forward" not in frozen[0].__dict__  # the model is restored on exit


def test_replay_reports_base_row_then_every_k_edits_and_the_end(tmp_path):
    model, tokenizer = tiny_model("llama")
    method = SequentialLora(model, tokenizer, "generate", TARGETS, rank=4, iterations=30)
    stream = _stream()
    evaluator = quality.Evaluator(stream, tokenizer, generation=True)
    rows = quality.replay(method, stream, evaluator, batch_size=2, every=3)
    assert [r["n_edits"] for r in rows] == [0, 4]
    base, last = rows
    assert base["loc_em"] == 1.0  # before any edit the model is the base model
    assert last["es_tf"] > 0.5 and last["gen_tf"] is not None
    args = cli.parse_args(["--method", "lora", "--out", str(tmp_path)])
    quality.write_report(tmp_path, args, stream, rows, {"backbone": "tiny-llama"})
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["rows"][-1]["n_edits"] == 4
    assert "| n_edits |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_quality_table_shows_only_columns_with_values():
    table = quality.quality_table([{"n_edits": 0, "es_tf": None, "loc_em": 1.0}, {"n_edits": 10, "es_tf": 0.5}])
    assert table.splitlines()[0] == "| n_edits | es_tf | loc_em |"
    assert "| 10 | 0.500 |  |" in table


def test_melo_overrides_reach_the_editor_config():
    model, _ = tiny_model("llama")
    args = cli.parse_args(["--conflict-policy", "split", "--max-length-tokens", "512", "--r-init", "2.5",
                               "--batch-size", "7", "--edits-per-block", "3"])
    config = quality.melo_config(model, "generate", args)
    assert (config.conflict_policy, config.max_length_tokens, config.r_init, config.edits_per_block) == (
        "split", 512, 2.5, 3)
    assert quality.melo_config(model, "generate", cli.parse_args([])).conflict_policy == "split"  # the scope preset
    # The micro-batch size does not change the preset's capacity per block.
    preset = quality.melo_config(model, "generate", cli.parse_args([])).edits_per_block
    assert quality.melo_config(model, "generate", cli.parse_args(["--batch-size", "10"])).edits_per_block == preset


def test_melo_eval_runs_on_a_checkpoint_directory_in_bfloat16(tmp_path):
    from tests.checkpoints import save_checkpoint

    checkpoint = save_checkpoint("qwen2", tmp_path / "qwen2")
    code = cli.main(["--backbone", str(checkpoint), "--dtype", "bfloat16", "--n-edits", "2", "--batch-size", "2",
                     "--every", "2", "--n-locality", "2", "--no-generation", "--iters", "3", "--threads", "1",
                     "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert code == 0 and report["rows"][-1]["n_edits"] == 2
    assert report["dtype"] == "bfloat16"


def test_details_say_per_rephrase_whether_routing_or_the_block_missed(tmp_path):
    from melo_eval.methods import MeloMethod
    from melo_runtime.presets import preset_for

    model, tokenizer = tiny_model("llama")
    config = preset_for(model, "generate")
    method = MeloMethod("melo", model, tokenizer, config)
    stream = _stream()
    evaluator = quality.Evaluator(stream, tokenizer, generation=True)
    rows = quality.replay(method, stream, evaluator, batch_size=2, every=4)
    details = evaluator.details
    assert [d["rephrase"] for d in details] == [r for c in stream.cases for r in c.rephrases]
    assert abs(sum(d["em"] for d in details) / len(details) - rows[-1]["gen_em"]) < 1e-9
    blocks = method.blocks_of([c.prompt for c in stream.cases])
    for record, case in zip(details, stream.cases):
        assert record["edit_block"] == blocks[stream.cases.index(case)]
        reached = method.blocks_of([record["rephrase"]])[0]
        assert record["rephrase_block"] == reached
        want = None if record["em"] else ("block" if reached is not None and reached == record["edit_block"] else "routing")
        assert record["miss"] == want
    args = cli.parse_args(["--out", str(tmp_path)])
    quality.write_report(tmp_path, args, stream, rows, {}, details=details)
    lines = (tmp_path / "details.jsonl").read_text().splitlines()
    assert [json.loads(line)["edit_id"] for line in lines] == [d["edit_id"] for d in details]
