"""Trial boots: particle-trial (run for real with dash against a fake efivars directory) and
its units, the records it writes and how `particle status` tells them, `particle retry`, and
the spec and build side ([boot] trial_timeout, panic_reboot, the command line)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from particleos import uki
from particleos.builder.context import BuildContext
from particleos.builder.updates import TRIAL_SCRIPT, TRIAL_UNIT, update_definitions
from particleos.errors import SpecError
from particleos.machine import bootlog, entries, status
from particleos.machine.cli import MachineError, build_parser
from particleos.machine.update import retry_target
from particleos.spec import load_spec
from particleos.tools import ToolsTree

SCRIPT = Path(__file__).resolve().parents[2] / \
    "src/particleos/data/dracut/90particle/particle-trial.sh"
LOADER = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRY = "demo_2.0+2-1.efi"


def fake_machine(tmp_path: Path, *, trial: bool = True, initrd: bool = False,
                 cmdline: str = "rw panic=10 particle.trial_timeout=600") -> dict[str, str]:
    efivars = tmp_path / "efivars"
    efivars.mkdir(parents=True, exist_ok=True)
    if trial:
        path = f"\\EFI\\Linux\\{ENTRY}".encode("utf-16-le") + b"\0\0"
        (efivars / f"LoaderBootCountPath-{LOADER}").write_bytes(b"\x06\0\0\0" + path)
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "run").mkdir(exist_ok=True)
    release = tmp_path / "initrd-release"
    if initrd:
        release.write_text("ID=initrd\n")
    return {**os.environ, "PARTICLE_EFIVARS": str(efivars),
            "PARTICLE_CMDLINE": str(tmp_path / "cmdline"),
            "PARTICLE_INITRD_RELEASE": str(release), "PARTICLE_RUN": str(tmp_path / "run"),
            "PARTICLE_KMSG": os.devnull, "PARTICLE_SYSROOT": str(tmp_path / "sysroot"),
            "PARTICLE_FAIL_PAUSE": "0", "PATH": os.environ["PATH"]}


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dash", str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


DATA = SCRIPT.parents[2]


def test_emergency_and_rescue_reboot_instead_of_asking_on_a_trial_boot() -> None:
    for path, shell in ((DATA / "dracut/90particle/emergency-trial.conf",
                         "/usr/bin/dracut-emergency"),
                        (DATA / "trial/emergency-trial.conf",
                         "/usr/lib/systemd/systemd-sulogin-shell emergency")):
        text = path.read_text()
        assert "FailureAction=reboot-force" in text
        assert f"ExecStart=\nExecStart=/usr/lib/particle/particle-trial fail emergency {shell}\n" \
            in text
    rescue = (DATA / "trial/rescue-trial.conf").read_text()
    assert "fail rescue /usr/lib/systemd/systemd-sulogin-shell rescue" in rescue
    setup = (DATA / "dracut/90particle/module-setup.sh").read_text()
    assert "emergency.service.d/50-particle-trial.conf" in setup
    assert "add-wants sysinit.target particle-trial.service" in setup
    initrd_unit = (DATA / "dracut/90particle/particle-trial.service").read_text()
    assert "ExecStart=/usr/lib/particle/particle-trial watch initrd" in initrd_unit
    root_unit = (DATA / "trial/particle-trial.service").read_text()
    assert "ExecStart=/usr/lib/particle/particle-trial watch root" in root_unit
    assert "ExecStop=/usr/lib/particle/particle-trial stop" in root_unit


@pytest.mark.parametrize("trial,cmdline", [
    (False, "particle.trial_timeout=600"),  # blessed entry: no LoaderBootCountPath
    (True, "panic=10"),                     # [boot] on_failure = "none"
])
def test_other_boots_are_left_alone(tmp_path: Path, trial: bool, cmdline: str) -> None:
    env = fake_machine(tmp_path, trial=trial, cmdline=cmdline)
    for stage in ("initrd", "root"):
        assert run(env, "watch", stage).returncode == 0  # ends at once: no deadline
    proc = run(env, "fail", "emergency", "echo", "shell-ran")
    assert proc.returncode == 0 and proc.stdout == "shell-ran\n"  # the usual shell
    assert not (tmp_path / "efivars" / bootlog.LOG_NAME).exists()


def test_records_survive_in_the_variable_and_name_the_stage(tmp_path: Path) -> None:
    env = fake_machine(tmp_path, initrd=True)
    proc = run(env, "fail", "emergency", "echo", "shell-ran")
    assert proc.returncode == 1  # -> FailureAction=reboot-force
    assert "shell-ran" not in proc.stdout
    assert run(env, "fail", "rescue").returncode == 1  # appended to the same variable
    data = (tmp_path / "efivars" / bootlog.LOG_NAME).read_bytes()
    assert data[:4] == b"\x07\0\0\0"  # non-volatile, boot and runtime access
    records = bootlog.parse_log(data)
    assert [(r.file, r.event) for r in records] == [(ENTRY, "emergency"), (ENTRY, "rescue")]
    assert records[1].detail.startswith("root-fs:")  # nothing mounted at the fake /sysroot
    assert records[0].boot == records[1].boot and len(records[0].boot) == 8
    assert records[0].try_number == 1 and records[0].entry_id == "demo_2.0.efi"


LOG = (
    b"\x07\0\0\0"
    b"aaaa0001 demo_2.0+2-1.efi 3 start initrd\n"
    b"aaaa0001 demo_2.0+2-1.efi 9 emergency usr: sysroot-usr.mount initrd-fs.target\n"
    b"aaaa0002 demo_2.0+1-2.efi 3 start initrd\n"
    b"aaaa0002 demo_2.0+1-2.efi 20 root switched to the real root\n"
    b"aaaa0003 demo_2.0+0-3.efi 3 start initrd\n"
    b"aaaa0003 demo_2.0+0-3.efi 20 root switched to the real root\n"
    b"aaaa0003 demo_2.0+0-3.efi 141 timeout boot-complete.target not reached within 120s; "
    b"not done: fault.service\n"
    b"aaaa0004 demo_1.0+2-1.efi 3 start initrd\n"
    b"garbage\n"
)


def test_failed_tries_are_told_per_try(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    efivars, pstore = tmp_path / "efivars", tmp_path / "pstore"
    efivars.mkdir()
    (efivars / bootlog.LOG_NAME).write_bytes(LOG)
    monkeypatch.setattr(bootlog, "current_boot", lambda: "ffff0000")
    # demo_1.0 was blessed since: its old record no longer matters.
    tries = bootlog.failed_tries({"demo_2.0.efi": "bad", "demo_1.0.efi": "good"}, efivars,
                                 pstore)
    got = [(t.try_number, t.reason()[0]) for t in tries]
    assert got == [(1, "usr-setup"), (2, "crash"), (3, "timeout")]
    assert "/usr could not be set up" in tries[0].reason()[1]
    assert "sysroot-usr.mount" in tries[0].reason()[1]
    assert "after the switch to the real root" in tries[1].reason()[1]
    assert "fault.service" in tries[2].reason()[1]
    # systemd-pstore kept the panicked boot's kernel log: the crash is named.
    dump = pstore / "1700000000"
    dump.mkdir(parents=True)
    (dump / "dmesg.txt").write_text(
        "<6>particle-trial: aaaa0002 demo_2.0+1-2.efi 20 root switched to the real root\n"
        "<0>Kernel panic - not syncing: sysrq triggered crash\n")
    tries = bootlog.failed_tries({"demo_2.0.efi": "bad"}, efivars, pstore)
    assert tries[1].reason() == ("panic", "kernel panic: sysrq triggered crash")
    as_json = tries[1].to_json()
    assert as_json["version"] == "2.0" and as_json["try"] == 2 and as_json["boot"] == "aaaa0002"


def test_status_text_names_the_failed_version_and_how() -> None:
    st = {
        "id": "demo", "version": "1.0", "running_slot": "A", "booted_entry": "demo_1.0.efi",
        "boot_assessment": {"bless_boot": "clean", "boot_complete": "inactive"},
        "slots": [], "entries": [], "pending": None, "update_source": None, "notes": [],
        "failed_tries": [{"version": "2.0", "try": 1, "boot": "aaaa0001",
                          "how": "/usr could not be set up or mounted"}],
    }
    assert "failed:     2.0 try 1 (boot aaaa0001): /usr could not be set up or mounted" in \
        status.render(st)


def test_forget_drops_one_entrys_records(tmp_path: Path) -> None:
    (tmp_path / bootlog.LOG_NAME).write_bytes(LOG)
    assert bootlog.forget("demo_2.0.efi", tmp_path) == 7
    assert [r.entry_id for r in bootlog.read_log(tmp_path)] == ["demo_1.0.efi"]
    assert bootlog.forget("demo_2.0.efi", tmp_path) == 0


def entry(name: str, version: str) -> entries.Entry:
    parsed = entries.parse_name(name)
    assert parsed is not None
    return entries.Entry(Path("/esp/EFI/Linux") / name, parsed[0], version, "demo",
                         parsed[1], parsed[2])


def test_retry_gives_a_bad_version_its_tries_again() -> None:
    found = [entry("demo_1.0.efi", "1.0"), entry("demo_2.0+0-3.efi", "2.0")]
    on_disk = {"demo_1.0.efi": True, "demo_2.0+0-3.efi": True}
    chosen, new_name = retry_target(found, "2.0", on_disk, 3)
    assert chosen.version == "2.0" and new_name == "demo_2.0+3-0.efi"
    with pytest.raises(MachineError, match="not marked bad"):
        retry_target(found, "1.0", on_disk, 3)
    with pytest.raises(MachineError, match=r"no boot entry of version 9\.9"):
        retry_target(found, "9.9", on_disk, 3)
    with pytest.raises(MachineError, match="no longer on this disk"):
        retry_target(found, "2.0", {"demo_1.0.efi": True}, 3)
    args = build_parser().parse_args(["retry", "2.0"])
    assert args.version == "2.0" and args.tries is None


def stage_ctx(tmp_path: Path, toml: str) -> BuildContext:
    spec_dir = tmp_path / "spec"
    spec_dir.mkdir(parents=True)
    (spec_dir / "particle.toml").write_text(toml)
    ctx = BuildContext(spec=load_spec(spec_dir), version="1.0", output_dir=tmp_path / "out",
                       work_dir=tmp_path / "work", tools=ToolsTree())
    ctx.tree = tmp_path / "root"
    ctx.tree.mkdir()
    return ctx


def test_build_installs_the_units_and_the_command_line(tmp_path: Path) -> None:
    ctx = stage_ctx(tmp_path / "a", '[system]\nid = "demo"\n[boot]\ntrial_timeout = "15min"\n'
                    'panic_reboot = 30\n')
    update_definitions(ctx)
    assert uki.spec_cmdline(ctx.spec) == ["panic=30", "particle.trial_timeout=900"]
    assert ctx.tree is not None
    assert (ctx.tree / TRIAL_SCRIPT).read_bytes() == SCRIPT.read_bytes()
    assert (ctx.tree / TRIAL_UNIT).is_file()
    assert os.readlink(ctx.tree / "usr/lib/systemd/system/sysinit.target.wants" /
                       "particle-trial.service") == "../particle-trial.service"
    assert "particle-trial fail emergency" in (
        ctx.tree / "usr/lib/systemd/system/emergency.service.d/50-particle-trial.conf").read_text()
    none = stage_ctx(tmp_path / "b", '[system]\nid = "demo"\n[boot]\non_failure = "none"\n')
    update_definitions(none)
    assert uki.spec_cmdline(none.spec) == ["panic=10"]  # no trial switches: no reboots


def test_spec_durations(tmp_path: Path) -> None:
    (tmp_path / "particle.toml").write_text(
        '[system]\nid = "demo"\n[boot]\ntrial_timeout = "soon"\npanic_reboot = 0\n')
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path)
    text = str(err.value)
    assert "boot.trial_timeout" in text and "bad duration 'soon'" in text
    assert "boot.panic_reboot" in text and "greater than zero" in text
    (tmp_path / "particle.toml").write_text('[system]\nid = "demo"\n')
    assert load_spec(tmp_path).boot.trial_timeout == 600


def test_a_failed_usr_mount_is_a_usr_failure_whatever_else_was_mounted() -> None:
    rec = bootlog.Record("aaaa0001", "demo_2.0+2-1.efi", 9, "emergency",
                         "root-fs: sysusr-usr.mount initrd-usr-fs.target")
    t = bootlog.Try("aaaa0001", "demo_2.0.efi", 1, [rec])
    assert t.reason()[0] == "usr-setup"
    rec.detail = "root-fs: sysroot.mount"
    assert t.reason()[0] == "root-fs-setup"
