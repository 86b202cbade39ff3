"""MeloEditor: apply batches of edits to a model as LoRA blocks, and serve it with per-row routing.

State: one :class:`BlockFactors` per LoRA layer (block t = batch t) and a :class:`VectorDB` of edit
keys. Serving calls (``generate``, ``classify``, ``score``, ``route``) take a snapshot of both and
route each row of a batch independently; they may run from many threads at once. Writers
(``apply_batch``, ``retract``) are serialized by a lock and work on a copy of the database that is
swapped in only when everything succeeded, so a failed batch leaves no trace and a reader never
sees a half-applied one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from melo_runtime import augment
from melo_runtime.attach import attach
from melo_runtime.block_lora import BlockFactors
from melo_runtime.chat import check_messages, render, user_question
from melo_runtime.config import MeloConfig
from melo_runtime.edits import BatchResult, Edit, Route, normalize_label
from melo_runtime.encoding import IGNORE, TeacherForced, TextEncoder, loss_and_hits
from melo_runtime.families import is_classifier, model_device
from melo_runtime.routing import CallState, KeysCaptured, use_state
from melo_runtime.scope import ScopeKeys, infer_subject, load_encoder, normalized_subject
from melo_runtime.serialization import copy_db, export_files, read_files
from melo_runtime.trainer import train_block
from melo_runtime.vectordb import Hit, VectorDB

# A generate input row: a prompt, or a chat conversation ending with the user's question.
Prompt = str | Sequence[dict[str, str]]

_KEY_CHUNK = 64  # prompts per key-only forward pass
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
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield


@dataclass(frozen=True)
class _Row:
    """One training row: an edit's prompt or one of its rephrases."""

    edit_id: str
    text: str
    target: str  # generation target text, or label name
    label: str  # normalized target: what clusters compare
    subject: str  # normalized subject ("" = none): part of a scope key


