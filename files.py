"""Files read and written with care: every error names the file (and the line, or the key), and
nothing half-written is ever left behind.

Reading: UTF-8 text (a BOM dropped, bad bytes named by line) and JSON (malformed JSON named by
line, nesting too deep refused). Writing: each file under a temporary name, flushed to disk and
renamed (write_atomic), so that a kill or a full disk never leaves a file that looks complete.
Manifests: the size and sha256 of each file of a set, written last, so that a reader tells a
complete, unaltered set from a truncated, altered or incomplete one.

Also the project's one error type for bad input, ModelError.

Not included: file locking and stop signals (runs.py), the formats themselves (checkpoints.py).
"""

import errno
import hashlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file


class ModelError(ValueError):
    """A user-facing problem with a checkpoint, a run directory or a setting (every module's error:
    model.ModelError is this one)."""


# -----------------------------------------------------------------------------
# Reading


def parse_json(text: str, where: str, error=None):
    """JSON text -> value; malformed JSON (also: nesting too deep for Python, an integer of more
    than 4300 digits) raises `error` (ModelError by default) naming `where` and the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise (error or ModelError)(f"{where}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except (ValueError, RecursionError) as e:  # json's int-size limit; arrays nested thousands deep
        raise (error or ModelError)(f"{where}: invalid JSON: {e}") from None


def read_text(path: Path, error=None) -> str:
    """A UTF-8 file -> str; a BOM at the start is dropped. Bytes that are not UTF-8 raise `error`
    (ModelError by default) naming the file and line."""
    path = Path(path)
    error = error or ModelError
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json(path: Path) -> dict:
    """A JSON file whose top level is an object (config.json, meta.json, an index...)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    obj = parse_json(read_text(path), str(path))
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level, got {type(obj).__name__}")
    return obj


def path_is(path, kind="file") -> bool:
    """Path.is_file() (kind "file") or is_dir() ("dir"), where a path the OS cannot even look up (a
    name too long, an embedded NUL: a corrupted or hand-edited file names it) is simply absent."""
    try:
        return Path(path).is_file() if kind == "file" else Path(path).is_dir()
    except (OSError, ValueError):
        return False


# -----------------------------------------------------------------------------
# Writing: a temporary name, flushed, then renamed


class WriteError(ModelError):
    """A file could not be written (disk full, file too large, I/O error); the file it was to
    replace is untouched and its temporary name is removed."""


def write_atomic(path, write):
    """Call write(tmp) on a temporary name beside `path`, flush it to disk, then rename: a kill or a
    full disk mid-write never leaves a file at `path` that looks complete, and never the temporary
    file either. A failed write (an OSError such as ENOSPC, EFBIG or EIO; safetensors reports those
    as SafetensorError) raises WriteError naming `path` and the cause."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fsync(tmp)  # a write error the OS reports late (delayed allocation, NFS) surfaces here
        tmp.replace(path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot be written ({write_cause(e)})") from None
    except BaseException:  # a stop signal, a bug: still nothing half-written is left
        tmp.unlink(missing_ok=True)
        raise


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_cause(e) -> str:
    """'No space left on device [ENOSPC]' for an OSError; the library's own words otherwise."""
    if isinstance(e, OSError) and e.errno in errno.errorcode:
        return f"{e.strerror} [{errno.errorcode[e.errno]}]"
    return str(e)


def write_json_atomic(path, obj):
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_weights_atomic(tensors: dict, path):
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(cpu, str(tmp)))


# -----------------------------------------------------------------------------
# Manifests: the size and sha256 of each file of a checkpoint or of a run's final weights,
# written last, so that a reader tells a complete, unaltered set of files from a truncated,
# altered or incomplete one (one sha256 pass per file, as cheap as reading it once).


MANIFEST = "manifest.json"


def hash_file(path, h=None):
    """h (a new sha256 by default) updated with the file's bytes, read in 16 MiB chunks."""
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h


def write_manifest(folder, names):
    """folder/manifest.json: {"files": {name: {"size", "sha256"}}} of the named files in `folder`."""
    folder = Path(folder)
    files = {n: dict(size=(folder / n).stat().st_size, sha256=hash_file(folder / n).hexdigest()) for n in names}
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps({"files": files}, indent=2) + "\n"))


def check_manifest(folder, names):
    """Each named file of `folder` against folder/manifest.json; ModelError naming the first one
    that is not listed, missing, of another size (truncated) or of another sha256 (altered), or
    naming manifest.json when it is absent (an incomplete set of files)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not path_is(manifest):
        raise ModelError(f"{manifest}: file not found (files written incompletely, or before manifests)")
    listed = read_json(manifest).get("files")
    if not isinstance(listed, dict):
        raise ModelError(f"{manifest}: key 'files' must be an object")
    for name in names:
        path, record = folder / name, listed.get(name)
        if not isinstance(record, dict):
            raise ModelError(f"{manifest}: does not list {name}")
        if not path_is(path):
            raise ModelError(f"{path}: missing (listed in {manifest})")
        size = path.stat().st_size
        if size != record.get("size"):
            raise ModelError(f"{path}: {size} bytes, {manifest} records {record.get('size')} (truncated or altered)")
        if hash_file(path).hexdigest() != record.get("sha256"):
            raise ModelError(f"{path}: sha256 differs from the one {manifest} records (altered)")
