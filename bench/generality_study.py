"""Generality study: which key and which training rows let an edit hold under rewording, on SmolLM2.

Each variant replays the same development edits (batches of 10) through its own MeloEditor over one
shared SmolLM2-135M-Instruct and reports, after the last batch (greedy decoding everywhere):

* ``es``: rewrite exact match on the edit prompts;
* ``gen``: exact match on the held-out rephrases (never shown to the editor);
* ``gen_routed``: the share of held-out rephrases routed to their own edit's block;
* ``gen|routed``: exact match among those rephrases (generality given correct routing);
* ``chat``: the held-out rephrase asked as a chat user message (no ``Q: ... A:`` wrapper): the reply
  contains the target;
* ``loc`` / ``chat_loc``: locality probes (NQ questions; CounterFact neighbourhood prompts) whose
  greedy output is unchanged from the unedited model, as prompts and as chat messages;
* ``same`` / ``same_routed``: CounterFact only, the rephrases labelled ``same`` (they ask the edited
  question; bench/data/counterfact_rephrase_labels.jsonl): exact match, and routed to their edit;
* ``other_target``: CounterFact rephrases labelled ``other`` answered with the edit's target (lower
  is better);
* ``other_kept``: questions about an edited subject that ask something else, whose greedy output is
  unchanged from the unedited model (CounterFact's ``other`` rephrases; for zsRE the next edit's
  rephrase with this edit's subject written in, an upper bound on harm: a few ask the same thing);
* ``train_s``: seconds spent in apply_batch.

Variants: ``paper`` (the former preset: hidden-state key, prompt rows only), ``scope`` (scope key,
prompt rows only), ``scope+chat`` (and chat-form rows), ``+prefix``/``+prefix2`` (and 4 / 2 context
prefixes), ``+margin`` (and ``margin_loss`` 0.1, the shipped preset), ``+6layers`` (blocks on the top 6
layers), ``+mined``/``+mined08`` (and the stream's wordings of each question, melo_runtime/wordings.py;
``--offset N`` pools the first N prompts first), ``+qforms`` (and the question in plain question
layouts, melo_runtime/augment.py; the shipped preset), ``+noise03``/``+noise1`` (and hidden-state
noise while training). Variants without ``margin`` train with ``margin_loss`` 0, variants without
``mined`` without stream wordings and variants without ``qforms`` without question forms, whatever
the preset ships. ``--delta-scales`` serves each trained variant
with its deltas scaled, ``--radius-deltas`` with every cluster's radius widened.

    python -m bench.generality_study --dataset zsre --n-edits 50
"""

from __future__ import annotations

import argparse
import contextlib
import os
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.rephrase_labels import LABELS, label_of, read_jsonl
from bench.scope_study import same_subject_probes
from melo_eval import datasets
from melo_eval.quality import exact_match
from melo_runtime import MeloEditor
from melo_runtime.backbones import load_backbone
from melo_runtime.chat import question_of
from melo_runtime.presets import SCOPE_PRESET, preset_for
from melo_runtime.edits import Edit

def _scope(
    chat: bool, prefixes: int = 0, margin: float = 0.0, wordings: tuple[int, float] = (0, 0.8), questions: bool = False
) -> dict:
    """A scope-key variant; every knob the study varies is set here, not inherited from the preset."""
    return {**SCOPE_PRESET, "train_chat_form": chat, "train_context_prefixes": prefixes, "margin_loss": margin,
            "train_stream_wordings": wordings[0], "stream_wordings_radius": wordings[1],
            "train_question_forms": questions}


