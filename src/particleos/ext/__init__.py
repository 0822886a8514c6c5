"""System extensions (systemd-sysext) built against one exact base: the host side of
`[extensions.NAME]` and `particle ext build`. The machine side is particleos.machine.ext."""

from .builder import BaseInfo, ExtensionResult, build_extension

__all__ = ["BaseInfo", "ExtensionResult", "build_extension"]
