"""Commit a conversion's output in one atomic step, and verify it later.

What this module guarantees about an output folder ``OUT``:

* **Nothing half.** Every file of the output — data, the markers a loader looks for
  (``latest``, ``latest_universal``, ``model.safetensors.index.json``) and the manifest
  (:data:`MANIFEST`) — is written and fsynced inside a fresh folder beside it,
  ``OUT.partial-<pid>-<random>``; then one ``rename(2)`` makes it ``OUT`` and the parent
  folder is fsynced. A kill, a full disk or any error at any moment leaves ``OUT`` as it
  was (absent, or the empty folder the user made) or complete, never with data but no
  marker. A failing run removes its partial folder; a killed one may leave it behind (safe
  to delete; it never blocks a new run).
* **Nothing outside.** :func:`inside` is the one way a writer turns a name (a tag, a file
  of the placement) into a path: absolute names, ``..``, empty or ``.`` components and
  anything resolving outside the folder are refused. :func:`verify` opens files relative
  to ``OUT`` one component at a time without following symbolic links, so a manifest or a
  link cannot make it read elsewhere.
* **Checked before the work.** :func:`check_output` refuses, before a plan runs, an
  ``OUT`` that could not be committed: an existing file or symbolic link (dangling or not),
  a non-empty folder, a folder inside the source checkpoint, a name too long for the
  partial folder beside it, and a filesystem with less free space or fewer free inodes
  than the plan writes.

The manifest (version 2) is JSON: ``layoutc`` (its version), ``manifest_version``,
``plan_sha256`` (:func:`plan_digest`), ``source`` and ``target`` (the endpoints of the plan;
``target.format`` says which markers the output must hold), ``markers`` (the marker files'
paths) and ``files``: every file but the manifest, markers included, as
``path -> {"bytes", "crc32"[, "sha256"]}``. :func:`verify` checks the exact file set, the
markers and what they point to, every size before any checksum, then the CRC-32 (and
SHA-256 with ``strong``); every refusal is an :class:`OutputError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from layoutc import __version__
from layoutc.formats.deepspeed import is_deepspeed
from layoutc.place.deepspeed import LATEST, LATEST_UNIVERSAL
from layoutc.plan.plan import Plan
from layoutc.runtime.checksum import combine, file_crc
from layoutc.runtime.fileio import OutputError as OutputError  # re-exported
from layoutc.runtime.fileio import fsync_path, path_components
from layoutc.runtime.fileio import inside as inside  # re-exported
from layoutc.units import human_size

MANIFEST = "layoutc-manifest.json"
MANIFEST_VERSION = 2
MARKERS = {  # the marker each target format's loader looks for
    "deepspeed": LATEST,
    "universal": LATEST_UNIVERSAL,
    "safetensors": "model.safetensors.index.json",  # only with several shards
}
MAX_MANIFEST = 256 << 20  # a manifest larger than this is refused unread
MAX_MARKER = 64 << 20  # likewise a marker (the safetensors index is the large one)
CHUNK = 4 << 20
_NAME_ROOM = len(".partial-4194304-0123456789ab")  # what the partial folder adds to OUT's name
_SLACK = 1 << 20  # bytes beyond the plan's: pickled metadata, zip headers, the manifest

# Failures of the filesystem under the output, named instead of raised as they come.
_OUTPUT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENAMETOOLONG,
    errno.EFBIG,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ELOOP,
    errno.EXDEV,
    errno.EBUSY,
    errno.EMLINK,
}


class OutputExists(OutputError):
    """The output folder exists and is not empty."""


# ------------------------------------------------------------------ before the work


def check_output(out: Path, plan: Plan | None = None, source: Path | None = None) -> None:
    """Refuse an output folder the plan could not be committed to (see the module
    docstring); ``source`` is the folder the plan reads (a DeepSpeed tag folder)."""
    if out.name in ("", ".", ".."):
        raise OutputError(f"{out}: name the output folder (not '.' or '..')")
    if os.path.islink(out):
        raise OutputError(
            f"{out}: a symbolic link (to {os.readlink(out)}); give a folder path that is not one"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        raise OutputExists(f"{out}: exists and is not empty; choose a new output folder")
    if source is not None:
        _refuse_inside_source(out, source)
    base = _existing_ancestor(out.parent)
    if not base.is_dir():
        raise OutputError(f"{out}: {base} is not a folder")
    name_max = _pathconf(base, "PC_NAME_MAX", 255)
    if len(os.fsencode(out.name)) + _NAME_ROOM > name_max:
        raise OutputError(
            f"{out}: the folder name is {len(os.fsencode(out.name))} bytes; layoutc builds it "
            f"beside as {out.name[:16]}...partial-<pid>-<random>, which must fit the "
            f"filesystem's {name_max}-byte limit: use a name of at most "
            f"{name_max - _NAME_ROOM} bytes"
        )
    with contextlib.suppress(OSError):
        if os.statvfs(base).f_flag & os.ST_RDONLY:
            raise OutputError(f"{out}: {base} is on a read-only filesystem [EROFS]")
    if plan is not None:
        _check_space(out, base, plan)


def _refuse_inside_source(out: Path, source: Path) -> None:
    """``out`` may not be, or be inside, a DeepSpeed checkpoint read: its tag folder or
    the root holding its ``latest``."""
    guarded = []
    folder = source.resolve()
    if is_deepspeed(folder):
        guarded.append(folder)
    if (folder.parent / LATEST).is_file() or (folder.parent / LATEST_UNIVERSAL).is_file():
        guarded.append(folder.parent)
    target = out.resolve()
    for g in guarded:
        if target == g or target.is_relative_to(g):
            raise OutputError(
                f"{out}: inside the source checkpoint {g}; write the output elsewhere"
            )


def _existing_ancestor(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _pathconf(p: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(p, name))
    except (OSError, ValueError):
        return default


def _check_space(out: Path, base: Path, plan: Plan) -> None:
    """The filesystem under ``out`` has room for what the plan writes (its data, a block
    per file, the swap files of spilled tensors, a margin) and an inode per file."""
    try:
        st = os.statvfs(base)
    except OSError:
        return
    if st.f_blocks == 0:  # a filesystem that reports no sizes (some network ones)
        return
    t = plan.totals
    files = len({b.file for b in plan.target_placement.buffers()}) if plan.target_placement else 1
    need = t.write_bytes + t.swap_bytes // 2 + files * st.f_frsize + _SLACK
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise OutputError(
            f"{out}: needs about {human_size(need)} ({human_size(t.write_bytes)} in {files} "
            f"files), the filesystem holding {base} has {human_size(free)} free; free space "
            "or choose another output folder"
        )
    inodes = 2 * files + 16
    if st.f_files and inodes > st.f_favail:
        raise OutputError(
            f"{out}: needs about {inodes} inodes ({files} files and their folders), the "
            f"filesystem holding {base} has {st.f_favail} free"
        )


def partial_name(out: Path) -> Path:
    """A new name beside ``out`` for this process's partial folder."""
    return out.with_name(f"{out.name}.partial-{os.getpid()}-{secrets.token_hex(6)}")


