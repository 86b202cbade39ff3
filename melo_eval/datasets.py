"""Edit streams built from the real data in ``../shared/data`` (see each folder's PROVENANCE.md).

A stream is what the quality harness replays: an ordered list of edit cases (prompt, target and
held-out rephrases that are *never* shown to the editor), plus probe sets that must not change
(locality) or must stay good (hallucination "accurates").

Prompt format for a causal LM (our choice; the papers edit T5 / GPT2-XL with their own formats):
  * zsRE and NQ questions become ``"Q: {question} A:"`` with target ``" {answer}"``. The leading
    space makes the answer tokenize the way it does mid-sentence in a BPE vocabulary (``Ġuniform``),
    which is also how a greedy continuation of ``"A:"`` would produce it. NQ questions are stored
    lower-case without a question mark; we append ``"?"`` so they read like the zsRE questions.
  * CounterFact prompts are already sentence prefixes: prompt as is, target ``" {target_new}"``.
  * Hallucination follows GRACE's ``Hallucination.get_edits`` exactly (header sentence + previous
    GPT-3 sentences as the prompt, the real Wikipedia sentence as the target), target with a
    leading space.
  * Label-shift items are classification edits: prompt = the text, target = the label name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# Files that only final reported numbers may touch (data README): never tune on them.
RESERVED_FILES = frozenset({"zsre_mend_eval_portability_gpt4.json", "counterfact-val.json"})


@dataclass(frozen=True)
class Probe:
    """A (prompt, target) pair that is scored but never edited."""

    prompt: str
    target: str


@dataclass(frozen=True)
class EditCase:
    """One edit of a stream and the held-out inputs that measure its generality."""

    edit_id: str
    prompt: str
    target: str
    rephrases: tuple[str, ...] = ()
    subject: str | None = None  # the entity the fact is about, as the dataset names it


@dataclass(frozen=True)
class PoolItem:
    """One label-shift edit-pool item the stream scanned, with the unedited classifier's answer."""

    record_id: str
    probe: Probe
    base_prediction: str

    @property
    def edited(self) -> bool:
        """The base classifier gets it wrong, so the stream edits it (GRACE's protocol)."""
        return self.base_prediction != self.probe.target


@dataclass
class Stream:
    """An ordered edit stream and the probe sets evaluated alongside it."""

    name: str
    task: str  # "generate" | "classify"
    cases: list[EditCase]
    locality: list[Probe]
    labels: list[str] = field(default_factory=list)  # classify only: the label set, in id order
    retention: list[Probe] = field(default_factory=list)  # e.g. hallucination "accurates" (ARR)
    reserved: bool = False  # built from a reserved file: final numbers only
    source: str = ""  # files it was read from, for the report
    # Label shift only: every edit-pool item up to the last edit, in date order (the edited ones and
    # those the base classifier already gets right), for prequential accuracy (melo_eval/prequential.py).
    pool: list[PoolItem] = field(default_factory=list)


def qa_prompt(question: str) -> str:
    """Causal-LM prompt for a short-answer question."""
    return f"Q: {question.strip()} A:"


def answer_target(answer: str) -> str:
    """Causal-LM target for an answer (leading space, see module docstring)."""
    return " " + answer.strip()


def _load_json(path: Path) -> object:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found; pass --data-dir pointing at shared/data")
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def _check_count(n: int | None, available: int, what: str) -> int:
    if n is None:
        return available
    if n < 1:
        raise ValueError(f"n_edits must be >= 1, got {n}")
    if n > available:
        raise ValueError(f"asked for {n} {what} edits but the file has only {available}; lower --n-edits")
    return n


def nq_probes(data_dir: Path = DEFAULT_DATA_DIR, n: int = 200) -> list[Probe]:
    """The first ``n`` Natural Questions locality pairs (nq/nq_from_zsre_loc.json)."""
    raw = _load_json(data_dir / "nq" / "nq_from_zsre_loc.json")
    questions, answers = raw["questions"], raw["answers"]
    return [
        Probe(qa_prompt(q.rstrip("?") + "?"), answer_target(a)) for q, a in zip(questions[:n], answers[:n])
    ]


def zsre_stream(
    data_dir: Path = DEFAULT_DATA_DIR,
    n_edits: int | None = 100,
    n_locality: int = 200,
    reserved: bool = False,
) -> Stream:
    """zsRE facts in file order: prompt = src, target = answers[0], rephrase held out, NQ locality.

    ``reserved=True`` reads the reserved evaluation file (final numbers only).
    """
    name = "zsre_mend_eval_portability_gpt4.json" if reserved else "zsre_mend_train-1k.json"
    records = _load_json(data_dir / "zsre" / name)
    n = _check_count(n_edits, len(records), "zsRE")
    cases = [
        EditCase(
            edit_id=f"zsre-{'eval' if reserved else 'train'}-{i}",
            prompt=qa_prompt(r["src"]),
            target=answer_target(r["answers"][0]),
            rephrases=(qa_prompt(r["rephrase"]),) if r.get("rephrase") else (),
            subject=r.get("subject"),
        )
        for i, r in enumerate(records[:n])
    ]
    return Stream(
        name="zsre-reserved" if reserved else "zsre",
        task="generate",
        cases=cases,
        locality=nq_probes(data_dir, n_locality),
        reserved=reserved,
        source=f"zsre/{name} + nq/nq_from_zsre_loc.json",
    )


