"""The one atomic-write helper: write beside the target, rename onto it when complete.

A kill at any moment leaves either the old file or the new one under the final name, never a
half-written one; the temporary file lives in the same directory (so the rename is atomic) and
is removed when the writing fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replacing", "temp_path_beside", "write_text_atomic"]


def temp_path_beside(path: str | Path, suffix: str = ".creating") -> Path:
    """A new empty temporary file next to ``path``, with the permissions a plain ``open`` gives.

    ``suffix`` keeps an extension some writers need (``".png"``, ``".onnx"``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files
    return Path(tmp)


@contextmanager
def replacing(path: str | Path, suffix: str = ".creating") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds,
    remove it when the block raises::

        with replacing(out / "report.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = temp_path_beside(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text)