VARIANTS = {
    "paper": {"key_source": "hidden", "key_encoder": "", "train_chat_form": False, "train_context_prefixes": 0,
              "margin_loss": 0.0},
    "scope": _scope(chat=False),
    "scope+chat": _scope(chat=True),
    "scope+chat+prefix": _scope(chat=True, prefixes=4),
    "scope+chat+prefix2": _scope(chat=True, prefixes=2),
    "scope+chat+margin": _scope(chat=True, margin=0.1),
    "scope+chat+prefix2+margin": _scope(chat=True, prefixes=2, margin=0.1),
    "scope+chat+6layers": _scope(chat=True),
    "scope+chat+margin+mid": _scope(chat=True, margin=0.1),
    "scope+chat+margin+mid1": _scope(chat=True, margin=0.1),
    "scope+chat+margin+lr2": {**_scope(chat=True, margin=0.1), "lr": 2e-2},
    "scope+chat+margin03": _scope(chat=True, margin=0.03),
    "scope+chat+margin01": _scope(chat=True, margin=0.01),
    # Fewer edits per block (a routed rephrase can wake a sibling edit of its block, measured on
    # CounterFact): one edit per block at rank 1, and five per block at rank 2 (today's parameters).
    "scope+chat+margin+edit1r1": {**_scope(chat=True, margin=0.1), "edits_per_block": 1, "rank_per_block": 1},
    "scope+chat+margin+edit1r1top": {**_scope(chat=True, margin=0.1), "edits_per_block": 1, "rank_per_block": 1},
    "scope+chat+margin+edit5r2": {**_scope(chat=True, margin=0.1), "edits_per_block": 5, "rank_per_block": 2},
    # Also trained on the stream's own wordings of the same question (melo_runtime/wordings.py): up
    # to 4 / 6 earlier prompts whose masked question is within 0.5 / 0.8 (mined08: the preset before question forms).
    "scope+chat+margin+mined": _scope(chat=True, margin=0.1, wordings=(4, 0.5)),
    "scope+chat+margin+mined08": _scope(chat=True, margin=0.1, wordings=(6, 0.8)),
    # And on the question in the plain layouts "Q: ... A:" and "Question: ...\nAnswer:" (now the preset).
    "scope+chat+margin+mined08+qforms": _scope(chat=True, margin=0.1, wordings=(6, 0.8), questions=True),
    # Trained with Gaussian noise (this fraction of each token's RMS) on the hidden states that enter
    # the first block layer, on every replayed training pass (a reworded question moves them).
    "scope+chat+margin+noise03": _scope(chat=True, margin=0.1),
    "scope+chat+margin+noise1": _scope(chat=True, margin=0.1),
}
NOISE = {"scope+chat+margin+noise03": 0.03, "scope+chat+margin+noise1": 0.1}
# Mined variants: (the distance within which another prompt's question counts, templates at most).
# Variants whose blocks sit on more of the top layers than the preset's (the same projections).
LORA_LAYERS = {"scope+chat+6layers": 6, "scope+chat+margin+edit1r1top": 1}
# Variants whose blocks sit on middle layers instead (first layer, count; the same projections), where
# ROME/MEMIT find a fact recalled at the subject's tokens whatever the wording around it; the
# paper's key module (unused by the scope key) moves below them.
MID_LAYERS = {"scope+chat+margin+mid": (9, 3), "scope+chat+margin+mid1": (10, 1)}


def _layer_index(name: str) -> int:
    """Position of the layer number among the dot-separated parts of ``name`` (``model.layers.29.mlp`` -> 2)."""
    return next(i for i, part in enumerate(name.split(".")) if part.isdigit())


def layer_targets(targets: list[str], first: int, count: int) -> list[str]:
    """The preset's target projections on layers ``first`` .. ``first + count - 1``."""
    parsed = [name.split(".") for name in targets]
    index = _layer_index(targets[0])
    suffixes = sorted({".".join(p[index + 1 :]) for p in parsed})
    stem = ".".join(parsed[0][:index])
    return [f"{stem}.{layer}.{suffix}" for layer in range(first, first + count) for suffix in suffixes]


def top_layer_targets(targets: list[str], layers: int) -> list[str]:
    """The preset's target projections on the top ``layers`` layers (names like ``model.layers.29.mlp.up_proj``)."""
    index = _layer_index(targets[0])
    top = max(int(name.split(".")[index]) for name in targets)
    return layer_targets(targets, top - layers + 1, layers)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question_of(question)}]


def contains(reply: str, target: str) -> bool:
    return target.strip().casefold() in reply.casefold()


def other_questions(stream: datasets.Stream, labels: dict) -> list[str]:
    """Questions about an edited subject that ask something else: CounterFact's rephrases labelled
    ``other``; for zsRE the next edit's rephrase with this edit's subject written in (the scope
    study's ``leak_same`` probes)."""
    cases = stream.cases
    if labels:
        return [c.rephrases[0] for c in cases if labels.get((c.prompt, c.rephrases[0])) == "other"]
    records = [{"prompt": c.prompt, "rephrase": c.rephrases[0], "subject": c.subject, "target": c.target} for c in cases]
    return [text for _, text in same_subject_probes(records)]