def make_partial(out: Path) -> Path:
    """A fresh folder beside ``out`` to build the output in."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            partial = partial_name(out)
            try:
                os.mkdir(partial)
                return partial
            except FileExistsError:
                continue
    except OSError as e:
        raise as_output_error(e, out) from None


def as_output_error(e: OSError, out: Path) -> OutputError:
    """A failure of the filesystem under ``out``, as an :class:`OutputError` naming it."""
    name = errno.errorcode.get(e.errno or 0, "")
    where = f" ({e.filename})" if e.filename else ""
    return OutputError(f"{out}: {e.strerror or e}{where} [{name}]; nothing was committed")


def is_output_failure(e: BaseException, out: Path) -> bool:
    """``e`` is the filesystem under ``out`` refusing a write (full, read-only, ...), not a
    failure reading the source: an errno of that kind, on a path beside or under ``out``
    or on none (``pwrite`` names no path)."""
    if not isinstance(e, OSError) or e.errno not in _OUTPUT_ERRNOS:
        return False
    if e.filename is None:
        return True
    here = Path(os.path.abspath(out))
    name = Path(os.path.abspath(os.fsdecode(e.filename)))
    if here.is_relative_to(name):  # `out` or a folder above it
        return True
    if not name.is_relative_to(here.parent):
        return False
    return name.relative_to(here.parent).parts[0].startswith(here.name)


def discard(partial: Path | None) -> None:
    if partial is not None:
        shutil.rmtree(partial, ignore_errors=True)


# ------------------------------------------------------------------ commit


def plan_digest(plan: Plan) -> str:
    """SHA-256 of what the plan moves — both endpoints and, per unit, the tensor, the
    target and source states and the cast — not of how it is scheduled: the same for
    any memory budget, worker count or number of ranks."""
    what = {
        "source": plan.source.to_dict(),
        "target": plan.target.to_dict(),
        "routes": [[u.tensor, u.state, u.source_state, u.cast] for u in plan.units],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def commit(
    partial: Path,
    out: Path,
    markers: Mapping[Path, str],
    plan: Plan,
    crcs: dict[Path, int],
    sha256: bool = False,
) -> list[str]:
    """Write ``markers`` (paths under ``partial`` -> text) and the manifest into
    ``partial``, fsync everything, rename it to ``out`` and fsync the parent; returns the
    output's files (data, then markers). ``crcs``: the CRC-32 of the data files known from
    their writes (others are read); ``sha256``: read every file back once to record its
    SHA-256 too. Every failure is an :class:`OutputError` (:class:`OutputExists` if
    another process committed ``out`` meanwhile); before the rename, ``out`` is untouched."""
    head = {
        "plan_sha256": plan_digest(plan),
        "source": plan.source.to_dict(),
        "target": plan.target.to_dict(),
    }
    try:
        files, names = seal(partial, markers, head, crcs, sha256)
    except OSError as e:
        raise as_output_error(e, out) from None
    try:
        os.rename(partial, out)  # replaces an empty `out`; refused if it holds anything
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputExists(
                f"{out}: another process wrote it while this conversion ran; nothing of "
                "this run was kept"
            ) from None
        raise as_output_error(e, out) from None
    fsync_dir(out.parent, committed=out)
    return [str(p.relative_to(partial)) for p in files if p not in markers] + names


def seal(
    partial: Path,
    markers: Mapping[Path, str],
    head: Mapping[str, Any],
    crcs: dict[Path, int],
    sha256: bool = False,
) -> tuple[list[Path], list[str]]:
    """Everything of :func:`commit` before the rename: the markers and the manifest (its
    fields ``head`` plus the files) written in ``partial``, every file and folder fsynced.
    Returns the files (the manifest aside) and the markers' names."""
    crcs = dict(crcs)
    names = []
    for marker, text in markers.items():
        rel = marker.relative_to(partial)
        data = text.encode()
        _write_new(inside(partial, rel), data)
        crcs[marker] = zlib.crc32(data)
        names.append(str(rel))
    files, folders = _walk(partial)
    for p in files:
        fsync_path(p)
    entries = {}
    for p in files:
        entry: dict[str, Any] = {
            "bytes": p.stat().st_size,
            "crc32": f"{crcs[p] if p in crcs else file_crc(p):08x}",
        }
        if sha256:
            entry["sha256"] = _sha256(p)
        entries[str(p.relative_to(partial))] = entry
    manifest = {
        **head,
        "layoutc": __version__,
        "manifest_version": MANIFEST_VERSION,
        "markers": sorted(names),
        "files": entries,
    }
    _write_new(partial / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    for d in folders:  # deepest first: each folder's entries, then the folder in its parent
        fsync_dir(d)
    return files, names


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """The files under ``root`` (sorted) and its folders, deepest first, ``root`` last."""
    files: list[Path] = []
    folders: list[Path] = []
    for dirpath, _, filenames in os.walk(root):
        folders.append(Path(dirpath))
        files.extend(Path(dirpath) / f for f in filenames)
    return sorted(files), sorted(folders, key=lambda d: -len(d.parts))


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path, committed: Path | None = None) -> None:
    """Flush a folder's entries; a filesystem that cannot fsync folders is let be. After
    the rename (``committed``) a failure says that the output is in place."""
    try:
        fsync_path(path)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.ENOTSUP):
            return
        if committed is None:
            raise
        raise OutputError(
            f"{committed}: complete and renamed into place, but flushing {path} failed "
            f"({e.strerror}); check it with `layoutc verify {committed}`"
        ) from None


