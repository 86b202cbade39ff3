"""The MELO cluster vector database: edit keys grouped into labelled balls, searched through HNSW.

The rules (add, expand, join, conflict, supersede, the ``split`` policy), search, index maintenance
and persistence are specified in docs/vectordb.md. The package:

- ``algebra``: pure numpy -- distances, centres, regrouping and split planning;
- ``centres``: the centre index -- exact scan, HNSW graph, and the graph's base and log;
- ``state``: the database to and from a JSON-able dict and named arrays;
- ``db``: :class:`VectorDB`, the insertion rules, retract and search.
"""

from melo_runtime.vectordb.algebra import CONFLICT_POLICIES, SAME_INPUT_TOLERANCE
from melo_runtime.vectordb.centres import CANDIDATES, EXACT_SEARCH_MAX_CLUSTERS
from melo_runtime.vectordb.db import Hit, InsertReport, VectorDB
from melo_runtime.vectordb.state import STATE_FORMAT, segment_name

__all__ = [
    "CANDIDATES",
    "CONFLICT_POLICIES",
    "EXACT_SEARCH_MAX_CLUSTERS",
    "SAME_INPUT_TOLERANCE",
    "STATE_FORMAT",
    "Hit",
    "InsertReport",
    "VectorDB",
    "segment_name",
]