def evaluate(editor: MeloEditor, stream: datasets.Stream, base_loc: list[str], base_chat_loc: list[str],
             labels: dict | None = None, others: tuple[list[str], list[str]] = ([], [])) -> dict:
    cases = stream.cases
    prompts = [c.prompt for c in cases]
    rephrases = [c.rephrases[0] for c in cases]
    targets = [c.target for c in cases]
    es = editor.generate(prompts, 12)
    gen = editor.generate(rephrases, 12)
    routes = editor.route(rephrases)
    own = editor.route(prompts)
    chats = editor.generate([chat(r) for r in rephrases], 16)
    loc = editor.generate([p.prompt for p in stream.locality], 8)
    chat_loc = editor.generate([chat(p.prompt) for p in stream.locality], 8)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    routed = [r is not None and o is not None and r.block == o.block and r.cluster == o.cluster
              for r, o in zip(routes, own)]
    hits = [exact_match(g, t) for g, t in zip(gen, targets)]
    for case, answer, route in zip(cases, es, own):
        if not exact_match(answer, case.target):  # a rewrite miss is rare: say which and where it went
            where = None if route is None else f"block {route.block}, cluster {route.cluster}"
            print(f"rewrite miss: {case.edit_id} {case.prompt!r} -> {answer!r} (target {case.target!r}; routed to {where})",
                  flush=True)
    if os.environ.get("GENERALITY_SHOW_MISSES"):
        for case, rephrase, answer, hit, ok in zip(cases, rephrases, gen, routed, hits):
            if hit and not ok:
                print(f"block miss: {rephrase!r} -> {answer!r} (target {case.target!r}; prompt {case.prompt!r})", flush=True)
    kinds = [(labels or {}).get((c.prompt, r)) for c, r in zip(cases, rephrases)]
    other_out = editor.generate(others[0], 8) if others[0] else []
    return {
        "same": mean([h for h, k in zip(hits, kinds) if k == "same"]),
        "same_routed": mean([r for r, k in zip(routed, kinds) if k == "same"]),
        "other_target": mean([h for h, k in zip(hits, kinds) if k == "other"]),
        "other_kept": mean([a == b for a, b in zip(other_out, others[1])]),
        "es": mean([exact_match(g, t) for g, t in zip(es, targets)]),
        "gen": mean(hits),
        "gen_routed": mean(routed),
        "gen_given_routed": mean([h for h, r in zip(hits, routed) if r]),
        "chat": mean([contains(g, t) for g, t in zip(chats, targets)]),
        "loc": mean([a == b for a, b in zip(loc, base_loc)]),
        "chat_loc": mean([a == b for a, b in zip(chat_loc, base_chat_loc)]),
    }


def pool_earlier(editor: MeloEditor, cases: list) -> None:
    """Pool the prompts of edits made earlier in the stream (``--offset``) without training them, as
    a writer that had applied them would hold them (stream-wordings variants only)."""
    from melo_runtime.scope import normalized_subject

    pool = editor._wordings  # noqa: SLF001 -- the writer's pool, warmed for the study
    if pool is None or not cases:
        return
    prompts = [c.prompt for c in cases]
    subjects = [normalized_subject(c.subject) for c in cases]
    keys = editor._scope.edit_keys(prompts, subjects)  # noqa: SLF001
    pool.add(prompts, subjects, keys[:, : pool.encoder.dim])


@contextlib.contextmanager
def replay_noise(scale: float):
    """Add ``scale`` x RMS Gaussian noise to every replayed prefix output while training."""
    from melo_runtime import prefix_cache

    original = prefix_cache._rows  # noqa: SLF001

    def noisy(output, rows):
        out = original(output, rows)
        if isinstance(out, (tuple, list)):
            return type(out)([noisy_tensor(out[0]), *out[1:]])
        return noisy_tensor(out)

    def noisy_tensor(t):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            return t
        return t + torch.randn_like(t) * t.pow(2).mean(-1, keepdim=True).sqrt() * scale

    prefix_cache._rows = noisy  # noqa: SLF001
    try:
        yield
    finally:
        prefix_cache._rows = original  # noqa: SLF001


