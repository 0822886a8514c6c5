"""System extensions for real: `particle build` makes sysext images of `[extensions]`,
`particle ext build --base` makes one for an existing build, and a booted guest adds them live
(`particle ext add`), keeps them over a reboot, refuses one built for another base version,
loads a DKMS-built kernel module with modprobe, and removes an extension live.

One QEMU run with two boots; the extensions reach the guest on a second, read-only disk that
is also the image's update source (`[update] source = "/mnt/exts"`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from particleos.builder import BuildResult
from particleos.disk import PartType, make_ext4, read_table
from particleos.ext.cli import ExtBuild, build_for_base
from particleos.formats import parse_sha256sums
from particleos.machine.sysext import parse_release, read_image
from particleos.tools import ToolsTree
from particleos.vm import VM, VMOptions

from .conftest import BuildFn

pytestmark = pytest.mark.slow
ID = "particle-minimal"
V1, V2 = "1.0.0", "1.0.1"


@dataclass
class Builds:
    base: BuildResult  # V1 with devtools and dkmstest built in
    other: BuildResult  # V2 of the same image, no extensions
    hello: ExtBuild  # `particle ext build --base` of V2: an extension for another version
    hello_seconds: float


@pytest.fixture(scope="module")
def builds(build_image: BuildFn) -> Builds:
    base = build_image("extensions", V1)
    other = build_image("extbase", V2)
    start = time.monotonic()
    hello = build_for_base(other.output_dir, "hello", ["hello"])
    return Builds(base, other, hello, time.monotonic() - start)


def checks(console: str) -> dict[str, str]:
    return dict(re.findall(r"PARTICLE-CHECK ([\w-]+)=(.*?)\r?\n", console))


def stamps(console: str) -> dict[str, float]:
    """Kernel time stamps (seconds since that boot) of the check lines: the timeline."""
    found = re.findall(r"\[\s*(\d+\.\d+)\][^\n]*?PARTICLE-CHECK ([\w-]+)", console)
    return {key: float(t) for t, key in found}


def extract_usr(image: Path, dest: Path) -> Path:
    """Unpack the usr partition of an extension image (erofs) with the tools tree."""
    part = next(p for p in read_table(image) if p["type"].lower() == str(PartType.USR))
    ToolsTree().run(
        ["fsck.erofs", f"--offset={part['start'] * 512}", f"--extract={dest}", "--xattrs",
         str(image)],
        binds=[image.parent, dest.parent], what="fsck.erofs --extract",
    )
    return dest


def test_extension_images(builds: Builds, tmp_path: Path) -> None:
    out = builds.base.output_dir
    manifest = json.loads((out / f"{ID}_{V1}.manifest.json").read_text())
    sums = parse_sha256sums((out / "SHA256SUMS").read_text())
    assert "gcc" not in manifest["packages"] and "make" not in manifest["packages"]
    for name in ("devtools", "dkmstest"):
        image = out / f"{ID}-{name}_{V1}.raw"
        info = manifest["extensions"][name]
        assert info["file"] == image.name and image.name in sums
        # GPT per the Discoverable Partitions Specification: usr + usr-verity, UUIDs from the
        # root hash, and the root hash the machine derives is the one the build computed.
        table = read_table(image)
        types = sorted(p["type"].lower() for p in table)
        assert types == sorted([str(PartType.USR), str(PartType.USR_VERITY)])
        got = read_image(image)
        assert got.root_hash == info["root_hash"] and not got.signed
        usr = next(p for p in table if p["type"].lower() == str(PartType.USR))
        assert usr["uuid"].lower().replace("-", "") == got.root_hash[:32]
        # The hash tree is the one veritysetup accepts for the data partition.
        verity = next(p for p in table if p["type"].lower() == str(PartType.USR_VERITY))
        data, tree = tmp_path / f"{name}.data", tmp_path / f"{name}.tree"
        for part, dest in ((usr, data), (verity, tree)):
            with image.open("rb") as f, dest.open("wb") as d:
                f.seek(part["start"] * 512)
                d.write(f.read(part["size"] * 512))
        proc = subprocess.run(["veritysetup", "verify", str(data), str(tree), got.root_hash],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    devtools = manifest["extensions"]["devtools"]
    assert {"gcc", "make", "libc6-dev"} <= set(devtools["packages"])
    assert devtools["changed_base_files"] == []
    # Only what the packages add: far less than a tree with them, and no base files.
    files = extract_usr(out / f"{ID}-devtools_{V1}.raw", tmp_path / "devtools")
    assert (files / "bin/make").is_file() and (files / "bin/gcc").exists()
    assert not (files / "bin/bash").exists() and not (files / "lib/os-release").exists()
    release = files / "lib/extension-release.d/extension-release.devtools"
    fields = parse_release(release.read_text())
    assert fields["ID"] == "debian" and fields["VERSION_ID"] == "13"
    assert (fields["IMAGE_ID"], fields["IMAGE_VERSION"]) == (ID, V1)
    assert fields["SYSEXT_LEVEL"] == f"{ID}-{V1}"
    assert os.getxattr(release, "user.extension-release.strict") == b"0"
    # DKMS: the module and the depmod indexes only; no compiler, headers or sources.
    dkms = extract_usr(out / f"{ID}-dkmstest_{V1}.raw", tmp_path / "dkms")
    kernel = manifest["kernel"]
    kept = sorted(str(p.relative_to(dkms)) for p in dkms.rglob("*") if p.is_file())
    assert f"lib/modules/{kernel}/updates/dkms/dkms_test.ko.xz" in kept
    assert f"lib/modules/{kernel}/modules.dep" in kept
    assert not [p for p in kept if p.startswith(("bin/", "src/", "lib/gcc"))], kept
    assert manifest["extensions"]["dkmstest"]["modules"] == ["updates/dkms/dkms_test.ko.xz"]


def test_ext_build_after_the_fact(builds: Builds) -> None:
    r = builds.hello.result
    assert r.path == builds.other.output_dir / f"{ID}-hello_{V2}.raw"
    assert r.path.name in parse_sha256sums((builds.other.output_dir / "SHA256SUMS").read_text())
    assert "hello" in r.packages
    assert read_image(r.path).root_hash == r.root_hash
    # The fast path: a fraction of a full rebuild of the base (which rebuilds every extension).
    full = sum(builds.base.timings.values())
    print(f"\next build --base: {builds.hello_seconds:.1f} s; full build with 2 extensions: "
          f"{full:.1f} s")


@pytest.fixture(scope="module")
def exts_disk(builds: Builds, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ext4 disk with the three extension images and their SHA256SUMS."""
    d = tmp_path_factory.mktemp("exts")
    content = d / "content"
    content.mkdir()
    images = [builds.base.output_dir / f"{ID}-devtools_{V1}.raw",
              builds.base.output_dir / f"{ID}-dkmstest_{V1}.raw", builds.hello.result.path]
    sums = {**parse_sha256sums((builds.base.output_dir / "SHA256SUMS").read_text()),
            **parse_sha256sums((builds.other.output_dir / "SHA256SUMS").read_text())}
    for image in images:
        shutil.copyfile(image, content / image.name)
    (content / "SHA256SUMS").write_text(
        "".join(f"{sums[i.name]}  {i.name}\n" for i in images))
    size = sum(i.stat().st_size for i in images) + (64 << 20)
    make_ext4(d / "exts.img", size, label="exts", uuid=uuid.uuid4(), root_dir=content)
    shutil.rmtree(content)
    return d / "exts.img"