def counterfact_stream(
    data_dir: Path = DEFAULT_DATA_DIR,
    n_edits: int | None = 100,
    reserved: bool = False,
) -> Stream:
    """CounterFact counterfactual rewrites: prompt -> target_new; rephrase_prompt held out.

    Locality = each case's neighbourhood prompt with its true answer (one probe per edit, as
    EasyEdit does). Development reads counterfact-edit.json; ``reserved=True`` reads the val file.
    """
    name = "counterfact-val.json" if reserved else "counterfact-edit.json"
    records = _load_json(data_dir / "counterfact" / name)
    n = _check_count(n_edits, len(records), "CounterFact")
    cases = [
        EditCase(
            edit_id=f"cf-{r['case_id']}",
            prompt=r["prompt"].strip(),
            target=answer_target(r["target_new"]),
            rephrases=(r["rephrase_prompt"].strip(),) if r.get("rephrase_prompt") else (),
            subject=r.get("subject"),
        )
        for r in records[:n]
    ]
    locality = [Probe(r["locality_prompt"].strip(), answer_target(r["locality_ground_truth"])) for r in records[:n]]
    return Stream(
        name="counterfact-reserved" if reserved else "counterfact",
        task="generate",
        cases=cases,
        locality=locality,
        reserved=reserved,
        source=f"counterfact/{name}",
    )


# Abbreviations after which a period does not end a sentence in WikiBio prose. NLTK's punkt model
# (which GRACE uses) is not installable offline; this splitter reproduces it on this corpus for the
# usual cases (initials, titles, "St.", "ca.") and is documented as a deviation in bench/RESULTS.md.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st mt ft gen col lt sgt capt maj adm rev hon ca c b d no vs etc jan feb mar apr "
    "jun jul aug sep sept oct nov dec u.s inc co ltd".split()
)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (punkt-like: no split after initials or known abbreviations)."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start : match.start()].strip()
        last_word = candidate.rsplit(None, 1)[-1] if candidate else ""
        token = last_word.rstrip(".\"')]").lower().lstrip("(\"'")
        if len(token) <= 1 or token in _ABBREVIATIONS:
            continue  # "J. Smith", "St. Louis": the period belongs to the word
        sentences.append(candidate)
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def hallucination_stream(data_dir: Path = DEFAULT_DATA_DIR, n_edits: int | None = 100) -> Stream:
    """GRACE's hallucination construction on SelfCheckGPT WikiBio (v3), in passage order.

    For passage i, header = "This is a Wikipedia passage about {concept}."; for sentence j the
    prompt is header + the GPT-3 sentences before j. Inaccurate sentences become edits whose target
    is the j-th real Wikipedia sentence; accurate ones become retention probes (ARR) whose target is
    the GPT-3 sentence itself. There are no rephrases. GRACE measures locality as perplexity on
    OpenWebText, which is not available offline; the stand-in here is real Wikipedia text the
    stream never edits: for passages after the last one edited (taken from the end of the file),
    prompt = the header, target = the passage's first real Wikipedia sentence (``locality``; the
    harness reports its perplexity as ``loc_ppl`` beside ARR).
    """
    passages = _load_json(data_dir / "hallucination" / "wiki_bio_gpt3_hallucination_v3.json")
    edits: list[EditCase] = []
    accurates: list[Probe] = []
    for i, passage in enumerate(passages):
        header = f"This is a Wikipedia passage about {passage['concept'].strip()}."
        annotations = passage["annotation"]
        correct = split_sentences(passage["wiki_bio_text"])[: len(annotations)]
        for j, annotation in enumerate(annotations):
            prompt = f"{header} {' '.join(passage['gpt3_sentences'][:j])}".strip()
            if "inaccurate" in annotation:
                target = correct[min(j, len(correct) - 1)]
                edits.append(EditCase(f"halluc-{i}-{j}", prompt, answer_target(target), subject=passage["concept"].strip()))
            else:
                accurates.append(Probe(prompt, answer_target(passage["gpt3_sentences"][j])))
    n = _check_count(n_edits, len(edits), "hallucination")
    last_edited = int(edits[n - 1].edit_id.split("-")[1]) if n else -1
    locality = []
    for passage in reversed(passages[last_edited + 1 :]):
        sentences = split_sentences(passage["wiki_bio_text"])
        if sentences:
            header = f"This is a Wikipedia passage about {passage['concept'].strip()}."
            locality.append(Probe(header, answer_target(sentences[0])))
    return Stream(
        name="hallucination",
        task="generate",
        cases=edits[:n],
        locality=locality,
        retention=accurates,
        source="hallucination/wiki_bio_gpt3_hallucination_v3.json",
    )