@contextlib.contextmanager
def scaled_deltas(editor: MeloEditor, scale: float):
    """Serve with every block's delta multiplied by ``scale`` (its B factors), restored afterwards."""
    factors = list(editor._factors.values())  # noqa: SLF001 -- a study knob, not a runtime feature
    for layer in factors:
        layer.b.mul_(scale)
    try:
        yield
    finally:
        for layer in factors:
            layer.b.div_(scale)


@contextlib.contextmanager
def widened(editor: MeloEditor, delta: float):
    """Serve with every cluster's radius ``delta`` wider, restored afterwards."""
    clusters = list(editor.db._store.clusters.values())  # noqa: SLF001 -- a study knob
    for cluster in clusters:
        cluster.radius += delta
    try:
        yield
    finally:
        for cluster in clusters:
            cluster.radius -= delta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.generality_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("zsre", "counterfact"), default="zsre")
    parser.add_argument("--n-edits", type=int, default=50)
    parser.add_argument("--n-locality", type=int, default=50)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=datasets.DEFAULT_DATA_DIR)
    parser.add_argument("--offset", type=int, default=0,
                        help="edit the cases after the first OFFSET; stream-wordings variants pool those first prompts")
    parser.add_argument("--delta-scales", default="1",
                        help="comma-separated factors on every block's delta at serving (1 = as trained)")
    parser.add_argument("--radius-deltas", default="0",
                        help="comma-separated widenings of every cluster's radius at serving (0 = as trained)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_backbone("smollm2-135m")
    if args.dataset == "zsre":
        stream = datasets.zsre_stream(args.data_dir, args.offset + args.n_edits, args.n_locality)
    else:
        stream = datasets.counterfact_stream(args.data_dir, args.offset + args.n_edits)
        stream.locality = stream.locality[: args.n_locality]
    earlier, stream.cases = stream.cases[: args.offset], stream.cases[args.offset :]
    preset = preset_for(model)
    labels = {}
    if args.dataset == "counterfact":
        labels = label_of(read_jsonl(LABELS))
    probes = other_questions(stream, labels)
    print("| variant | es | gen | gen_routed | gen|routed | chat | loc | chat_loc | same | same_routed | other_target | other_kept | train_s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base_loc = base_chat_loc = None
    for name in args.variants.split(","):
        config = dataclasses.replace(preset, **VARIANTS[name])
        if name in LORA_LAYERS:
            config = dataclasses.replace(config, target_modules=top_layer_targets(config.target_modules, LORA_LAYERS[name]))
        if name in MID_LAYERS:
            first, count = MID_LAYERS[name]
            parts, index = config.key_module.split("."), _layer_index(config.key_module)
            key = ".".join(parts[:index] + [str(first - 2)] + parts[index + 1 :])
            config = dataclasses.replace(config, target_modules=layer_targets(config.target_modules, first, count),
                                         key_module=key)
        if name == "paper":
            config = dataclasses.replace(config, r_init=preset_for(model, key_source="hidden").r_init)
        editor = MeloEditor(model, tokenizer, config)
        pool_earlier(editor, earlier)
        if base_loc is None:
            base_loc = editor.generate([p.prompt for p in stream.locality], 8)
            base_chat_loc = editor.generate([chat(p.prompt) for p in stream.locality], 8)
            base_others = editor.generate(probes, 8) if probes else []
        started = time.perf_counter()
        for start in range(0, len(stream.cases), 10):
            batch = stream.cases[start : start + 10]
            with replay_noise(NOISE[name]) if name in NOISE else contextlib.nullcontext():
                editor.apply_batch([Edit(c.edit_id, c.prompt, c.target, subject=c.subject) for c in batch])
        seconds = time.perf_counter() - started
        for scale in [float(x) for x in args.delta_scales.split(",")]:
            for delta in [float(x) for x in args.radius_deltas.split(",")]:
                with scaled_deltas(editor, scale), widened(editor, delta):
                    r = evaluate(editor, stream, base_loc, base_chat_loc, labels, (probes, base_others))
                label = name + ("" if scale == 1 else f" x{scale:g}") + ("" if delta == 0 else f" r+{delta:g}")
                print(f"| {label} | {r['es']:.3f} | {r['gen']:.3f} | {r['gen_routed']:.3f} | {r['gen_given_routed']:.3f} | "
                      f"{r['chat']:.3f} | {r['loc']:.3f} | {r['chat_loc']:.3f} | {r['same']:.3f} | {r['same_routed']:.3f} | "
                      f"{r['other_target']:.3f} | {r['other_kept']:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
