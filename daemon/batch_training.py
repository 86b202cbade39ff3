"""Step 2 of a batch (daemon/worker.py's docstring): train one micro-batch as a block in a helper
thread while the loop thread keeps the event source alive, and leave out the edits the editor refuses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from daemon.writer_state import BatchAbandoned, WriterState

if TYPE_CHECKING:
    from melo_runtime.edits import BatchResult, Edit


class BatchTrainer:
    """Trains batches on the writer's editor; :attr:`abandoned` tells whether a training thread outlived the loop."""

    def __init__(self, state: WriterState, training_display: Callable[[str], Any] | None = None) -> None:
        """``training_display(description)``, when given, returns a progress display (``refresh()``,
        ``close()``: a tqdm bar) shown while a block trains -- `melo run` passes one on a terminal."""
        self.state = state
        self.training_display = training_display
        self._thread: threading.Thread | None = None

    @property
    def abandoned(self) -> bool:
        """True if a training thread is still running (after the loop stopped, the CLI exits without it)."""
        return self._thread is not None and self._thread.is_alive()

    def apply(self, edits: list[Edit]) -> tuple[list[BatchResult], list[tuple[Edit, str]]]:
        """Train ``edits``; edits the editor refuses (ValueError) are left out so the valid ones
        still land as one block. Refusals are found edit by edit without training; only edits that
        are valid alone but refused together are isolated by bisection (each half its own block)."""
        try:
            return [self._train(edits)], []
        except ValueError as error:
            if len(edits) == 1:
                return [], [(edits[0], str(error))]
        assert self.state.editor is not None
        rejected: list[tuple[Edit, str]] = []
        for edit in edits:
            try:
                self.state.editor.check_edit(edit)
            except ValueError as error:
                rejected.append((edit, str(error)))
        if rejected:
            refused = {id(edit) for edit, _ in rejected}
            good = [edit for edit in edits if id(edit) not in refused]
            results, more = self.apply(good) if good else ([], [])
            return results, rejected + more
        middle = len(edits) // 2
        left_results, left_rejected = self.apply(edits[:middle])
        right_results, right_rejected = self.apply(edits[middle:])
        return left_results + right_results, left_rejected + right_rejected

    def _train(self, edits: list[Edit]) -> BatchResult:
        editor = self.state.editor
        assert editor is not None
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["result"] = editor.apply_batch(edits)
            except BaseException as error:  # noqa: BLE001 - re-raised on the loop thread below
                outcome["error"] = error

        self._thread = threading.Thread(target=target, name="melo-train", daemon=True)
        self._thread.start()
        display = None
        if self.training_display is not None:
            display = self.training_display(f"training block {getattr(editor, 'blocks', '?')} ({len(edits)} edits)")
        try:
            while self._thread.is_alive():
                if self.state.stopping.is_set():
                    raise BatchAbandoned()
                self._thread.join(0.2)
                self.state.source.keepalive(0)
                if display is not None:
                    display.refresh()
        finally:
            if display is not None:
                display.close()
        self._thread = None
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