class TokenLimitError(ValueError):
    """An edit whose prompt, rephrase or target exceeds ``MeloConfig.max_length_tokens``."""


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
            training = self._training_rows(rows)
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
            if self._scope is not None:
                self._scope = self._scope.with_subjects(row.subject for row in rows)
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

    def check_edit(self, edit: Edit) -> None:
        """Raise what ``apply_batch([edit])`` would raise while validating ``edit`` (ValueError, or
        its subclass TokenLimitError); nothing is trained. Cheap: it only tokenizes."""
        with self._write_lock:
            self._validate([edit])

    def retract(self, edit_id: str) -> bool:
        """Remove every key of ``edit_id``: its inputs get the base output again. False if unknown."""
        with self._write_lock:
            if edit_id not in self._db.edit_ids():
                return False
            db = copy_db(self._db)
            db.retract(edit_id)
            self._db = db
            return True

    def _validate(self, edits: Sequence[Edit]) -> list[_Row]:
        if isinstance(edits, (str, bytes)) or not isinstance(edits, Sequence):
            raise ValueError(f"edits must be a sequence of Edit, got {type(edits).__name__}")
        if not edits:
            raise ValueError("edits is an empty batch; pass at least one Edit")
        seen: set[str] = set()
        applied = self._db.edit_ids()
        config = self.config
        for i, edit in enumerate(edits):
            where = f"edits[{i}]"
            if not isinstance(edit, Edit):
                raise ValueError(f"{where} must be an Edit, got {type(edit).__name__}")
            if not isinstance(edit.edit_id, str) or not edit.edit_id.strip():
                raise ValueError(f"{where}.edit_id must be a non-empty string, got {edit.edit_id!r}")
            if edit.edit_id in seen:
                raise ValueError(f"{where}.edit_id={edit.edit_id!r} appears twice in this batch; edit ids are unique")
            if edit.edit_id in applied:
                raise ValueError(f"{where}.edit_id={edit.edit_id!r} is already applied; retract it first to replace it")
            seen.add(edit.edit_id)
            self._check_text(edit.prompt, f"{where}.prompt", config.max_prompt_chars)
            self._check_text(edit.target, f"{where}.target", config.max_target_chars)
            if not isinstance(edit.rephrases, (tuple, list)):
                raise ValueError(f"{where}.rephrases must be a tuple of strings, got {type(edit.rephrases).__name__}")
            if len(edit.rephrases) > config.max_rephrases:
                raise ValueError(
                    f"{where}.rephrases has {len(edit.rephrases)} entries; at most max_rephrases={config.max_rephrases}"
                )
            for j, rephrase in enumerate(edit.rephrases):
                self._check_text(rephrase, f"{where}.rephrases[{j}]", config.max_prompt_chars)
            if edit.subject is not None:
                self._check_text(edit.subject, f"{where}.subject", config.max_target_chars)
            label = normalize_label(edit.target)
            if self._label_ids and label not in self._label_ids:
                raise ValueError(f"{where}.target={edit.target!r} is not a label of this classifier; known: {sorted(self._label_ids)}")
            self._check_token_length(edit, where)
        # The newest edit giving a text wins it: earlier rows with the same text are dropped.
        last_owner = {text: i for i, edit in enumerate(edits) for text in (edit.prompt, *edit.rephrases)}
        rows = []
        for i, edit in enumerate(edits):
            subject = normalized_subject(edit.subject or infer_subject(edit.prompt)) if self._scope else ""
            for text in dict.fromkeys((edit.prompt, *edit.rephrases)):
                if last_owner[text] == i:
                    rows.append(_Row(edit.edit_id, text, edit.target, normalize_label(edit.target), subject))
        return rows

    def _training_rows(self, rows: list[_Row]) -> list[augment.TrainingRow]:
        """The indexed rows, then their chat-form and prefixed variants (generation editors)."""
        indexed = [augment.TrainingRow(row.edit_id, row.text, row.target, indexed=True) for row in rows]
        if self._label_ids:
            return indexed
        if self._prefixes is None:
            self._prefixes = augment.context_prefixes(
                self.model, self.tokenizer, self._encoder, self.config.train_context_prefixes
            )
        return augment.expand(indexed, self.tokenizer, chat_form=self.config.train_chat_form, prefixes=self._prefixes)

    def _edit_keys(self, rows: list[_Row]) -> np.ndarray:
        """Keys [n, dim] float32 of the rows, as the vector DB indexes them."""
        texts = [row.text for row in rows]
        if self._scope is not None:
            return self._scope.edit_keys(texts, [row.subject for row in rows])
        return self._keys(texts).cpu().numpy()

    @staticmethod
    def _check_text(text: object, field: str, limit: int) -> None:
        if not isinstance(text, str):
            raise ValueError(f"{field} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{field} is empty or whitespace; give the text to edit")
        if len(text) > limit:
            raise ValueError(f"{field} has {len(text)} characters; the limit is {limit} (MeloConfig)")

    def _check_token_length(self, edit: Edit, where: str) -> None:
        limit = self.config.max_length_tokens
        target = 0 if self._label_ids else len(self._encoder.target_ids(edit.target))
        if target > limit:
            raise TokenLimitError(f"{where}.target is {target} tokens long; max_length_tokens={limit}")
        texts = {f"{where}.prompt": edit.prompt}
        texts.update({f"{where}.rephrases[{j}]": text for j, text in enumerate(edit.rephrases)})
        for field, text in texts.items():
            tokens = len(self._encoder.prompt_ids(text))
            # Decoder-only models see prompt and target in one sequence.
            total = tokens + (target if self._encoder.causal else 0)
            if total > limit:
                raise TokenLimitError(
                    f"{field} is {tokens} tokens long ({total} with the target); max_length_tokens={limit}"
                )

    # ------------------------------------------------------------------------------------ serving

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
        texts, questions = self._inputs(prompts)
        if not texts:
            return []
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        batch = self._encoder.prompts(texts)
        inputs = {k: v for k, v in batch.inputs.items() if k != "position_ids"}  # generate derives them
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
        state = self._serving_state(batch.key_mask, questions if questions != texts or self._scope else None)
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

    def classify(self, texts: Sequence[str]) -> list[str]:
        """The predicted label name of each text (classification editors only)."""
        if not self._label_ids:
            raise ValueError(f"classify needs a classify editor; this one is task={self.config.task!r}")
        texts = self._texts(texts, "texts")
        if not texts:
            return []
        batch = self._encoder.prompts(texts)
        with use_state(self._serving_state(batch.key_mask, texts if self._scope else None)), torch.no_grad():
            logits = self.model(**batch.inputs).logits
        names = self.model.config.id2label
        return [str(names[int(i)]) for i in logits.argmax(-1).tolist()]

    def score(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Teacher-forced accuracy of each target given its prompt (label: 1.0 or 0.0), routed by prompt."""
        prompts, data = self._teacher_forced(prompts, targets)
        with torch.no_grad():
            logits = self._routed_logits(prompts, data)
        _, _, accuracy = loss_and_hits(logits, data.targets)
        return [float(x) for x in accuracy.tolist()]

    def perplexity(self, prompts: Sequence[str], targets: Sequence[str]) -> list[float]:
        """Per row, exp(mean negative log-likelihood of the target tokens), routed by prompt."""
        if self._label_ids:
            raise ValueError("perplexity needs a generate editor; this one classifies")
        prompts, data = self._teacher_forced(prompts, targets)
        with torch.no_grad():
            logits = self._routed_logits(prompts, data).float()
        scored = data.targets != IGNORE
        log_probs = torch.log_softmax(logits, -1).gather(-1, data.targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = -(log_probs * scored).sum(-1) / scored.sum(-1).clamp(min=1)
        return [float(x) for x in torch.exp(nll).tolist()]

    def route(self, prompts: Sequence[str]) -> list[Route | None]:
        """Per prompt: the block, cluster and centre distance it is routed to, or None (base model)."""
        prompts = self._texts(prompts, "prompts")
        if not prompts:
            return []
        hits = self._hits(prompts)
        return [None if hit is None else Route(hit.block, hit.cluster_id, float(hit.distance)) for hit in hits]

    def keys(self, prompts: Sequence[str]) -> torch.Tensor:
        """Keys of ``prompts`` [n, dim] float32 on the CPU, as the vector database would index them
        as edit prompts: the key module's output at each prompt's last real token, or the scope key
        with the subject inferred from the prompt (key_source "scope")."""
        prompts = self._texts(prompts, "prompts")
        if not prompts:
            return torch.zeros((0, self._db.dim))
        if self._scope is not None:
            subjects = [normalized_subject(infer_subject(p)) for p in prompts]
            return torch.from_numpy(self._scope.edit_keys(prompts, subjects))
        return self._keys(prompts).cpu()

    def _teacher_forced(self, prompts: Sequence[str], targets: Sequence[str]) -> tuple[list[str], TeacherForced]:
        prompts = self._texts(prompts, "prompts")
        targets = self._texts(targets, "targets")
        if len(prompts) != len(targets):
            raise ValueError(f"prompts has {len(prompts)} entries but targets has {len(targets)}; pass one target per prompt")
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt")
        if self._label_ids:
            unknown = [t for t in targets if normalize_label(t) not in self._label_ids]
            if unknown:
                raise ValueError(f"targets {unknown[:3]!r} are not labels of this classifier; known: {sorted(self._label_ids)}")
            labels: list[str | int] = [self._label_ids[normalize_label(t)] for t in targets]
            return prompts, self._encoder.teacher_forced(prompts, labels)
        return prompts, self._encoder.teacher_forced(prompts, list(targets))

    def _routed_logits(self, prompts: list[str], data: TeacherForced) -> torch.Tensor:
        """Logits of a teacher-forced batch, each row routed by its prompt alone."""
        state = CallState(
            key_module=self._attachment.key_module, factors=self._factors, attention_mask=data.batch.key_mask
        )
        if self._encoder.causal or self._scope is not None:
            # The sequence holds prompt + target, so the key comes from a prompt-only pass.
            state.blocks = self._blocks_of(self._hits(prompts))
        else:
            state.router = self._router(self._db)
        with use_state(state):
            return self.model(**data.batch.inputs).logits

    # ------------------------------------------------------------------------------------ routing

    def _serving_state(self, key_mask: torch.Tensor, questions: list[str] | None = None) -> CallState:
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

    def _inputs(self, rows: Sequence[Prompt]) -> tuple[list[str], list[str]]:
        """Model texts (chats rendered) and the question routing reads, per row."""
        if isinstance(rows, str) or not isinstance(rows, Sequence):
            raise ValueError(f"prompts must be a list of prompts or chat conversations, got {type(rows).__name__}")
        texts, questions = [], []
        for i, row in enumerate(rows):
            if isinstance(row, str):
                texts.append(row)
                questions.append(row)
                continue
            messages = check_messages(row, f"prompts[{i}]")
            texts.append(render(self.tokenizer, messages))
            questions.append(user_question(messages))
        return texts, questions

    def _router(self, db: VectorDB):
        def route(keys: torch.Tensor) -> torch.Tensor:
            return self._blocks_of(db.search(keys.cpu().numpy())).to(keys.device)

        return route

    def _blocks_of(self, hits: list[Hit | None]) -> torch.Tensor:
        blocks = [-1 if hit is None else hit.block for hit in hits]
        return torch.tensor(blocks, dtype=torch.long, device=model_device(self.model))

    def _keys(self, texts: list[str]) -> torch.Tensor:
        """Keys of ``texts`` [n, dim] float32: forward passes that stop at the key module."""
        chunks = []
        for start in range(0, len(texts), _KEY_CHUNK):
            batch = self._encoder.prompts(texts[start : start + _KEY_CHUNK])
            state = CallState(
                key_module=self._attachment.key_module, attention_mask=batch.key_mask, capture_only=True
            )
            with use_state(state), torch.no_grad():
                try:
                    self.model(**batch.inputs)
                except KeysCaptured:
                    pass
            if state.keys is None:
                raise RuntimeError(f"key module {self._attachment.key_module!r} did not run during the forward pass")
            chunks.append(state.keys)
        return torch.cat(chunks)

    @staticmethod
    def _texts(texts: Sequence[str], field: str) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise ValueError(f"{field} must be a list of strings, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{field}[{i}] must be a string, got {type(text).__name__}")
        return list(texts)

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
            return export_files(self.config, self._factors, self._db, scope)

    @classmethod
    def from_files(cls, files: dict[str, bytes], model: nn.Module, tokenizer) -> MeloEditor:
        """Rebuild an editor from :meth:`export_files` output over ``model`` (same base weights)."""
        state = read_files(files)
        editor = cls(model, tokenizer, state.config)
        for name, (d_in, d_out) in state.layer_shapes.items():
            layer = editor._factors[name]
            if (layer.d_in, layer.d_out) != (d_in, d_out):
                raise ValueError(
                    f"layer {name!r} is {d_in}->{d_out} in the files but {layer.d_in}->{layer.d_out} in this "
                    "model; load the files onto the model they were made for"
                )
        for block in state.blocks:
            for name, (a, b) in block.items():
                editor._factors[name].append(a, b)
        if state.db.dim != editor._db.dim:
            raise ValueError(f"keys have dim {state.db.dim} in the files but {editor._db.dim} in this editor")
        editor._db = state.db
        if editor._scope is not None and state.scope is not None:
            editor._scope = editor._scope.restored(state.scope)
        return editor

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write :meth:`export_files` into ``directory`` (created if missing)."""
        root = Path(directory)
        for name, data in self.export_files().items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: nn.Module, tokenizer) -> MeloEditor:
        """Read an editor written by :meth:`save`."""
        root = Path(directory)
        if not root.is_dir():
            raise ValueError(f"directory={str(root)!r} does not exist or is not a directory")
        files = {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}
        return cls.from_files(files, model, tokenizer)
