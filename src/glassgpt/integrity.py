"""Is a file still what was written? Reading files that may be damaged or crafted, in one-line errors.

`write_checksums(directory)` records the size and sha256 of each file of a directory in
`checksums.json` beside them (a checkpoint's manifest); `damage(directory)` compares them again and
names the first file that differs, or None when all match or the directory has no manifest (written
before checksums existed: nothing to compare, so it is read unverified).

`read_pickle`, `read_tensors` and `read_json` read one file and turn any failure into `DamagedFile`:
a ValueError whose message names the file in one line, which the CLI prints as `glassgpt: error:`.
Pickles go through torch's weights_only loader, so a crafted one is refused and nothing in it runs;
torch's own refusal suggests `weights_only=False`, the one thing never to do here, so it is not shown.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

CHECKSUMS_FILE = "checksums.json"
_CHUNK = 1 << 20


class DamagedFile(ValueError):
    """A file that is corrupt, truncated, missing or not what it should be; the message names it."""


# Hashes already computed in this process, by the file's identity and stat: a resume reads a
# checkpoint from several places (its settings, its model, its state) and a 2 GB one costs seconds to
# hash. A write changes the mtime and ctime, but only to the kernel's clock tick (milliseconds): a file
# changed within a few seconds of hashing is never remembered ("racily clean", as git calls it).
_digests: dict[tuple, str] = {}
_RACY_NS = 3_000_000_000


def sha256_of(path: str | Path) -> str:
    path = Path(path)
    info = path.stat()
    key = (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key in _digests:
        return _digests[key]
    started = time.time_ns()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    if max(info.st_mtime_ns, info.st_ctime_ns) < started - _RACY_NS:
        if len(_digests) > 256:
            _digests.clear()
        _digests[key] = digest.hexdigest()
    return digest.hexdigest()


def write_checksums(directory: str | Path) -> None:
    """Record the size and sha256 of every file in `directory` in its `checksums.json`."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (directory / CHECKSUMS_FILE).write_text(json.dumps({"files": files}, indent=2) + "\n", encoding="utf-8")


def _recorded(manifest: Path) -> dict[str, dict]:
    """The files a manifest lists, or DamagedFile: plain names only (a crafted manifest must not point
    the check at files outside its directory)."""
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        for name, entry in files.items():
            if name != Path(name).name or name.startswith(".") or not isinstance(entry["bytes"], int) \
                    or not isinstance(entry["sha256"], str):
                raise ValueError(name)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise DamagedFile(f"{manifest} is corrupt (not the list of checksums glassgpt writes)") from None
    return files


def damage(directory: str | Path) -> str | None:
    """What is wrong with `directory` against its `checksums.json`, in one line naming the file; None
    when every file listed is there with its recorded size and sha256, or when there is no manifest."""
    directory = Path(directory)
    manifest = directory / CHECKSUMS_FILE
    if not manifest.is_file():
        return None
    try:
        files = _recorded(manifest)
    except DamagedFile as error:
        return str(error)
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            cut = "truncated: " if size < entry["bytes"] else ""
            return f"{path} is {cut}{size:,} bytes, not the {entry['bytes']:,} written when it was saved"
        if sha256_of(path) != entry["sha256"]:
            return f"{path} is corrupt: its sha256 differs from the one recorded when it was saved"
    return None


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:160]


def read_pickle(path: str | Path) -> Any:
    """A torch.save file's contents (tensors on the CPU), through the weights_only loader."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DamagedFile(f"{path} is corrupt, or holds unsupported Python objects (only tensors and "
                          "plain data are loaded: a crafted file, or not one glassgpt wrote): refused, "
                          "nothing in it ran") from None
    except (OSError, RuntimeError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            IndexError) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise DamagedFile(f"{path} is corrupt or truncated ({_reason(error)})") from None


def read_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as error:  # safetensors' own SafetensorError, or an OSError reading it
        raise DamagedFile(f"{path} is corrupt or truncated ({_reason(error)})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise DamagedFile(f"{path} is corrupt or truncated ({_reason(error)})") from None