def _sha256(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return _checksums(fd, os.fstat(fd).st_size, sha=True)[1]
    finally:
        os.close(fd)


# ------------------------------------------------------------------ verify


def verify(output: str | Path, strong: bool = False) -> list[str]:
    """What is wrong with ``output`` against its manifest, one ``path: what`` per problem
    (empty: it is exactly what was committed). Checks, in this order, reading no file data
    before the sizes all match: the manifest is well formed (else :class:`OutputError`),
    the files are exactly the manifest's (no extra, none missing, no link or special file,
    no stray folder), each has its size, the target format's markers are there and point
    at what exists; then each file's CRC-32, and with ``strong`` its SHA-256 (refused if
    the manifest records none: convert with ``--sha256``). A sparse file costs its data,
    not its size: holes are zeros, whose CRC is computed, not read."""
    out = Path(output)
    try:
        root = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise OutputError(f"{out}: cannot open the output folder ({e.strerror})") from None
    try:
        manifest = _read_manifest(out, root)
        entries: dict[str, dict[str, Any]] = manifest["files"]
        if strong and not any("sha256" in e for e in entries.values()):
            raise OutputError(
                f"{out}/{MANIFEST}: records no SHA-256 (the output was converted without "
                "--sha256); `layoutc verify` without --strong checks the CRC-32s"
            )
        found, odd = _scan(root)
        bad = [f"{rel}: {what}" for rel, what in odd.items()]
        found.pop(MANIFEST, None)
        for rel in sorted(set(found) - set(entries)):
            bad.append(f"{rel}: not in the manifest (layoutc did not write it)")
        for rel in sorted(set(entries) - set(found)):
            if rel not in odd:
                bad.append(f"{rel}: missing")
        for rel in sorted(set(entries) & set(found)):
            if found[rel] != entries[rel]["bytes"]:
                bad.append(f"{rel}: {found[rel]} bytes, the manifest says {entries[rel]['bytes']}")
        ok = {rel for rel in entries if found.get(rel) == entries[rel]["bytes"]}
        bad += _check_markers(manifest, root, ok)
        for rel in sorted(ok):
            entry = entries[rel]
            want_sha = strong and "sha256" in entry
            if strong and "sha256" not in entry:
                bad.append(f"{rel}: the manifest records no SHA-256 for it")
            try:
                fd = _open_inside(root, rel)
                try:
                    crc, sha = _checksums(fd, entry["bytes"], sha=want_sha)
                finally:
                    os.close(fd)
            except (OSError, OutputError) as err:
                bad.append(f"{rel}: could not be read ({err})")
                continue
            if f"{crc:08x}" != entry["crc32"]:
                bad.append(f"{rel}: CRC-32 differs from the manifest")
            elif want_sha and sha != entry["sha256"]:
                bad.append(f"{rel}: SHA-256 differs from the manifest")
        return bad
    finally:
        os.close(root)


def _read_manifest(out: Path, root: int) -> dict[str, Any]:
    where = f"{out}/{MANIFEST}"
    try:
        fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OutputError(f"{where}: a symbolic link; layoutc writes a file") from None
        raise OutputError(f"{where}: cannot open it ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{where}: not a regular file")
        if st.st_size > MAX_MANIFEST:
            raise OutputError(f"{where}: {st.st_size} bytes, more than a manifest can be")
        raw = _read_all(fd, st.st_size)
    finally:
        os.close(fd)
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutputError(f"{where}: not JSON ({e})") from None
    problems = list(_manifest_problems(manifest))
    if problems:
        more = f"; ... and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise OutputError(f"{where}: malformed: " + "; ".join(problems[:3]) + more)
    return manifest


def _manifest_problems(m: Any) -> Iterator[str]:
    """Every way ``m`` is not a version-2 manifest."""
    if not isinstance(m, dict):
        yield f"a JSON {type(m).__name__}, not an object"
        return
    version = m.get("manifest_version")
    if version != MANIFEST_VERSION:
        yield (
            f"manifest_version is {version!r}, not {MANIFEST_VERSION} (written by an older "
            "layoutc, which did not record the markers: convert again)"
        )
        return
    # A checkpoint saved by a training job (layoutc.deepspeed) records what saved it
    # instead of a plan.
    planned = () if "training" in m else (("plan_sha256", str), ("source", dict))
    for key, kind in (
        ("layoutc", str),
        *planned,
        ("target", dict),
        ("markers", list),
        ("files", dict),
    ):
        if not isinstance(m.get(key), kind):
            yield f"{key} is missing or not a{'n object' if kind is dict else ' ' + kind.__name__}"
    target = m.get("target")
    if isinstance(target, dict) and not isinstance(target.get("format"), str):
        yield "target.format is missing or not a string"
    files = m.get("files")
    if isinstance(files, dict):
        if not files:
            yield "files is empty: a layoutc output has at least one file"
        for rel, e in files.items():
            parts = path_components(rel)
            if isinstance(parts, str):
                yield f"files[{rel!r}] is {parts}"
            elif rel == MANIFEST:
                yield f"files lists the manifest itself ({rel!r})"
            if not isinstance(e, dict):
                yield f"files[{rel!r}] is not an object"
                continue
            size, crc, sha = e.get("bytes"), e.get("crc32"), e.get("sha256")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                yield f"files[{rel!r}].bytes is {size!r}, not a byte count"
            if not _hex(crc, 8):
                yield f"files[{rel!r}].crc32 is {crc!r}, not 8 hex digits"
            if "sha256" in e and not _hex(sha, 64):
                yield f"files[{rel!r}].sha256 is {sha!r}, not 64 hex digits"
    markers = m.get("markers")
    if isinstance(markers, list) and isinstance(files, dict):
        for name in markers:
            if not isinstance(name, str) or name not in files:
                yield f"markers lists {name!r}, which files does not"


def _hex(value: Any, n: int) -> bool:
    return (
        isinstance(value, str) and len(value) == n and all(c in "0123456789abcdef" for c in value)
    )


def _scan(root: int) -> tuple[dict[str, int], dict[str, str]]:
    """``path -> bytes`` of every regular file under the open folder ``root``, and what is
    not one (links, special files, folders holding no file), links never followed."""
    files: dict[str, int] = {}
    odd: dict[str, str] = {}

    def walk(fd: int, prefix: str) -> bool:
        held = False
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                files[rel] = st.st_size
                held = True
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    if walk(sub, rel + "/"):
                        held = True
                    else:
                        odd[rel] = "a folder with no file in it"
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(st.st_mode):
                odd[rel] = f"a symbolic link (to {os.readlink(entry.name, dir_fd=fd)})"
            else:
                odd[rel] = "not a regular file"
        return held

    walk(root, "")
    return files, odd


def _open_inside(root: int, rel: str) -> int:
    """Open the regular file ``rel`` under the open folder ``root``, one component at a
    time, following no link."""
    parts = rel.split("/")
    fd = root
    try:
        for part in parts[:-1]:
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            if fd != root:
                os.close(fd)
            fd = sub
        f = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        if fd != root:
            os.close(fd)
    if not stat.S_ISREG(os.fstat(f).st_mode):
        os.close(f)
        raise OutputError("not a regular file")
    return f


def _read_all(fd: int, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = os.readv(fd, [view[done:]])
        if n <= 0:
            break
        done += n
    return bytes(buf[:done])


def _check_markers(manifest: dict[str, Any], root: int, ok: set[str]) -> list[str]:
    """The markers the target format needs are recorded, and point at files of the
    output (``ok``: the files present with their sizes)."""
    bad = []
    files: dict[str, Any] = manifest["files"]
    fmt = manifest["target"]["format"]
    shards = [f for f in files if f.endswith(".safetensors")]
    need = {MARKERS[fmt]} if fmt in MARKERS else set()
    if fmt == "safetensors" and len(shards) < 2:
        need = set()
    recorded = set(manifest["markers"])
    for name in sorted(need - recorded):
        bad.append(f"{name}: missing; a {fmt} output needs it")
    for name in sorted(recorded - need):
        bad.append(f"{name}: recorded as a marker, which a {fmt} output does not have")
    for name in sorted(need & recorded & ok):
        if files[name]["bytes"] > MAX_MARKER:
            bad.append(f"{name}: {files[name]['bytes']} bytes, more than a marker can be")
            continue
        fd = _open_inside(root, name)
        try:
            text = _read_all(fd, files[name]["bytes"]).decode("utf-8", "replace")
        finally:
            os.close(fd)
        if name == MARKERS["safetensors"]:
            bad += _index_problems(name, text, files, shards)
            continue
        tag = text.strip()
        parts = path_components(tag)
        if isinstance(parts, str):
            bad.append(f"{name}: names {tag!r}, {parts}")
        elif not any(f.startswith(tag + "/") for f in ok):
            bad.append(f"{name}: names the tag folder {tag!r}, which holds no file of the output")
    return bad


def _index_problems(name: str, text: str, files: Mapping[str, Any], shards: list[str]) -> list[str]:
    try:
        index = json.loads(text)
        weight_map = index["weight_map"]
        named = set(weight_map.values())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return [f"{name}: not a safetensors index (JSON with a weight_map)"]
    bad = [f"{name}: maps tensors to {f!r}, not a file of the output" for f in named - set(files)]
    bad += [f"{name}: names no tensor in {f}" for f in sorted(set(shards) - named)]
    return bad


def _zeros_crc(n: int) -> int:
    """CRC-32 of ``n`` zero bytes, in O(log n) combines."""
    crc, power, size = 0, zlib.crc32(b"\0"), 1
    while n:
        if n & 1:
            crc = combine(crc, power, size)
        power = combine(power, power, size)
        size *= 2
        n >>= 1
    return crc


_ZEROS = bytes(CHUNK)


def _segments(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, end, is_data)`` runs tiling ``[0, size)`` (holes where the filesystem
    reports them; all data where it cannot)."""
    pos = 0
    while pos < size:
        try:
            data = min(os.lseek(fd, pos, os.SEEK_DATA), size)
        except OSError as e:
            data = size if e.errno == errno.ENXIO else pos  # ENXIO: a hole to the end
        if data > pos:
            yield pos, data, False
            pos = data
            continue
        try:
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        hole = max(hole, pos + 1)
        yield pos, hole, True
        pos = hole


def _checksums(fd: int, size: int, sha: bool = False) -> tuple[int, str]:
    """CRC-32 (and with ``sha`` the SHA-256) of the first ``size`` bytes of ``fd``."""
    crc = 0
    h = hashlib.sha256() if sha else None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for lo, hi, is_data in _segments(fd, size):
        if not is_data:
            crc = combine(crc, _zeros_crc(hi - lo), hi - lo)
            if h is not None:
                for at in range(lo, hi, CHUNK):
                    h.update(_ZEROS[: min(CHUNK, hi - at)])
            continue
        pos = lo
        while pos < hi:
            n = os.preadv(fd, [view[: min(CHUNK, hi - pos)]], pos)
            if n <= 0:
                raise OutputError(f"it ends at byte {pos}, not {size}")
            crc = zlib.crc32(view[:n], crc)
            if h is not None:
                h.update(view[:n])
            pos += n
    return crc, h.hexdigest() if h is not None else ""
