"""JSON Schemas for edit, control and manifest documents, and the validators the daemon uses.

Language-neutral contract for producers: the *.v1.json files are the source of truth; this package
imports nothing from `daemon` or `melo_runtime`.
"""

from schemas.events import ControlEvent, EditEvent, LocalityProbe
from schemas.validate import (
    MODEL_NAME,
    InvalidEvent,
    Limits,
    Reason,
    load_schema,
    manifest_problems,
    parse_control,
    parse_edit,
)

__all__ = [
    "MODEL_NAME",
    "ControlEvent",
    "EditEvent",
    "InvalidEvent",
    "Limits",
    "LocalityProbe",
    "Reason",
    "load_schema",
    "manifest_problems",
    "parse_control",
    "parse_edit",
]
