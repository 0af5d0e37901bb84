"""Writing files so that a crash or a full disk never leaves a half-written one under the real
name, and reading files from outside the run without running their code.

Durable writes: the data goes to `<name>.tmp.<pid>` next to the target, is fsynced, renamed
over the target (atomic on POSIX file systems), and the folder is fsynced so that the rename
itself survives a power loss or a node crash. A reader sees the old file or the new one,
never a part.

Untrusted files (`checkpoint.init_from`, tokenizer checkpoints, conversion inputs: files
downloaded from the internet): torch.load with `weights_only=True`, which unpickles tensors
and plain containers only. The few other objects the released files legitimately hold
(argparse.Namespace in BEiT v2 / unilm checkpoints) are allowed by name; anything else is
refused with the name of the object, never loaded as a full pickle.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
from typing import Any, Callable, Iterator

import torch

#: Classes that released BEiT-3 / BEiT v2 / unilm checkpoints pickle besides tensors: their
#: training scripts store the argparse arguments (`"args": Namespace(...)`).
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class UnsafeFileError(ValueError):
    """A file holds pickled objects beyond tensors and plain data; loading it could run code."""


def fsync_dir(path: str) -> None:
    """Make the entries of folder `path` (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tmp_name(path: str) -> str:
    return f"{path}.tmp.{os.getpid()}"


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields a temporary path to write `path`'s new content to; on success it is fsynced and
    renamed over `path` and the folder fsynced; on an error it is removed and `path` is left
    as it was."""
    tmp = _tmp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
    with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n")


def save_torch(obj: Any, path: str) -> None:
    """torch.save, durably (see the module docstring)."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def write_with(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp_path)` produces the file; it then replaces `path` durably."""
    with replacing(path) as tmp:
        write(tmp)


def load_untrusted(path: str, what: str = "file", mmap: bool = False) -> Any:
    """torch.load of a file from outside the run: tensors and plain data only (see the module
    docstring). Raises UnsafeFileError naming the object the file wanted to create."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "global" in line),
                      first[0] if first else type(e).__name__)
        raise UnsafeFileError(
            f"{path}: this {what} holds pickled objects other than tensors and plain data "
            f"({detail}); it is not loaded, because unpickling it could run code from the "
            "file. Files from the released BEiT-3 / BEiT v2 checkpoints and our own exports "
            "load; if you trust this one, re-save its tensors: torch.save(torch.load(path, "
            "weights_only=False)['model'], 'weights.pt')") from None
