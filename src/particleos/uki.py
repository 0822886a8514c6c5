"""Unified Kernel Images: kernel, initrd, os-release and a command line that pins the exact
/usr (usrhash=) in one PE file that systemd-boot finds in /EFI/Linux. Built with ukify from
the tools tree, using the systemd-stub of the image itself so stub and OS match."""

from __future__ import annotations

from pathlib import Path

from .spec import Spec
from .spec.model import Boot
from .tools import ToolsTree


def usr_cmdline(root_hash_hex: str, filesystem: str, extra: list[str]) -> list[str]:
    """The kernel command line of one version: its own /usr, found and checked by hash."""
    return [
        f"usrhash={root_hash_hex}",
        "mount.usr=/dev/mapper/usr",
        f"mount.usrfstype={filesystem}",
        "mount.usrflags=ro",
        "rw",
        "systemd.firstboot=off",
        *extra,
    ]


def trial_cmdline(boot: Boot) -> list[str]:
    """panic= always (a panicking kernel reboots, blessed or not: nobody can use a panicked
    machine); particle.trial_timeout= tells particle-trial, in the initrd and the real root,
    to make a counted boot reboot on any failure (absent: on_failure = "none")."""
    args = [f"panic={boot.panic_reboot}"]
    if boot.on_failure == "reboot":
        args.append(f"particle.trial_timeout={boot.trial_timeout}")
    return args


def spec_cmdline(spec: Spec) -> list[str]:
    """What the spec adds to every version's kernel command line: its own arguments, then the
    trial-boot switches (the /usr signature, when signed, follows)."""
    return [*spec.kernel.cmdline, *trial_cmdline(spec.boot)]


def build_uki(
    tools: ToolsTree,
    *,
    output: Path,
    linux: Path,
    initrd: Path,
    os_release: Path,
    stub: Path,
    cmdline: list[str],
    uname: str,
    workdir: Path,
) -> Path:
    cmdline_file = workdir / "cmdline"
    cmdline_file.write_text(" ".join(cmdline) + "\n")
    tools.run(
        [
            "ukify", "build",
            f"--linux={linux}", f"--initrd={initrd}",
            f"--os-release=@{os_release}", f"--cmdline=@{cmdline_file}",
            f"--uname={uname}", f"--stub={stub}", f"--output={output}",
        ],
        binds={workdir, output.parent, linux.parent, initrd.parent, os_release.parent,
               stub.parent},
        what="ukify",
    )
    return output
