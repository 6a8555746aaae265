"""Writing files whole: a temporary file beside the target, synced, then renamed onto it (the one atomic
writer of the project), and the checks of output paths before any work."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import InputError


def file_mode() -> int:
    """0o666 less the umask: what ``open()`` gives a new file (``mkstemp`` and safetensors give 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write ``path`` whole: ``data`` (bytes, or text as UTF-8) or what ``data(tmp)`` writes to a temporary
    path goes into ``.<name>.<random>.tmp`` beside it, which gets the umask's mode, is synced to disk and is
    renamed onto ``path``. A reader sees the old file or the whole new one, never a part; a killed writer
    leaves at most a temporary file (see :func:`remove_stale_temps`)."""
    path = Path(path)
    tmp = _synced_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists (never a partial file); True if this call created it."""
    tmp = _synced_temp(path, data)
    try:
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists
            return True
        except FileExistsError:
            return False
        except OSError:  # file systems without hard links
            if path.exists():
                return False
            os.replace(tmp, path)
            return True
    finally:
        tmp.unlink(missing_ok=True)


def _synced_temp(path: Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """A temporary file beside ``path`` holding ``data``, with the umask's mode, synced to disk."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def temp_owner(name: str) -> str | None:
    """The final file name a temporary file ``.<name>.<random>.tmp`` was for, else None."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    stem = name[1:-len(".tmp")]
    return stem.rsplit(".", 1)[0] if "." in stem else None


def remove_stale_temps(folder: Path, owned: set[str]) -> int:
    """Delete temporary files in ``folder`` left for the names in ``owned`` (by a killed writer)."""
    removed = 0
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    for name in names:
        if temp_owner(name) in owned:
            try:
                os.unlink(folder / name)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def check_folder_path(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, if it is a folder or can be made one: nothing on its way is a file (else ``ValueError``
    naming the file), so that no work is done for outputs that cannot be written."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.is_dir():
            break  # an existing folder: the rest of the way exists
        if path.exists() or path.is_symlink():
            raise InputError(f"{what} {folder} cannot be made a folder: {path} is a file")
    return folder
