"""Writing files whole: a temporary file beside the target, synced, then renamed onto it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def file_mode() -> int:
    """0o666 less the umask: what ``open()`` gives a new file (``mkstemp`` and safetensors give 0o600)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then give it the umask's mode, sync it to
    disk and rename it onto ``path``: a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_folder_path(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, if it is a folder or can be made one: nothing on its way is a file (else ``ValueError``
    naming the file), so that no work is done for outputs that cannot be written."""
    folder = Path(folder)
    for path in (folder, *folder.parents):
        if path.is_dir():
            break  # an existing folder: the rest of the way exists
        if path.exists() or path.is_symlink():
            raise ValueError(f"{what} {folder} cannot be made a folder: {path} is a file")
    return folder
