"""`particle qemu` and the VM class against a stand-in `qemu-system-x86_64` (first on PATH) that
behaves like the hosts of issue 9: KVM that pauses the guest with "KVM internal error", KVM
that aborts on an MSR, firmware that finds nothing to boot, QEMU that exits. The real CLI runs
in a subprocess; nothing here boots a real guest (tests/integration does)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from particleos import vm
from particleos.disk import MiB, Partition, PartType, make_esp, write_disk

# Every mode below keeps the stand-in alive for at most this long, so a runner that fails to
# notice a dead guest makes its test fail (with another message) instead of hanging.
STANDIN = f"""#!{sys.executable}
import os, sys, time
argv = sys.argv[1:]
mode = os.environ["STANDIN_MODE"]
with open(os.environ["STANDIN_LOG"], "a") as f:
    f.write(" ".join(argv) + "\\n")
kvm = argv[argv.index("-accel") + 1] == "kvm"
for a in argv:  # a TPM: is swtpm listening on the socket QEMU is given?
    if a.startswith("socket,id=chrtpm,path="):
        import socket
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(a.split("path=", 1)[1])
            state = "connected"
        except OSError as e:
            state = f"refused ({{e}})"
        s.close()
        with open(os.environ["STANDIN_LOG"] + ".tpm", "a") as f:
            f.write(state + "\\n")
booting = any(a.startswith("if=none,id=disk0,") for a in argv)  # the probe has no disk

def out(text):
    sys.stdout.write(text)
    sys.stdout.flush()

def err(text):
    sys.stderr.write(text)
    sys.stderr.flush()

def stay():
    time.sleep(120)
    sys.exit(0)

if kvm and (mode == "kvm-broken" or (mode == "kvm-fails-at-boot" and booting)):
    err("KVM internal error. Suberror: 1\\nextra data[0]: 0x0000000000000000\\n"
        "emulation failure\\nRAX=0000000000000000 RBX=0000000000000000\\n")
    stay()  # as QEMU does: the guest is paused, the process lives on
if kvm and mode == "kvm-aborts":
    err("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69\\n"
        "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: "
        "Assertion `ret == cpu->kvm_msr_buf->nmsrs' failed.\\n")
    os.abort()
if not booting:
    stay()  # the probe: the firmware runs and QEMU says nothing
if mode == "no-boot":  # what Debian 12's OVMF prints for an empty disk
    out('BdsDxe: failed to load Boot0001 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x2,0x0): '
        'Not Found\\r\\nBdsDxe: loading Boot0002 "EFI Internal Shell" from Fv(7CB8)\\r\\n'
        'BdsDxe: starting Boot0002 "EFI Internal Shell" from Fv(7CB8)\\r\\n'
        "UEFI Interactive Shell v2.2\\r\\nShell> ")
    stay()
if mode == "exits":
    out("BdsDxe: loading Boot0001\\r\\n")
    err("qemu-system-x86_64: terminating on signal 15\\n")
    sys.exit(1)
out("BdsDxe: starting Boot0001\\r\\nLinux version 6.1.0\\r\\n\\r\\n"
    "Debian GNU/Linux 12 particle ttyS0\\r\\n\\r\\nparticle login: ")
if os.environ.get("STANDIN_POWER_OFF"):
    sys.exit(0)  # as after Ctrl-a x, or a guest that powers off
stay()
"""


@pytest.fixture
def standin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding the stand-in QEMU, first on PATH; returns the invocation log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "qemu-system-x86_64"
    script.write_text(STANDIN)
    script.chmod(0o755)
    log = tmp_path / "qemu-invocations.log"
    log.touch()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STANDIN_LOG", str(log))
    monkeypatch.delenv("PARTICLE_ACCEL", raising=False)
    monkeypatch.setattr(vm, "_kvm_problems", {})  # the probe's cache is per process
    return log


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small GPT disk with an ESP and an unsigned boot loader: all `particle qemu` reads of
    an image before it starts QEMU."""
    d = tmp_path_factory.mktemp("image")
    pe = bytearray(0x200)
    pe[0:2] = b"MZ"
    pe[0x3C:0x40] = (0x40).to_bytes(4, "little")
    pe[0x40:0x44] = b"PE\0\0"
    pe[0x40 + 24 : 0x40 + 26] = (0x20B).to_bytes(2, "little")
    (d / "bootx64.efi").write_bytes(bytes(pe))
    make_esp(d / "esp.img", 34 * MiB, {"/EFI/BOOT/BOOTX64.EFI": d / "bootx64.efi"})
    disk = d / "dummy.raw"
    write_disk(disk, [Partition("esp", PartType.ESP, uuid.uuid4(), 40 * MiB, d / "esp.img")],
               uuid.uuid4())
    return disk


