"""The output side: a hostile or damaged output folder, or a run that dies or fails
midway, never makes layoutc write outside ``OUT`` nor leave an ``OUT`` that looks complete
but is not; ``verify`` trusts exactly what was committed and reads nothing outside.

Kills are real (``SIGKILL`` in a child process at the Nth filesystem call of the commit);
a full or read-only disk is a real tmpfs where this process may mount one, and
monkeypatched system calls where it may not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from bounded import ROOT, assert_no_output, assert_refused, tree
from bounded import cli as run_cli

from layoutc import cli
from layoutc.conversion import MANIFEST, convert, execute, verify
from layoutc.formats.deepspeed import infer, open_checkpoint
from layoutc.formats.writers import prepare
from layoutc.lang.check import load_text
from layoutc.plan.compile import compile_plan
from layoutc.runtime import commit as commit_module
from layoutc.runtime.commit import OutputError, OutputExists

GiB = 1 << 30


def _convert(example: Path, out: Path, *args: str) -> None:
    run = run_cli("convert", example, "-o", out, "-q", *args)
    assert run.code == 0, run.err


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _rewrite(out: Path, manifest: dict) -> None:
    (out / MANIFEST).write_text(json.dumps(manifest))


def _record(out: Path, manifest: dict, rel: str) -> None:
    """Make the manifest agree with ``rel`` as it is now (a forger's edit)."""
    data = (out / rel).read_bytes()
    manifest["files"][rel] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}


@pytest.fixture
def universal(example: Path, tmp_path: Path) -> Path:
    out = tmp_path / "u"
    _convert(example, out, "--to", "universal")
    return out


# ------------------------------------------------------------------ kills and failures


KILLER = """
import json, os, signal, sys
from layoutc.conversion import convert
src, out, to, n, hooks, kw = sys.argv[1:]
n, count = int(n), 0
def hooked(real):
    def call(*a, **k):
        global count
        count += 1
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    return call
for name in hooks.split(","):
    setattr(os, name, hooked(getattr(os, name)))
convert(src, out, to, **json.loads(kw))
print(count)
"""

COMMIT_CALLS = "fsync,rename,write,mkdir"
TARGETS = {
    "deepspeed": ("deepspeed", {"overrides": {"dp": 3}}),
    "universal": ("universal", {}),
    "safetensors": ("safetensors", {"max_shard_size": 600}),
}


