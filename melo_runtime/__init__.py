"""MELO block-LoRA model editing as a library (arXiv 2312.11795): no Kafka, Redis or HTTP here.

Public surface (docs/contracts.md): ``Edit``, ``MeloConfig``, ``BatchResult``, ``Route``,
``MeloEditor`` and ``VectorDB``.
"""

from melo_runtime.config import MeloConfig
from melo_runtime.editor import MeloEditor
from melo_runtime.edits import BatchResult, Edit, Route
from melo_runtime.vectordb import VectorDB

__all__ = ["BatchResult", "Edit", "MeloConfig", "MeloEditor", "Route", "VectorDB"]
