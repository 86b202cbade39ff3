"""Quality evaluation: replay a real dataset as a sequential edit stream and measure edit quality.

After every ``--every`` edits (and after the last) the harness reports, for the edits applied so far:

* ``es_tf`` / ``es_em``: edit success, teacher-forced token accuracy of the target / free-generation
  exact match (greedy; the continuation must equal the target and end at a word boundary);
* ``gen_tf`` / ``gen_em``: the same on the held-out rephrases (never shown to the editor);
* ``chat_gen`` / ``chat_loc`` (melo methods, free generation): the held-out rephrase asked as the
  user message of the model's chat template (without its ``Q: ... A:`` wrapper) and the reply
  contains the target; locality probes asked the same way whose reply is unchanged from the
  unedited model's;
* ``loc_tf`` / ``loc_em``: locality, whether out-of-scope outputs are unchanged from the unedited
  model. ``loc_tf`` is the teacher-forced token accuracy on the *base model's own* greedy
  continuation, divided per probe by the base model's accuracy on it (below 1 only because targets
  end in EOS and a truncated continuation does not) and capped at 1: 1.0 = every token unchanged.
  ``loc_em`` is the fraction of greedy continuations that are identical to the base model's;
* ``clusters``, ``conflicts``, ``forgotten``: the editor's counters (MELO Figure 3 analogues);
* ``not_learned`` (melo methods): edits the trainer could not learn within its budget, which keep
  no key (the base model answers them);
* classification streams: ``es`` = accuracy on the edits so far, ``loc`` = fraction of dev
  predictions unchanged, ``dev_acc`` = dev accuracy, and prequential accuracy ``preq_*``: each next
  edit-pool case scored before it is edited, beside the unedited classifier (melo_eval/prequential.py);
* the hallucination stream: perplexities (``es_ppl`` of the batch just edited, ``err_ppl`` of all
  edits so far, ``arr_ppl`` of the accurate sentences), as GRACE and MELO report, and ``loc_ppl``
  of unedited Wikipedia text (stand-in for GRACE's OpenWebText; melo_eval.datasets.hallucination_stream).

Outputs ``metrics.json``, ``table.md`` and PNG plots in ``--out``. The command line (``melo eval``)
is melo_eval/cli.py; the daemon-pipeline replay (``--daemon``) is melo_eval/quality_daemon.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from melo_eval import datasets, prequential
from melo_eval.datasets import EditCase, Stream
from melo_eval.methods import EditMethod
from melo_eval.tables import markdown_table
from melo_runtime.chat import question_of
from melo_runtime.presets import preset_for

STREAMS = ("zsre", "counterfact", "hallucination", "scotus", "huffpost")


# -- stream and method construction ---------------------------------------------------------------


def build_stream(args: argparse.Namespace, base: EditMethod | None = None, tokenizer=None,
                 max_tokens: int = 256) -> Stream:
    """The stream named by ``--dataset`` (label-shift needs the base classifier to find errors).

    Label-shift texts are cut to ``max_tokens`` tokens of ``tokenizer`` (the editor's
    ``max_length_tokens``), the part the base head was fitted on.
    """
    if args.dataset == "zsre":
        return datasets.zsre_stream(args.data_dir, args.n_edits, args.n_locality, reserved=args.reserved)
    if args.reserved and args.dataset != "counterfact":
        raise ValueError(f"--reserved exists for zsre and counterfact only, not {args.dataset!r}")
    if args.dataset == "counterfact":
        stream = datasets.counterfact_stream(args.data_dir, args.n_edits, reserved=args.reserved)
        stream.locality = stream.locality[: args.n_locality]
        return stream
    if args.dataset == "hallucination":
        stream = datasets.hallucination_stream(args.data_dir, args.n_edits)
        stream.retention = stream.retention[: args.n_locality]
        stream.locality = stream.locality[: args.n_locality]
        return stream
    if base is None:
        raise ValueError("label-shift streams need the base classifier to pick misclassified items")
    data = datasets.read_label_shift(args.dataset, args.data_dir)
    if tokenizer is not None:
        data = datasets.truncate_label_shift(data, tokenizer, max_tokens)
    return datasets.label_shift_stream(data, base.classify, args.n_edits, args.n_locality)


def melo_config(model, task: str, args: argparse.Namespace):
    """The preset (melo_runtime.presets.preset_for) with the command-line overrides applied."""
    from melo_runtime import MeloConfig

    # melo-paper is the published method: the paper's hidden-state key and training rows.
    key_source = getattr(args, "key_source", None) or ("hidden" if getattr(args, "method", "melo") == "melo-paper" else None)
    config = preset_for(model, task, key_source=key_source)
    overrides = {
        "r_init": args.r_init,
        "iterations": args.iters,
        "lr": args.lr,
        "rank_per_block": args.rank,
        "key_module": args.key_module,
        "target_modules": args.target_modules.split(",") if args.target_modules else None,
        # The preset's own capacity per block unless asked: the micro-batch size is independent of it
        # (the trainer gives a batch ceil(batch / edits_per_block) blocks).
        "edits_per_block": getattr(args, "edits_per_block", None),
        "max_length_tokens": args.max_length_tokens,
        "conflict_policy": args.conflict_policy,
        "seed": args.seed,
    }
    data = {**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
    if args.no_early_stop:
        data["early_stop"] = False
    if getattr(args, "index_not_learned", False):
        data["index_not_learned"] = True
    return MeloConfig.from_dict(data)


def build_method(name: str, model, tokenizer, task: str, args: argparse.Namespace) -> EditMethod:
    """Attach method ``name`` to ``model``; every method sees the same layers MELO would edit."""
    from melo_eval.baselines.grace import GraceCodebook
    from melo_eval.baselines.lora import SequentialLora
    from melo_eval.methods import MeloMethod, paper_config

    config = melo_config(model, task, args)
    if name == "melo":
        return MeloMethod(name, model, tokenizer, config)
    if name == "melo-paper":
        return MeloMethod(name, model, tokenizer, paper_config(config), cache_prefix=False)
    if name == "lora":
        return SequentialLora(
            model, tokenizer, task, config.target_modules, rank=args.rank or 8,
            iterations=config.iterations, lr=config.lr, seed=args.seed, max_length=config.max_length_tokens,
        )
    layer = args.grace_layer or grace_default_layer(config.key_module)
    eps = args.grace_eps if args.grace_eps is not None else 1.0  # replaced by calibration in main()
    return GraceCodebook(model, tokenizer, task, layer, eps=eps, iterations=args.iters or 100, seed=args.seed,
                         max_length=config.max_length_tokens)


def grace_default_layer(key_module: str) -> str:
    """GRACE wraps one layer; we use the MLP output projection of MELO's key layer."""
    for up, down in ((".mlp.up_proj", ".mlp.down_proj"), (".mlp.c_fc", ".mlp.c_proj")):
        if key_module.endswith(up):
            return key_module[: -len(up)] + down
    return key_module