def _killed_at(example: Path, out: Path, to: str, kw: dict, n: int, hooks: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", KILLER, str(example), str(out), to, str(n), hooks, json.dumps(kw)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if n:
        assert p.returncode in (-signal.SIGKILL, 0), p.stderr
    else:
        assert p.returncode == 0, p.stderr
    return p.stdout


def _absent_or_complete(out: Path, marker: str | None) -> bool:
    """``out`` is absent (True) or complete and verifying (False); never anything else."""
    if not out.exists():
        return True
    assert verify(out) == [], out
    if marker:
        assert (out / marker).is_file()
    return False


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_kill_at_any_step_of_the_commit_leaves_no_output_or_a_complete_one(
    example, tmp_path, target
):
    to, kw = TARGETS[target]
    marker = commit_module.MARKERS[to]
    calls = int(_killed_at(example, tmp_path / "count", to, kw, 0, COMMIT_CALLS))
    # the first call, two in the middle, and the last ones: the markers, the manifest,
    # the folders' fsyncs, the rename and the parent's fsync
    points = sorted({1, calls // 3, calls // 2, *range(calls - 7, calls + 1)})
    seen_absent = seen_complete = False
    for n in points:
        out = tmp_path / f"out{n}"
        _killed_at(example, out, to, kw, n, COMMIT_CALLS)
        if _absent_or_complete(out, marker):
            seen_absent = True
            convert(example, out, to, **kw)  # a leftover partial folder never blocks a rerun
            assert verify(out) == []
        else:
            seen_complete = True
    assert seen_absent and seen_complete


def test_a_kill_while_the_data_is_written_leaves_no_output(example, tmp_path):
    out = tmp_path / "u"
    _killed_at(example, out, "universal", {}, 5, "pwrite")
    assert not out.exists()


def _main(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _failing(name: str, err: int, after: int = 0):
    """``os.<name>`` failing with ``err`` from its ``after``-th call on."""
    real = getattr(os, name)
    calls = [0]

    def call(*a, **k):
        calls[0] += 1
        if calls[0] > after:
            raise OSError(err, os.strerror(err))
        return real(*a, **k)

    return call


@pytest.mark.parametrize(
    ("call", "err", "after"),
    [
        ("write", errno.ENOSPC, 0),  # the marker
        ("write", errno.ENOSPC, 1),  # the manifest
        ("fsync", errno.EIO, 3),
        ("rename", errno.EIO, 0),
        ("pwrite", errno.EFBIG, 4),  # the data, midway (a full disk keeps it: below)
    ],
)
def test_a_failure_while_writing_or_committing_is_named_and_leaves_nothing(
    example, tmp_path, capsys, monkeypatch, call, err, after
):
    out = tmp_path / "out"
    before = tree(tmp_path)
    monkeypatch.setattr(os, call, _failing(call, err, after))
    code, msg = _main(capsys, "convert", example, "--to", "deepspeed", "-o", out, "-q")
    assert code == 1 and str(out) in msg and errno.errorcode[err] in msg, msg
    assert_no_output(out)
    assert tree(tmp_path) == before


def test_a_full_disk_midway_keeps_what_was_written_and_says_where(
    example, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", _failing("pwrite", errno.ENOSPC, 4))
    code, msg = _main(capsys, "convert", example, "--to", "deepspeed", "-o", out, "-q")
    (partial,) = tmp_path.glob("out.partial-*")
    assert code == 1 and f"{out}: No space left on device [ENOSPC]; nothing was committed; " in msg
    assert f"written are kept in {partial}: run the same command again to go on" in msg
    assert not out.exists()
    monkeypatch.setattr(os, "pwrite", real)  # space freed: the same command goes on
    code, msg = _main(capsys, "convert", example, "--to", "deepspeed", "-o", out, "-q")
    assert code == 0 and f"note: going on from {out}.partial-" in msg
    assert verify(out) == [] and not list(tmp_path.glob("out.partial-*"))


# ------------------------------------------------------------------ the output path


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[bool]:
    """A tmpfs mounted at ``where`` (True), or False where this process may not mount."""
    where.mkdir()
    mount = shutil.which("mount")
    done = mount is not None and (
        subprocess.run(
            [mount, "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield done
    finally:
        if done:
            subprocess.run(["umount", "-l", str(where)], check=True)


def test_an_output_that_is_a_file_or_a_link_is_refused_before_anything_is_written(
    example, tmp_path
):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    before = tree(tmp_path)
    cases = {"file": "not a folder", "dangling": "symbolic link", "link": "symbolic link"}
    for name, what in cases.items():
        run = run_cli("convert", example, "--to", "universal", "-o", tmp_path / name, "-q")
        assert_refused(run, str(tmp_path / name), what)
    assert tree(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_an_output_inside_the_source_checkpoint_is_refused(example, tmp_path):
    before = tree(example)
    for out in (example / "out", example / "global_step2" / "out", example / "global_step2"):
        run = run_cli("convert", example, "--to", "universal", "-o", out, "-q")
        assert_refused(run, str(out))
    assert tree(example) == before


def test_a_name_too_long_for_the_partial_folder_is_refused_before_the_work(example, tmp_path):
    out = tmp_path / ("x" * 240)
    run = run_cli("convert", example, "--to", "universal", "-o", out, "-q")
    assert_refused(run, "the folder name is 240 bytes", "at most")
    assert list(tmp_path.iterdir()) == [example]


def test_a_read_only_parent_is_named(example, tmp_path, capsys, monkeypatch):
    with _tmpfs(tmp_path / "ro", "ro,size=16m") as mounted:
        out = tmp_path / "ro" / "out"
        if mounted:
            run = run_cli("convert", example, "--to", "universal", "-o", out, "-q")
            assert_refused(run, str(out), "EROFS")
        else:
            monkeypatch.setattr(os, "mkdir", _failing("mkdir", errno.EROFS))
            code, msg = _main(capsys, "convert", example, "--to", "universal", "-o", out, "-q")
            assert code == 1 and "EROFS" in msg
        assert not out.exists()


def test_a_parent_without_permission_is_named(example, tmp_path, capsys, monkeypatch):
    out = tmp_path / "locked" / "out"
    monkeypatch.setattr(os, "mkdir", _failing("mkdir", errno.EACCES))
    code, msg = _main(capsys, "convert", example, "--to", "universal", "-o", out, "-q")
    assert code == 1 and str(out) in msg and "EACCES" in msg
    assert not (tmp_path / "locked").exists()


def test_a_disk_too_small_for_the_plan_is_refused_before_writing(
    example, tmp_path, capsys, monkeypatch
):
    with _tmpfs(tmp_path / "small", "size=64k") as mounted:
        out = tmp_path / "small" / "out"
        if mounted:
            run = run_cli("convert", example, "--to", "universal", "-o", out, "-q")
            assert_refused(run, str(out), "needs about", "free")
            assert list((tmp_path / "small").iterdir()) == []
        else:
            real = os.statvfs

            def full(path):
                st = real(path)
                return os.statvfs_result((*st[:4], 1, *st[5:]))  # f_bavail: one block

            monkeypatch.setattr(os, "statvfs", full)
            code, msg = _main(capsys, "convert", example, "--to", "universal", "-o", out, "-q")
            assert code == 1 and "needs about" in msg
            assert not out.exists()


def test_too_few_inodes_for_the_plan_is_refused_before_writing(
    example, tmp_path, capsys, monkeypatch
):
    with _tmpfs(tmp_path / "few", "size=4m,nr_inodes=12") as mounted:
        out = tmp_path / "few" / "out"
        if mounted:
            run = run_cli("convert", example, "--to", "universal", "-o", out, "-q")
            assert_refused(run, str(out), "inodes")
        else:
            real = os.statvfs

            def few(path):
                st = real(path)
                return os.statvfs_result((*st[:7], 12, *st[8:]))  # f_favail

            monkeypatch.setattr(os, "statvfs", few)
            code, msg = _main(capsys, "convert", example, "--to", "universal", "-o", out, "-q")
            assert code == 1 and "inodes" in msg
        assert not out.exists()


def test_a_disk_that_fills_up_midway_is_named_and_the_partial_folder_removed(
    example, tmp_path, capsys, monkeypatch
):
    from layoutc.runtime import execute as runtime

    with _tmpfs(tmp_path / "disk", "size=2m") as mounted:
        out = tmp_path / "disk" / "out"
        if mounted:
            real = runtime.make_partial

            def then_fill(o):  # after the space check: leave 8 KiB
                partial = real(o)
                st = os.statvfs(o.parent)
                (o.parent / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - 8192))
                return partial

            monkeypatch.setattr(runtime, "make_partial", then_fill)
        else:
            monkeypatch.setattr(os, "pwrite", _failing("pwrite", errno.ENOSPC, 3))
        code, msg = _main(capsys, "convert", example, "--to", "universal", "-o", out, "-q")
        assert code == 1 and str(out) in msg and "ENOSPC" in msg, msg
        assert_no_output(out)


def test_of_two_runs_committing_to_one_output_the_second_is_refused_and_the_first_intact(
    example, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real = os.rename
    raced = []

    def rename(a, b, *args, **kw):
        if not raced and Path(b) == out:  # the other run commits first
            raced.append(True)
            convert(example, out, "safetensors")
        return real(a, b, *args, **kw)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputExists, match="another process wrote it"):
        convert(example, out, "universal")
    assert verify(out) == [] and _manifest(out)["target"]["format"] == "safetensors"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")] == []


def test_two_concurrent_converts_to_one_output_leave_one_complete_output(example, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "layoutc", "convert", str(example), "-o", str(out), "-q"]
    runs: list[subprocess.CompletedProcess[str]] = []

    def one(to: str) -> None:
        runs.append(subprocess.run([*argv, "--to", to], capture_output=True, text=True, env=env))

    threads = [threading.Thread(target=one, args=(to,)) for to in ("universal", "deepspeed")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.returncode for r in runs)
    assert codes == [0, 1], [r.stderr for r in runs]
    loser = next(r for r in runs if r.returncode == 1)
    assert "Traceback" not in loser.stderr and str(out) in loser.stderr
    assert verify(out) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.")] == []


# ------------------------------------------------------------------ the writer


def _plan(example: Path, to: str = "universal", tag: str | None = None):
    ckpt = open_checkpoint(example)
    source = load_text(infer(ckpt), str(example))
    target = source.with_store(replace(source.store, format=to, tag=tag))
    plan = compile_plan(source, target)
    return ckpt, plan


@pytest.mark.parametrize("tag", ["../x", "/abs", "a/../../x", "", "."])
def test_a_tag_leaving_the_output_is_refused_by_the_writer(example, tmp_path, tag):
    ckpt, plan = _plan(example)
    partial = tmp_path / "partial"
    partial.mkdir()
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="refusing to write"):
        prepare(plan.target_placement, partial, ckpt.folder, tag or ".")
    assert tree(tmp_path) == before and not Path("/abs").exists()
    with pytest.raises(OutputError, match="refusing to write"):
        execute(plan, ckpt.folder, tmp_path / "out", tag=tag or ".")
    assert_no_output(tmp_path / "out")
    assert tree(tmp_path) == before


def test_a_deepspeed_store_tag_leaving_the_output_is_refused_by_the_writer(example, tmp_path):
    ckpt, plan = _plan(example, "deepspeed", tag="../escaped")
    with pytest.raises(OutputError, match=r"refusing to write '\.\./escaped'"):
        execute(plan, ckpt.folder, tmp_path / "out", tag=ckpt.tag)
    assert_no_output(tmp_path / "out")
    assert not (tmp_path / "escaped").exists()


def test_a_link_inside_the_folder_written_does_not_lead_the_writer_out(example, tmp_path):
    ckpt, plan = _plan(example)
    partial = tmp_path / "partial"
    partial.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (partial / "global_step2").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="resolves outside"):
        prepare(plan.target_placement, partial, ckpt.folder, "global_step2")
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ------------------------------------------------------------------ verify


def test_verify_names_a_file_the_manifest_does_not_list(universal):
    (universal / "global_step2" / "notes.txt").write_text("hi")
    (universal / "stray").mkdir()
    run = run_cli("verify", universal)
    assert_refused(run, "global_step2/notes.txt: not in the manifest", "stray: a folder")


def test_verify_requires_the_marker_the_target_format_needs(universal):
    (universal / "latest_universal").unlink()
    assert_refused(run_cli("verify", universal), "latest_universal: missing")
    m = _manifest(universal)  # a forger drops it from the manifest too
    del m["files"]["latest_universal"]
    m["markers"] = []
    _rewrite(universal, m)
    assert_refused(run_cli("verify", universal), "latest_universal: missing; a universal output")


def test_verify_refuses_latest_naming_a_missing_tag(example, tmp_path):
    out = tmp_path / "ds"
    _convert(example, out, "--to", "deepspeed")
    (out / "latest").write_text("global_step9")
    assert_refused(run_cli("verify", out), "latest: CRC-32 differs")
    m = _manifest(out)
    _record(out, m, "latest")
    _rewrite(out, m)
    assert_refused(run_cli("verify", out), "latest: names the tag folder 'global_step9'")
    (out / "latest").write_text("../../..")
    _record(out, m, "latest")
    _rewrite(out, m)
    assert_refused(run_cli("verify", out), "latest: names '../../..'")


def test_verify_refuses_a_safetensors_index_naming_a_missing_shard(example, tmp_path):
    out = tmp_path / "st"
    _convert(example, out, "--to", "safetensors", "--max-shard-size", "600")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    index["weight_map"]["embed.weight"] = "model-00009-of-00009.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    m = _manifest(out)
    _record(out, m, "model.safetensors.index.json")
    _rewrite(out, m)
    assert_refused(run_cli("verify", out), "maps tensors to 'model-00009-of-00009.safetensors'")


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m: m["files"].clear(), "files is empty"),
        (lambda m: m.pop("files"), "files is missing"),
        (lambda m: m.update(files=[1, 2]), "files is missing or not an object"),
        (lambda m: m.update(manifest_version=1), "manifest_version is 1"),
        (lambda m: m.pop("target"), "target is missing"),
        (lambda m: m["files"].update(latest_universal={"bytes": "9", "crc32": "0"}), "bytes"),
        (lambda m: m["files"].update(latest_universal=7), "not an object"),
        (
            lambda m: m["files"].update({"../../../../etc/passwd": m["files"]["latest_universal"]}),
            "'..' component",
        ),
        (
            lambda m: m["files"].update({"/etc/passwd": m["files"]["latest_universal"]}),
            "an absolute path",
        ),
        (lambda m: m.update(markers=["nope"]), "markers lists 'nope'"),
    ],
)
def test_verify_refuses_a_malformed_manifest_by_name(universal, edit, needle):
    m = _manifest(universal)
    edit(m)
    _rewrite(universal, m)
    assert_refused(run_cli("verify", universal), f"{universal}/{MANIFEST}: malformed", needle)


@pytest.mark.parametrize("text", ["", "{", "[1, 2]", "null", "\xff\xfe"])
def test_verify_refuses_a_manifest_that_is_not_a_json_object(universal, text):
    (universal / MANIFEST).write_bytes(text.encode("latin-1"))
    assert_refused(run_cli("verify", universal), f"{universal}/{MANIFEST}")


def test_verify_never_reads_through_links_or_outside_the_output(universal, tmp_path):
    fifo = tmp_path / "fifo"  # opening it for reading would hang the run
    os.mkfifo(fifo)
    victim = universal / "global_step2" / "zero" / "embed.weight" / "fp32.pt"
    victim.unlink()
    victim.symlink_to(fifo)
    run = run_cli("verify", universal, timeout=30)
    assert_refused(run, "fp32.pt: a symbolic link")
    (universal / MANIFEST).rename(tmp_path / "saved")
    (universal / MANIFEST).symlink_to(fifo)
    assert_refused(run_cli("verify", universal, timeout=30), "a symbolic link")
    (universal / MANIFEST).unlink()
    os.mkfifo(universal / MANIFEST)
    assert_refused(run_cli("verify", universal, timeout=30), "not a regular file")


def test_verify_does_not_follow_a_linked_folder(universal, tmp_path):
    tag = universal / "global_step2"
    shutil.move(tag, tmp_path / "copy")
    tag.symlink_to(tmp_path / "copy")  # the same files, outside
    run = run_cli("verify", universal)
    assert_refused(run, "global_step2: a symbolic link", "global_step2/mp_rank_00_model_states.pt")


def test_verify_checks_sizes_before_reading_and_a_sparse_entry_costs_nothing(universal):
    big = universal / "big.bin"
    with open(big, "wb") as f:
        f.truncate(50 * GiB)
    m = _manifest(universal)
    m["files"]["big.bin"] = {"bytes": 50 * GiB, "crc32": "00000000"}
    _rewrite(universal, m)
    run = run_cli("verify", universal, timeout=30)
    assert_refused(run, "big.bin: CRC-32 differs")
    assert run.seconds < 10
    small = 64 << 20  # a hole's computed CRC is the CRC of its zeros
    with open(big, "r+b") as f:
        f.truncate(small)
    m["files"]["big.bin"] = {"bytes": small, "crc32": f"{zlib.crc32(bytes(small)):08x}"}
    _rewrite(universal, m)
    assert verify(universal) == []
    m["files"]["big.bin"]["bytes"] = 50 * GiB  # a size mismatch: nothing read
    _rewrite(universal, m)
    run = run_cli("verify", universal, timeout=30)
    assert_refused(run, f"big.bin: {small} bytes, the manifest says {50 * GiB}")


def test_verify_strong_checks_the_sha256_recorded_by_convert(example, tmp_path):
    out = tmp_path / "u"
    _convert(example, out, "--to", "universal", "--sha256")
    assert all("sha256" in e for e in _manifest(out)["files"].values())
    run = run_cli("verify", "--strong", out)
    assert run.code == 0 and "SHA-256" in run.out, run.err
    victim = out / "global_step2" / "zero" / "embed.weight" / "fp32.pt"
    data = bytearray(victim.read_bytes())
    data[-300] ^= 1
    victim.write_bytes(bytes(data))
    m = _manifest(out)  # a forger who fixes the CRC-32 is caught by the SHA-256 only
    m["files"][str(victim.relative_to(out))]["crc32"] = f"{zlib.crc32(bytes(data)):08x}"
    _rewrite(out, m)
    assert run_cli("verify", out).code == 0
    assert_refused(run_cli("verify", "--strong", out), "fp32.pt: SHA-256 differs")


def test_verify_strong_says_when_the_manifest_records_no_sha256(universal):
    assert_refused(run_cli("verify", "--strong", universal), "records no SHA-256", "--sha256")


def test_every_committed_output_lists_its_markers_and_verifies(example, tmp_path):
    for to, kw in TARGETS.values():
        out = tmp_path / to
        report = convert(example, out, to, **kw)
        m = _manifest(out)
        assert m["manifest_version"] == 2
        assert m["markers"] == [commit_module.MARKERS[to]]
        assert set(m["files"]) == set(report.files) | set(report.markers)
        assert verify(out) == []
    out = tmp_path / "torch"
    convert(example, out, "torch")
    assert _manifest(out)["markers"] == [] and verify(out) == []