def particle_qemu(image: Path, mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STANDIN_MODE": mode}
    return subprocess.run(
        [sys.executable, "-m", "particleos", "qemu", str(image), "--snapshot",
         "--timeout", "600", *args],
        env=env, capture_output=True, text=True, check=False, timeout=900,
    )


def accels(log: Path) -> list[str]:
    """The -accel of every QEMU started, in order ("probe:" marks the KVM probe)."""
    out = []
    for line in log.read_text().splitlines():
        argv = line.split()
        kind = "boot" if any(a.startswith("if=none,id=disk0,") for a in argv) else "probe"
        out.append(f"{kind}:{argv[argv.index('-accel') + 1]}")
    return out


def test_kvm_error_during_boot_restarts_under_tcg(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "kvm-fails-at-boot", "--expect", "login:")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("under TCG") == 1, proc.stderr
    assert "KVM does not work here (KVM internal error. Suberror: 1); restarting under TCG" \
        in proc.stderr
    assert "found 'login:'" in proc.stderr
    assert accels(standin) == ["probe:kvm", "boot:kvm", "boot:tcg"]


def test_interactive_boot_restarts_under_tcg(image: Path, standin: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --expect the terminal is the console; QEMU's messages are still watched."""
    monkeypatch.setenv("STANDIN_POWER_OFF", "1")
    proc = particle_qemu(image, "kvm-fails-at-boot")
    assert proc.returncode == 0, proc.stderr
    assert "particle login: " in proc.stdout
    assert proc.stderr.count("restarting under TCG") == 1, proc.stderr
    assert accels(standin) == ["probe:kvm", "boot:kvm", "boot:tcg"]
    assert "-serial mon:stdio" in standin.read_text()


def test_kvm_that_fails_the_probe_boots_under_tcg(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "kvm-broken", "--expect", "login:")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("under TCG") == 1, proc.stderr
    assert "KVM does not work here (KVM internal error. Suberror: 1); booting under TCG" \
        in proc.stderr
    assert accels(standin) == ["probe:kvm", "boot:tcg"]


def test_secure_boot_also_falls_back(image: Path, standin: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The Secure Boot firmware needs SMM, which the user's broken KVM refused outright."""
    monkeypatch.setenv("STANDIN_MODE", "kvm-aborts")
    v = vm.VM(image, vm.VMOptions(snapshot=True, secure_boot=True)).start()
    try:
        assert v.expect("login:", 600)
        assert v.accel == "tcg"
    finally:
        v.close()
    log = standin.read_text()
    assert "smm=on" in log and "secboot" in log


def test_accel_kvm_fails_fast_with_the_reason(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "kvm-fails-at-boot", "--expect", "login:", "--accel", "kvm")
    assert proc.returncode == 1
    assert "KVM failed: KVM internal error. Suberror: 1" in proc.stderr
    assert "timed out" not in proc.stderr
    proc = particle_qemu(image, "kvm-broken", "--expect", "login:", "--accel", "kvm")
    assert proc.returncode == 1
    assert "error: KVM does not work here: KVM internal error. Suberror: 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_accel_tcg_never_probes(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "kvm-broken", "--expect", "login:", "--accel", "tcg")
    assert proc.returncode == 0, proc.stderr
    assert "KVM" not in proc.stderr
    assert accels(standin) == ["boot:tcg"]


def test_firmware_without_boot_entry_fails_fast(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "no-boot", "--expect", "login:", "--accel", "tcg")
    assert proc.returncode == 1
    assert "the firmware found nothing to boot" in proc.stderr
    assert "timed out" not in proc.stderr


def test_qemu_that_exits_fails_fast(image: Path, standin: Path) -> None:
    proc = particle_qemu(image, "exits", "--expect", "login:")
    assert proc.returncode == 1
    assert "QEMU exited with status 1; 'login:' did not appear" \
        in proc.stderr
    assert "terminating on signal 15" in proc.stderr  # the console tail says why
    assert "timed out" not in proc.stderr


def test_vm_expect_raises_when_the_guest_is_dead(image: Path, standin: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Integration tests see the same fail-fast as `particle qemu`, as a VMError."""
    monkeypatch.setenv("STANDIN_MODE", "no-boot")
    with vm.VM(image, vm.VMOptions(snapshot=True, accel="tcg")) as v, \
            pytest.raises(vm.VMError, match="nothing to boot"):
        v.expect(r"PARTICLE-CHECK done", timeout=600)


def test_vm_restart_keeps_expect_in_order(image: Path, standin: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_MODE", "kvm-fails-at-boot")
    with vm.VM(image, vm.VMOptions(snapshot=True)) as v:
        assert v.expect("Linux version", 600)
        assert v.expect("login:", 600)
        assert v.accel == "tcg"
        assert "KVM internal error" in v.text()  # the dead boot stays in the console


@pytest.mark.parametrize(("mode", "problem"), [
    ("ok", None),
    ("kvm-broken", "KVM internal error. Suberror: 1"),
    ("kvm-aborts", "failed to set MSR 0x10a to 0x69"),
])
def test_probe(standin: Path, monkeypatch: pytest.MonkeyPatch, mode: str,
               problem: str | None) -> None:
    monkeypatch.setenv("STANDIN_MODE", mode)
    assert vm.kvm_problem() == problem
    assert vm.kvm_problem() == problem
    assert accels(standin) == ["probe:kvm"]  # cached: probed once per process


def test_probe_of_qemu_that_exits(standin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (standin.parent / "bin/qemu-system-x86_64").write_text(
        "#!/bin/sh\necho 'qemu-system-x86_64: Could not access KVM kernel module' >&2\nexit 1\n")
    assert vm.kvm_problem() == "Could not access KVM kernel module"
    (standin.parent / "bin/qemu-system-x86_64").write_text("#!/bin/sh\necho oops >&2\nexit 3\n")
    assert vm.kvm_problem(secure_boot=True) == \
        "QEMU exited with status 3 while starting the firmware: oops"


# --- a TPM2 for the guest (swtpm) -------------------------------------------------------------


def swtpm_processes(state: Path) -> list[int]:
    """Running swtpm processes that use `state` (read from /proc; nothing is signalled)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"swtpm") and f"dir={state}".encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_tpm_is_a_swtpm_for_the_vms_life(image: Path, standin: Path, tmp_path: Path) -> None:
    state = tmp_path / "tpm-state"
    proc = particle_qemu(image, "ok", "--accel", "tcg", "--tpm", str(state),
                         "--expect", "login:")
    assert proc.returncode == 0, proc.stderr
    boot = next(line.split() for line in standin.read_text().splitlines())
    assert boot[boot.index("-tpmdev") + 1] == "emulator,id=tpm0,chardev=chrtpm"
    assert boot[boot.index("-device", boot.index("-tpmdev")) + 1] == "tpm-tis,tpmdev=tpm0"
    # QEMU found the real swtpm listening when it started; it was gone after QEMU.
    assert Path(f"{standin}.tpm").read_text() == "connected\n"
    assert state.is_dir()
    assert swtpm_processes(state) == []


def test_vm_close_ends_swtpm(image: Path, standin: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STANDIN_MODE", "ok")
    state = tmp_path / "tpm"
    with vm.VM(image, vm.VMOptions(snapshot=True, accel="tcg", tpm=state)) as v:
        v.expect("login:", 600)
        swtpm = v.swtpm
        assert swtpm is not None and swtpm.poll() is None
        assert swtpm_processes(state) == [swtpm.pid]
    assert swtpm.poll() is not None
    assert swtpm_processes(state) == []


def test_swtpm_that_fails_is_a_message(image: Path, standin: Path, tmp_path: Path) -> None:
    fake = standin.parent / "bin/swtpm"
    fake.write_text("#!/bin/sh\necho 'swtpm: Could not open TPM state: Permission denied' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    proc = particle_qemu(image, "ok", "--accel", "tcg", "--tpm", str(tmp_path / "tpm"),
                         "--expect", "login:")
    assert proc.returncode != 0
    assert "swtpm (TPM state " in proc.stderr
    assert "exited with status 1: swtpm: Could not open TPM state: Permission denied" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert standin.read_text() == ""  # QEMU never started
