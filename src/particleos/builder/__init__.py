"""The image builder: spec -> Debian tree -> hermetic /usr -> erofs + verity -> UKI -> GPT."""

from .pipeline import STAGES, BuildResult, build, clean, resolve_version

__all__ = ["STAGES", "BuildResult", "build", "clean", "resolve_version"]
