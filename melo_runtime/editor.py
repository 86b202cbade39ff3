"""MeloEditor: apply batches of edits to a model as LoRA blocks, and serve it with per-row routing.

State: one :class:`BlockFactors` per LoRA layer (block t = batch t) and a :class:`VectorDB` of edit
keys. Serving calls (``generate``, ``classify``, ``score``, ``route``) take a snapshot of both and
route each row of a batch independently; they may run from many threads at once. Writers
(``apply_batch``, ``retract``) are serialized by a lock and work on a copy of the database that is
swapped in only when everything succeeded, so a failed batch leaves no trace and a reader never
sees a half-applied one.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from melo_runtime import augment
from melo_runtime.attach import Attachment, attach
from melo_runtime.block_lora import BlockFactors
from melo_runtime.chat import Prompt, chat_inputs
from melo_runtime.config import MeloConfig
from melo_runtime.edits import BatchResult, Edit, Route, normalize_label
from melo_runtime.rng import seeded
from melo_runtime.encoding import IGNORE, TeacherForced, TextEncoder, loss_and_hits
from melo_runtime.families import is_classifier, model_device
from melo_runtime.keys import hidden_keys
from melo_runtime.routing import CallState, use_state
from melo_runtime.scope import ScopeKeys, infer_subject, load_encoder, normalized_subject
from melo_runtime.serialization import (
    copy_db,
    export_files,
    load_blocks,
    read_directory,
    read_files,
    write_directory,
)
from melo_runtime.trainer import train_block
from melo_runtime.validation import EditRow, EditValidator, teacher_forced_pairs, text_list
from melo_runtime.vectordb import Hit, VectorDB
from melo_runtime.wordings import WordingPool

# Sampling draws from torch's global generator, which HF generate offers no way to replace: sampled
# calls run one at a time (greedy ones stay concurrent), and a seeded call works on a forked state
# restored afterwards, so a seed gives the same text whatever else runs.
_SAMPLING_LOCK = threading.Lock()


@contextmanager
def _sampling(active: bool, seed: int | None) -> Iterator[None]:
    if not active:
        yield
        return
    with _SAMPLING_LOCK:
        if seed is None:
            yield
            return
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with seeded(seed, devices):
            yield


# Rows per forward pass of the per-row serving calls. A long list in one pass holds logits of rows x
# tokens x vocabulary at once: `melo eval` scoring 1,000 CounterFact rephrases on SmolLM2 in one pass
# was killed for memory at 13 GB.
ROWS_PER_PASS = 32


def _by_rows(lists: int) -> Callable[[Callable[..., list]], Callable[..., list]]:
    """Run a method whose first ``lists`` arguments are per-row lists at most :data:`ROWS_PER_PASS`
    rows at a time, concatenating the answers. Each row is routed on its own, so only a pass's
    padding differs from one whole pass (and a seeded sampling call draws each pass from the same
    seed). Anything that is not lists of rows of one length is passed through whole, so the
    method's own checks name the problem."""

    def wrap(method: Callable[..., list]) -> Callable[..., list]:
        @functools.wraps(method)
        def run(self, *args, **kwargs) -> list:
            rows, rest = args[:lists], args[lists:]
            whole = len(rows) < lists or not all(isinstance(r, (list, tuple)) for r in rows)
            if whole or len({len(r) for r in rows}) != 1 or len(rows[0]) <= ROWS_PER_PASS:
                return method(self, *args, **kwargs)
            out: list = []
            for start in range(0, len(rows[0]), ROWS_PER_PASS):
                out.extend(method(self, *(r[start : start + ROWS_PER_PASS] for r in rows), *rest, **kwargs))
            return out

        return run

    return wrap