def test_guest_adds_and_removes_extensions_live(builds: Builds, exts_disk: Path,
                                                tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    extra = ["-drive", f"if=none,id=exts,format=raw,readonly=on,file={exts_disk}",
             "-device", "virtio-blk-pci,drive=exts"]
    with VM(builds.base.disk, VMOptions(snapshot=True, log=log, nic=["none"], extra=extra)) as vm:
        vm.expect(r"PARTICLE-CHECK done-first-boot", timeout=900)
        first = checks(vm.text())
        vm.expect(r"PARTICLE-CHECK done-second-boot", timeout=600)
        boot1, boot2 = vm.text().split("PARTICLE-CHECK done-first-boot", 1)
        second = checks(boot2)
        assert vm.wait(timeout=180) == 0
    print(f"\nguest checks, first boot: {json.dumps(first, indent=1)}")
    print(f"guest checks, second boot: {json.dumps(second, indent=1)}")
    t1, t2 = stamps(boot1 + "PARTICLE-CHECK done-first-boot"), stamps(boot2)
    print(f"timeline: boot 1 running at {t1['system-state']:.0f} s, checks done at "
          f"{t1['done-first-boot']:.0f} s; boot 2 running at {t2['system-state']:.0f} s, "
          f"done at {t2['done-second-boot']:.0f} s; `ext add devtools` "
          f"{int(first['add-devtools-ms']) / 1000:.1f} s, `ext remove` "
          f"{t2['remove-rc'] - t2['usr-write']:.1f} s")
    assert first["image-version"] == V1 and first["sysext-level"] == f"{ID}-{V1}"
    assert first["exts-mounted"] == "yes"
    # The base has no compiler; systemd-sysext is enabled in the image.
    assert first["base-gcc"] == "missing" and first["base-make"] == "missing"
    assert first["sysext-enabled"] == "enabled" and first["sync-enabled"] == "enabled"
    # `particle ext add devtools`: fetched by name from the update source, usable at once.
    assert first["add-devtools-rc"] == "0", first["add-devtools-out"]
    assert "merged into /usr" in first["add-devtools-out"]
    assert first["gcc-path"] == "/usr/bin/gcc"
    assert first["gcc-run"].strip() == "hello from gcc"
    assert first["make-run"].strip() == "made-by-make"
    assert first["usr-fstype"] == "overlayfs"  # systemd-sysext's merge
    assert "05-particle-ext-devtools.transfer" in first["transfer"]
    assert int(first["verity-devices"]) >= 2  # base /usr + the extension, both dm-verity
    # The transient overlay: /usr writable, kept while an extension is added, gone at reboot.
    assert first["overlay-rc"] == "0" and first["overlay-write"] == "ok"
    assert "ACTIVE" in first["overlay-status"]
    assert first["overlay-kept"].strip() == "written in the overlay"
    # DKMS module built against the image's kernel, loaded with modprobe.
    assert first["add-dkms-rc"] == "0", first["add-dkms-out"]
    assert first["modprobe"].strip() == "loaded" and int(first["dmesg-dkms"]) >= 1
    # An extension of another base version: refused by particle with a clear message...
    assert first["add-other-rc"] == "1"
    assert f"built for {ID} {V2}, this machine runs {ID} {V1}" in first["add-other-out"]
    # ... and ignored by systemd-sysext itself.
    assert first["handmade-merged"] == "0" and first["hello-path"] == "missing"
    assert "devtools" in first["merged"] and "dkmstest" in first["merged"]
    # After a reboot: merged again at boot, the overlay is gone, /usr read-only again.
    assert "not active" in second["overlay-after-reboot"]
    assert second["overlay-file-after-reboot"] == "gone"
    assert second["sysext-state"] == "active"
    assert "devtools" in second["merged-after-reboot"]
    assert second["gcc-after-reboot"].strip() == "hello from gcc"
    assert second["modprobe-after-reboot"].strip() == "loaded"
    assert second["usr-write"] == "refused"
    # `particle ext remove`: gone at once, the other extension stays.
    assert second["remove-rc"] == "0", second["remove-out"]
    assert second["gcc-after-remove"] == "missing" and second["make-after-remove"] == "missing"
    assert second["modprobe-still"] == "loaded"
    assert second["remove-missing-rc"].startswith("1")
    assert "not installed" in second["remove-missing-rc"]
    assert "dkmstest" in second["list-after-remove"]
    assert "devtools" not in second["list-after-remove"]