# -- metrics --------------------------------------------------------------------------------------


def exact_match(generated: str, target: str) -> bool:
    """The continuation starts with the target and the target ends at a word boundary."""
    text, want = generated.strip(), target.strip()
    return text == want or (text.startswith(want) and not text[len(want)].isalnum())


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _exact_rate(generated: Sequence[str], targets: Sequence[str]) -> float | None:
    """Share of greedy continuations that are an exact match of their target."""
    return _mean([float(exact_match(g, t)) for g, t in zip(generated, targets)])


def _target_tokens(tokenizer, targets: Sequence[str]) -> int:
    return max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in targets)


class Evaluator:
    """Measures one method on one stream; holds the base model's reference outputs."""

    def __init__(self, stream: Stream, tokenizer, generation: bool, locality_tokens: int = 8):
        self.stream, self.tokenizer, self.generation = stream, tokenizer, generation
        self.locality_tokens = locality_tokens
        self.base_locality: list[str] = []
        self.base_locality_tf: list[float] = []
        self.base_labels: list[str] = []
        self.base_chat: list[str] = []  # the unedited model's chat replies to the locality probes
        self.details: list[dict] = []  # per held-out rephrase at the latest checkpoint (rephrase_details)

    def record_base(self, method: EditMethod) -> None:
        """Before any edit: the outputs locality compares against."""
        prompts = [p.prompt for p in self.stream.locality]
        if not prompts:
            return
        if self.stream.task == "classify":
            self.base_labels = method.classify(prompts)
        else:
            self.base_locality = method.generate(prompts, self.locality_tokens)
            kept = self._kept_locality()
            self.base_locality_tf = method.score([p for p, _ in kept], [b for _, b in kept]) if kept else []
            if self.generation and hasattr(method, "chat"):
                self.base_chat = method.chat([question_of(p) for p in prompts], self.locality_tokens)

    def _kept_locality(self) -> list[tuple[str, str]]:
        """(prompt, base continuation) for probes whose base continuation is not empty."""
        return [(p.prompt, b) for p, b in zip(self.stream.locality, self.base_locality) if b.strip()]

    def _generation_metrics(self, method: EditMethod, prompts: list[str], targets: list[str]) -> tuple:
        tf, generated = self._per_row(method, prompts, targets)
        return _mean(tf), None if generated is None else _exact_rate(generated, targets)

    def _per_row(self, method: EditMethod, prompts: list[str], targets: list[str]) -> tuple:
        """Teacher-forced accuracy and (with generation) the greedy continuation of every row."""
        tf = method.score(prompts, targets)
        if not self.generation:
            return tf, None
        return tf, method.generate(prompts, _target_tokens(self.tokenizer, targets) + 1)

    def evaluate(self, method: EditMethod, applied: list[EditCase], last_batch: list[EditCase]) -> dict:
        """All metrics for the edits applied so far."""
        row: dict[str, float | int | None] = {"n_edits": len(applied)}
        prompts, targets = [c.prompt for c in applied], [c.target for c in applied]
        if self.stream.task == "classify":
            row["es"] = _mean(method.score(prompts, targets)) if applied else None
            dev = [p.prompt for p in self.stream.locality]
            predicted = method.classify(dev)
            row["loc"] = _mean([float(a == b) for a, b in zip(predicted, self.base_labels)])
            row["dev_acc"] = _mean([float(p == q.target) for p, q in zip(predicted, self.stream.locality)])
        else:
            if applied:
                row["es_tf"], row["es_em"] = self._generation_metrics(method, prompts, targets)
                pairs = [(r, c.target) for c in applied for r in c.rephrases]
                if pairs:
                    tf, generated = self._per_row(method, [p for p, _ in pairs], [t for _, t in pairs])
                    row["gen_tf"] = _mean(tf)
                    if generated is not None:
                        row["gen_em"] = _exact_rate(generated, [t for _, t in pairs])
                        self.details = rephrase_details(method, applied, tf, generated)
                    self._chat(method, pairs, row)
            self._locality(method, row)
            if self.stream.retention or self.stream.name == "hallucination":
                self._perplexities(method, applied, last_batch, row)
        row.update(method.stats())
        return row

    def _chat(self, method: EditMethod, pairs: list[tuple[str, str]], row: dict) -> None:
        """Chat-form generality and locality, for methods that take chat messages."""
        if not self.generation or not hasattr(method, "chat"):
            return
        tokens = _target_tokens(self.tokenizer, [t for _, t in pairs]) + 4
        replies = method.chat([question_of(p) for p, _ in pairs], tokens)
        row["chat_gen"] = _mean([float(t.strip().casefold() in r.casefold()) for r, (_, t) in zip(replies, pairs)])
        if self.base_chat:
            now = method.chat([question_of(p.prompt) for p in self.stream.locality], self.locality_tokens)
            row["chat_loc"] = _mean([float(a == b) for a, b in zip(now, self.base_chat)])

    def _locality(self, method: EditMethod, row: dict) -> None:
        if not self.base_locality:
            return
        kept = self._kept_locality()
        if kept:
            now = method.score([p for p, _ in kept], [b for _, b in kept])
            row["loc_tf"] = _mean([min(1.0, a / b) if b > 0 else 1.0 for a, b in zip(now, self.base_locality_tf)])
        now = method.generate([p.prompt for p in self.stream.locality], self.locality_tokens)
        row["loc_em"] = _mean([float(a == b) for a, b in zip(now, self.base_locality)])

    def _perplexities(self, method: EditMethod, applied: list[EditCase], batch: list[EditCase], row: dict) -> None:
        def ppl(cases_or_probes) -> float | None:
            items = list(cases_or_probes)
            if not items:
                return None
            return _mean(method.perplexity([i.prompt for i in items], [i.target for i in items]))

        row["es_ppl"], row["err_ppl"], row["arr_ppl"] = ppl(batch), ppl(applied), ppl(self.stream.retention)
        if self.stream.name == "hallucination":  # its locality probes are unedited Wikipedia text
            row["loc_ppl"] = ppl(self.stream.locality)