class MeloEditor:
    """A MELO editor over one model (see docs/contracts.md for the public surface)."""

    def __init__(self, model: nn.Module, tokenizer, config: MeloConfig) -> None:
        config.validate()
        if (config.task == "classify") != is_classifier(model):
            raise ValueError(
                f"config.task={config.task!r} does not fit {type(model).__name__}; "
                "classify needs a sequence-classification head, generate a language-model head"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._attachment = attach(model, config)
        self._encoder = TextEncoder(model, tokenizer)
        # Scope keys (config.key_source == "scope") replace the paper's hidden-state key for routing.
        self._scope = ScopeKeys(load_encoder(config.key_encoder)) if config.key_source == "scope" else None
        self._prefixes: list[str] | None = None  # context lead-ins, written by the base model on first use
        # The stream's wordings of its questions, to train new edits on (melo_runtime/wordings.py).
        self._wordings = (
            WordingPool(self._scope.encoder) if self._scope is not None and config.train_stream_wordings else None
        )
        device = model_device(model)
        self._factors = {
            name: BlockFactors(layer.d_in, layer.d_out, config.rank_per_block, device)
            for name, layer in self._attachment.layers.items()
        }
        self._db = VectorDB(
            self._scope.dim if self._scope else self._attachment.key_dim,
            config.r_init,
            hnsw_m=config.hnsw_m,
            ef_construction=config.hnsw_ef_construction,
            ef_search=config.hnsw_ef_search,
            seed=config.seed,
            conflict_policy=config.conflict_policy,
        )
        self._label_ids: dict[str, int] = {}
        if config.task == "classify":
            self._label_ids = {normalize_label(str(n)): int(i) for i, n in model.config.id2label.items()}
        self._validator = EditValidator(config, self._encoder, self._label_ids, scoped=self._scope is not None)
        self._write_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ editing

    @property
    def blocks(self) -> int:
        """Number of trained blocks (block ids are 0 .. blocks-1, never reused)."""
        return next(iter(self._factors.values())).count

    def apply_batch(self, edits: Sequence[Edit], *, cache_prefix: bool = True) -> BatchResult:
        """Learn ``edits`` as one new block and index their keys.

        Everything is validated first (ValueError naming the field); if anything fails later the
        editor is exactly as before. Within a batch, a text given by several edits is trained and
        indexed for the last of them only (the newest target wins). ``cache_prefix=False`` trains
        with full recomputation (for benchmarks).
        """
        with self._write_lock:
            started = time.perf_counter()
            rows = self._validate(edits)
            keys = self._edit_keys(rows)
            training = self._training_rows(rows, keys)
            targets = [self._label_ids[normalize_label(r.target)] if self._label_ids else r.target for r in training]
            data = self._encoder.teacher_forced([r.text for r in training], targets)
            block_id = self.blocks
            edit_index = {edit.edit_id: i for i, edit in enumerate(edits)}
            trained = train_block(
                self.model,
                data,
                self._factors,
                block_id,
                self.config,
                key_module=self._attachment.key_module,
                prefix_layers=self._attachment.prefix_layers,
                cache_prefix=cache_prefix,
                groups=[edit_index[row.edit_id] for row in training],
                required=[row.indexed for row in training],
            )
            # Only the indexed rows (prompt and rephrases) decide whether an edit is learned; the
            # chat-form and prefixed rows come after them and shape the block.
            learned = {edit.edit_id: True for edit in edits}
            for row, ok in zip(training, trained.learned, strict=True):
                if row.indexed:
                    learned[row.edit_id] = learned[row.edit_id] and ok
            trained_ids = {row.edit_id for row in rows}
            # An edit not learned keeps no key: routing never sends an input to a block without it.
            not_learned = sorted(edit_id for edit_id in trained_ids if not learned[edit_id])
            if self.config.index_not_learned:
                not_learned = []
            indexed = [i for i, row in enumerate(rows) if row.edit_id not in not_learned]
            blocks, row_block = trained.compact(indexed, block_id)
            db = copy_db(self._db)
            report = db.insert(
                keys[indexed],
                [rows[i].label for i in indexed],
                [row_block[i] for i in indexed],
                [rows[i].edit_id for i in indexed],
            )
            try:
                for block in blocks:
                    for name, (a, b) in block.items():
                        self._factors[name].append(a, b)
            except BaseException:
                for layer in self._factors.values():
                    layer.truncate(block_id)
                raise
            self._remember_scope(rows, indexed, keys)
            self._db = db  # the batch becomes visible to readers here, all at once
            live = db.edit_ids()
            forgotten = {edit_id for edit_id, _ in report.forgotten if edit_id not in live}
            forgotten |= {edit.edit_id for edit in edits if edit.edit_id not in trained_ids}
            for edit_id in forgotten & set(learned):
                learned[edit_id] = False
            return BatchResult(
                block_id=block_id,
                edit_ids=[edit.edit_id for edit in edits],
                clusters_added=report.added,
                clusters_expanded=report.expanded,
                conflicts=report.conflicts,
                forgotten=sorted(forgotten),
                learned=learned,
                seconds=time.perf_counter() - started,
                iterations_run=trained.iterations,
                final_loss=trained.final_loss,
                not_learned=not_learned,
                edit_losses=trained.group_losses([row.edit_id for row in training]),
                blocks_added=len(blocks),
            )

    def _remember_scope(self, rows: list[EditRow], indexed: list[int], keys: np.ndarray) -> None:
        """After a batch is applied: the subjects its rows name, and the wordings of its indexed rows."""
        if self._scope is not None:
            self._scope = self._scope.with_subjects(row.subject for row in rows)
        if self._wordings is not None:
            dim = self._scope.encoder.dim
            self._wordings.add([rows[i].text for i in indexed], [rows[i].subject for i in indexed], keys[indexed, :dim])

    def check_edit(self, edit: Edit) -> None:
        """Raise what ``apply_batch([edit])`` would raise while validating ``edit`` (ValueError, or
        its subclass TokenLimitError); nothing is trained. Cheap: it only tokenizes."""
        with self._write_lock:
            self._validate([edit])

    def _validate(self, edits: Sequence[Edit]) -> list[EditRow]:
        return self._validator.validate(edits, self._db.edit_ids())

    def retract(self, edit_id: str) -> bool:
        """Remove every key of ``edit_id``: its inputs get the base output again. False if unknown."""
        with self._write_lock:
            if edit_id not in self._db.edit_ids():
                return False
            db = copy_db(self._db)
            db.retract(edit_id)
            self._db = db
            return True

    def _training_rows(self, rows: list[EditRow], keys: np.ndarray) -> list[augment.TrainingRow]:
        """The indexed rows, then their chat-form, question-form and prefixed variants and the
        stream's other wordings of their questions (generation editors)."""
        indexed = [augment.TrainingRow(row.edit_id, row.text, row.target, indexed=True) for row in rows]
        if self._label_ids:
            return indexed
        if self._prefixes is None:
            self._prefixes = augment.context_prefixes(
                self.model, self.tokenizer, self._encoder, self.config.train_context_prefixes
            )
        expanded = augment.expand(indexed, self.tokenizer, chat_form=self.config.train_chat_form,
                                  prefixes=self._prefixes, question_forms=self.config.train_question_forms)
        if self._wordings is None:
            return expanded
        return expanded + self._wordings.training_rows(rows, keys, self.config)

    def _edit_keys(self, rows: list[EditRow]) -> np.ndarray:
        """Keys [n, dim] float32 of the rows, as the vector DB indexes them."""
        texts = [row.text for row in rows]
        if self._scope is not None:
            return self._scope.edit_keys(texts, [row.subject for row in rows])
        return self._keys(texts).cpu().numpy()

    # ------------------------------------------------------------------------------------ serving

    @_by_rows(1)
    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = 16,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        streamer: object | None = None,
    ) -> list[str]:
        """Continuation of each row (the new text only), routed once from the row's question.

        A row is a prompt, or a chat conversation (a list of ``{"role", "content"}`` ending with a
        user message) that is rendered with the tokenizer's chat template; routing reads the last
        user message, never the template. Greedy by default; ``temperature > 0`` samples (nucleus
        ``top_p``), reproducibly when a ``seed`` is given. ``streamer`` (a transformers streamer,
        one row only) receives the tokens as they are generated.
        """
        texts, questions = chat_inputs(self.tokenizer, prompts)
        if not texts:
            return []
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        batch = self._encoder.prompts(texts)
        inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}  # generate derives them
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        state = self.serving_state(batch.key_mask, questions if questions != texts or self._scope else None)
        with _sampling(temperature > 0, seed), use_state(state), torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                num_beams=1,
                pad_token_id=self._encoder.pad_id,
                eos_token_id=self._encoder.eos_id,
                streamer=streamer,
                **sampling,
            )
        start = 1 if self._encoder.encoder_decoder else batch.inputs["input_ids"].shape[1]
        return self.tokenizer.batch_decode(output[:, start:], skip_special_tokens=True)

    @_by_rows(1)
    def classify(self, texts: Sequence[str]) -> list[str]:
        """The predicted label name of each text (classification editors only)."""
        if not self._label_ids:
            raise ValueError(f"classify needs a classify editor; this one is task={self.config.task!r}")
        texts = text_list(texts, "texts")
        if not texts:
            return []
        batch = self._encoder.prompts(texts)
        with use_state(self.serving_state(batch.key_mask, texts if self._scope else None)), torch.no_grad():
            logits = self.model(**batch.inputs).logits
        names = self.model.config.id2label
        return [str(names[int(i)]) for i in logits.argmax(-1).tolist()]

    @_by_rows(2)
    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Teacher-forced accuracy of each target given its prompt (label: 1.0 or 0.0), routed by prompt."""
        logits, data = self._teacher_forced(prompts, targets)
        _, _, accuracy = loss_and_hits(logits, data.targets)
        return [float(x) for x in accuracy.tolist()]

    @_by_rows(2)
    def perplexity(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Per row, exp(mean negative log-likelihood of the target tokens), routed by prompt."""
        if self._label_ids:
            raise ValueError("perplexity needs a generate editor; this one classifies")
        logits, data = self._teacher_forced(prompts, targets)
        logits = logits.float()
        scored = data.targets != IGNORE
        log_probs = torch.log_softmax(logits, -1).gather(-1, data.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(log_probs * scored).sum(-1) / scored.sum(-1).clamp(min=1)
        return [float(x) for x in torch.exp(nll).tolist()]

    def route(self, prompts: Sequence[str]) -> list[Route | None]:
        """Per prompt: the block, cluster and centre distance it is routed to, or None (base model)."""
        prompts = text_list(prompts, "prompts")
        if not prompts:
            return []
        hits = self._hits(prompts)
        return [None if hit is None else Route(hit.block, hit.cluster_id, float(hit.distance)) for hit in hits]

    def keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Keys of ``prompts`` [n, dim] float32 on the CPU, as the vector database would index them
        as edit prompts: the key module's output at each prompt's last real token, or the scope key
        with the subject inferred from the prompt (key_source "scope")."""
        prompts = text_list(prompts, "prompts")
        if not prompts:
            return torch.zeros((0, self._db.dim))
        if self._scope is not None:
            subjects = [normalized_subject(infer_subject(p)) for p in prompts]
            return torch.from_numpy(self._scope.edit_keys(prompts, subjects))
        return self._keys(prompts).cpu()

    @torch.no_grad()
    def _teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> tuple[torch.Tensor, TeacherForced]:
        """Logits of each target given its prompt, each row routed by its prompt alone, and the batch."""
        prompts, data = teacher_forced_pairs(self._encoder, self._label_ids, prompts, targets)
        state = CallState(
            key_module=self._attachment.key_module, factors=self._factors, attention_mask=data.batch.key_mask
        )
        if self._encoder.causal or self._scope is not None:
            # The sequence holds prompt + target, so the key comes from a prompt-only pass.
            state.blocks = self._blocks_of(self._hits(prompts))
        else:
            state.router = self._router(self._db)
        with use_state(state):
            return self.model(**data.batch.inputs).logits, data

    # ------------------------------------------------------------------------------------ routing

    def serving_state(self, key_mask: torch.Tensor, questions: list[str] | None = None) -> CallState:
        """Routing for one serving call: decided up front from ``questions`` when given, else by the
        key hook from the model's own hidden state at the key module (the paper's key)."""
        state = CallState(key_module=self._attachment.key_module, factors=self._factors, attention_mask=key_mask)
        if questions is None:
            state.router = self._router(self._db)
        else:
            state.blocks = self._blocks_of(self._hits(questions))
        return state

    def _hits(self, texts: list[str]) -> list[Hit | None]:
        """The vector DB's hit for each text (None: the base model answers)."""
        db, scope = self._db, self._scope  # one consistent pair: a writer swaps both together
        if scope is None:
            return db.search(self._keys(texts).cpu().numpy())
        return scope.search(db, texts)

    def _router(self, db: VectorDB):
        def route(keys: torch.Tensor) -> torch.Tensor:
            return self._blocks_of(db.search(keys.cpu().numpy())).to(keys.device)

        return route

    def _blocks_of(self, hits: list[Hit | None]) -> torch.Tensor:
        blocks = [-1 if hit is None else hit.block for hit in hits]
        return torch.tensor(blocks, dtype=torch.long, device=model_device(self.model))

    def _keys(self, texts: list[str]) -> torch.Tensor:
        return hidden_keys(self.model, self._encoder, self._attachment.key_module, texts)

    # ------------------------------------------------------------------------------------ state

    def stats(self) -> dict[str, int]:
        """Counts: blocks, clusters, keys, edits (reachable), conflicts_total, forgotten_total, retracted_total."""
        db = self._db
        counts = db.stats()
        return {
            "blocks": self.blocks,
            "clusters": counts["clusters"],
            "keys": counts["members"],
            "edits": len(db.edit_ids()),
            "conflicts_total": counts["conflicts_total"],
            "forgotten_total": counts["forgotten_total"],
            "retracted_total": counts.get("retracted_total", 0),
        }

    def edit_ids(self) -> set[str]:
        """Edits currently reachable (applied, not forgotten, not retracted)."""
        return self._db.edit_ids()

    def export_files(self) -> dict[str, bytes]:
        """The editor as ``{file name: bytes}`` (safetensors + JSON; see serialization.py)."""
        with self._write_lock:
            scope = self._scope.to_dict() if self._scope is not None else None
            if self._wordings is not None:
                scope["wordings"] = self._wordings.to_list()
            return export_files(self.config, self._factors, self._db, scope)

    @classmethod
    def from_files(cls, files: dict[str, bytes], model: nn.Module, tokenizer) -> MeloEditor:
        """Rebuild an editor from :meth:`export_files` output over ``model`` (same base weights)."""
        state = read_files(files)
        editor = cls(model, tokenizer, state.config)
        load_blocks(editor._factors, state)
        if state.db.dim != editor._db.dim:
            raise ValueError(f"keys have dim {state.db.dim} in the files but {editor._db.dim} in this editor")
        editor._db = state.db
        if editor._scope is not None and state.scope is not None:
            editor._scope = editor._scope.restored(state.scope)
            if editor._wordings is not None:
                editor._wordings = WordingPool.from_list(editor._scope.encoder, state.scope.get("wordings"))
        return editor

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write :meth:`export_files` into ``directory`` (created if missing)."""
        write_directory(directory, self.export_files())

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: nn.Module, tokenizer) -> MeloEditor:
        """Read an editor written by :meth:`save`."""
        return cls.from_files(read_directory(directory), model, tokenizer)

    # ------------------------------------------------------------------------------------ read-only views

    @property
    def encoder(self) -> TextEncoder:
        """The tokenizer and model plumbing every call encodes its texts with."""
        return self._encoder

    @property
    def attachment(self) -> Attachment:
        """Where the LoRA layers and the key module sit in the model."""
        return self._attachment

    @property
    def factors(self) -> dict[str, BlockFactors]:
        """Per LoRA layer, the trained blocks (append-only; :meth:`apply_batch` adds to them)."""
        return self._factors

    @property
    def db(self) -> VectorDB:
        """The vector database readers see now (a write swaps in a new one)."""
        return self._db

    def teacher_forced_logits(self, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """Logits of each target given its prompt, each row routed by its prompt (what :meth:`score` reads)."""
        return self._teacher_forced(prompts, targets)[0]
