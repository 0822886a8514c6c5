"""The declarative spec: models, loading with includes/profiles/overrides, and error reporting."""

from .loader import (
    json_schema,
    load_spec,
    resolve_spec_path,
    resolved_version,
    spec_digest,
    summary_text,
)
from .model import Spec

__all__ = [
    "Spec",
    "json_schema",
    "load_spec",
    "resolve_spec_path",
    "resolved_version",
    "spec_digest",
    "summary_text",
]