def rephrase_details(method: EditMethod, applied: list[EditCase], tf: list[float], generated: list[str]) -> list[dict]:
    """One record per held-out rephrase: its edit, the greedy answer, and (methods that route) the
    block its edit's own prompt reaches beside the block the rephrase reaches.

    ``miss`` names why a rephrase is not answered: ``None`` (answered), ``"routing"`` (it reaches
    another block or none, so its edit's block never runs) or ``"block"`` (it reaches its edit's
    block and the block does not give the target): the split between the scope decision and the
    block's generalization.
    """
    pairs = [(c, r) for c in applied for r in c.rephrases]
    blocks = getattr(method, "blocks_of", None)
    own = blocks([c.prompt for c in applied]) if blocks else [None] * len(applied)
    own_of = {c.edit_id: b for c, b in zip(applied, own)}
    reached = blocks([r for _, r in pairs]) if blocks else [None] * len(pairs)
    records = []
    for (case, rephrase), score, answer, block in zip(pairs, tf, generated, reached):
        right = exact_match(answer, case.target)
        if right:
            miss = None
        elif not blocks:
            miss = "unknown"  # a method that does not route
        else:
            miss = "block" if block is not None and block == own_of[case.edit_id] else "routing"
        records.append({"edit_id": case.edit_id, "subject": case.subject, "prompt": case.prompt,
                        "target": case.target, "rephrase": rephrase, "answer": answer, "em": right,
                        "tf": score, "edit_block": own_of[case.edit_id], "rephrase_block": block, "miss": miss})
    return records