@dataclass
class LabelShiftData:
    """One label-shift dataset: label names and its three date-ordered splits."""

    name: str
    labels: list[str]
    upstream: list[Probe]  # train the base classifier head on these
    dev: list[Probe]  # locality: the base model's predictions here must not change
    edit_pool: list[tuple[str, Probe]]  # (record id, probe) in chronological order


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} not found; pass --data-dir pointing at shared/data")
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


LABEL_SHIFT_DIRS = {"scotus": "scotus-oyez", "huffpost": "huffpost-2018-2022"}


def read_label_shift(name: str, data_dir: Path = DEFAULT_DATA_DIR) -> LabelShiftData:
    """Read ``label-shift/<dir>/`` for ``name`` in {"scotus", "huffpost"}."""
    if name not in LABEL_SHIFT_DIRS:
        raise ValueError(f"unknown label-shift dataset {name!r}; choose one of {sorted(LABEL_SHIFT_DIRS)}")
    root = data_dir / "label-shift" / LABEL_SHIFT_DIRS[name]
    labels = _load_json(root / "labels.json")["labels"]

    def rows(split: str) -> list[dict]:
        return sorted(_read_jsonl(root / f"{split}.jsonl"), key=lambda r: (str(r["date"]), r["id"]))

    return LabelShiftData(
        name=name,
        labels=list(labels),
        upstream=[Probe(r["text"], r["label"]) for r in rows("upstream")],
        dev=[Probe(r["text"], r["label"]) for r in rows("dev")],
        edit_pool=[(r["id"], Probe(r["text"], r["label"])) for r in rows("edit_pool")],
    )


def truncate_label_shift(data: LabelShiftData, tokenizer, max_tokens: int) -> LabelShiftData:
    """Cut every text to its first ``max_tokens`` tokens (special tokens included), at a token edge.

    SCOTUS case facts run to 1,000+ tokens; MiniLM's position table holds 512 and the editor's
    ``max_length_tokens`` (256) bounds what it will index. The base head is fitted on the same first
    256 tokens (melo_eval.classifier), so truncating the stream keeps editor and classifier on one input.
    """

    def cut(text: str) -> str:
        budget = max_tokens
        while len(tokenizer(text).input_ids) > max_tokens:
            # Re-tokenizing a cut inside a word can take a token or two more: cut again, shorter.
            enc = tokenizer(text, truncation=True, max_length=budget, return_offsets_mapping=True)
            ends = [end for start, end in enc["offset_mapping"] if end > start]
            text, budget = text[: ends[-1]], budget - 2
        return text

    def probes(items: list[Probe]) -> list[Probe]:
        return [Probe(cut(p.prompt), p.target) for p in items]

    return LabelShiftData(
        name=data.name,
        labels=data.labels,
        upstream=probes(data.upstream),
        dev=probes(data.dev),
        edit_pool=[(rid, Probe(cut(p.prompt), p.target)) for rid, p in data.edit_pool],
    )


def label_shift_stream(
    data: LabelShiftData,
    predict: Callable[[Sequence[str]], list[str]],
    n_edits: int | None = 100,
    n_locality: int = 200,
    scan_batch: int = 32,
) -> Stream:
    """Edits = edit-pool items the base classifier gets wrong, in date order (GRACE's protocol).

    ``predict`` is the *base* classifier; the pool is scanned in chronological chunks until
    ``n_edits`` misclassified items are found. Every scanned item up to the last edit is kept with
    its base prediction (``Stream.pool``). Locality = the first ``n_locality`` dev items, whose
    base predictions must not change.
    """
    wanted = n_edits if n_edits is not None else len(data.edit_pool)
    pool: list[PoolItem] = []
    edits = 0
    for start in range(0, len(data.edit_pool), scan_batch):
        chunk = data.edit_pool[start : start + scan_batch]
        predictions = predict([probe.prompt for _, probe in chunk])
        for (record_id, probe), predicted in zip(chunk, predictions):
            item = PoolItem(record_id, probe, predicted)
            pool.append(item)
            edits += item.edited
            if edits == wanted:
                break
        if edits >= wanted:
            break
    if n_edits is not None and edits < n_edits:
        raise ValueError(
            f"only {edits} misclassified items in the {data.name} edit pool; lower --n-edits to {edits}"
        )
    while pool and not pool[-1].edited:  # the span ends at the last edit
        pool.pop()
    cases = [EditCase(item.record_id, item.probe.prompt, item.probe.target) for item in pool if item.edited]
    return Stream(
        name=f"label-shift-{data.name}",
        task="classify",
        cases=cases,
        locality=data.dev[:n_locality],
        labels=data.labels,
        source=f"label-shift/{LABEL_SHIFT_DIRS[data.name]}",
        pool=pool,
    )

