"""The declarative spec: models, loading with includes/profiles/overrides, and error reporting."""

from .loader import load_spec, resolve_spec_path
from .model import Spec
from .summary import json_schema, resolved_version, spec_digest, summary_text

__all__ = [
    "Spec",
    "json_schema",
    "load_spec",
    "resolve_spec_path",
    "resolved_version",
    "spec_digest",
    "summary_text",
]