# -- the replay loop ------------------------------------------------------------------------------


def replay(method: EditMethod, stream: Stream, evaluator: Evaluator, batch_size: int, every: int) -> list[dict]:
    """Apply the stream batch by batch, evaluating at 0, every ``every`` edits, and at the end.

    A label-shift stream's pool items are scored before the batch that edits them (or the next one)
    is applied: the ``preq_*`` columns (melo_eval/prequential.py).
    """
    evaluator.record_base(method)
    rows = [{**evaluator.evaluate(method, [], []), "train_seconds": 0.0}]
    applied: list[EditCase] = []
    train_seconds, next_eval, not_learned = 0.0, every, 0
    batches = [stream.cases[i : i + batch_size] for i in range(0, len(stream.cases), batch_size)]
    preq_items = prequential.schedule(stream.pool, batches) if stream.pool else []
    tally = prequential.Tally()
    progress = tqdm(batches, desc=f"{method.name} on {stream.name}", unit="batch")
    for index, batch in enumerate(progress):
        if preq_items:
            prequential.score_before(method, preq_items[index], tally)
        started = time.perf_counter()
        info = method.apply_batch(batch)
        train_seconds += time.perf_counter() - started
        not_learned += int(info.get("not_learned", 0))
        applied.extend(batch)
        progress.set_postfix(loss=f"{info.get('final_loss', float('nan')):.3f}", edits=len(applied))
        if len(applied) >= next_eval or len(applied) == len(stream.cases):
            started = time.perf_counter()
            row = evaluator.evaluate(method, applied, batch)
            if preq_items:
                row.update(tally.row())
            if "not_learned" in info:
                row["not_learned"] = not_learned
            row.update(train_seconds=train_seconds, eval_seconds=time.perf_counter() - started)
            rows.append(row)
            tqdm.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
            while next_eval <= len(applied):
                next_eval += every
    return rows


# -- reporting -----------------------------------------------------------------------------------

COLUMNS = ("n_edits", "es_tf", "es_em", "gen_tf", "gen_em", "chat_gen", "loc_tf", "loc_em", "chat_loc", "es", "loc", "dev_acc",
           "preq_n", "preq_acc", "preq_base", "preq_acc_edited", "preq_acc_kept", "preq_routed", "es_ppl", "err_ppl", "arr_ppl",
           "loc_ppl", "clusters", "conflicts", "forgotten", "not_learned", "train_seconds")


def quality_table(rows: list[dict], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as a markdown table with only the ``columns`` that have values (floats to 3 decimals)."""
    columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
    cells = [[f"{r[c]:.3f}" if isinstance(r.get(c), float) else r.get(c) for c in columns] for r in rows]
    return markdown_table(columns, cells) + "\n"


def write_report(
    out: Path, args: argparse.Namespace, stream: Stream, rows: list[dict], extra: dict, columns: Sequence[str] = COLUMNS,
    details: Sequence[dict] = (),
) -> None:
    """metrics.json, table.md, the plots and, when given, details.jsonl (rephrase_details of the last checkpoint)."""
    from melo_eval.plots import plot_quality

    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "melo eval " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("melo") else " ".join(sys.argv),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stream": {"name": stream.name, "task": stream.task, "edits": len(stream.cases),
                   "locality": len(stream.locality), "source": stream.source, "reserved": stream.reserved},
        "machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
        **extra,
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "table.md").write_text(quality_table(rows, columns), encoding="utf-8")
    if details:
        with open(out / "details.jsonl", "w", encoding="utf-8") as handle:
            for record in details:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    plot_quality(rows, out, title=f"{args.method} on {stream.name}")
