"""Writing a small text file so that a reader never sees half of it.

One spelling for every such file (traces, cache manifests, run metadata, the configurator's
model, search caches): write a uniquely named temporary file beside the target, optionally
``fsync`` it, then rename it over the target. Adapter folders have their own, fuller writer
(``io.write_folder_atomically``: several files, hashes, a directory rename).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file renamed over it.

    ``durable``: ``fsync`` the file before the rename, for files whose loss after a crash would
    be read as damage (a cache manifest). The temporary file is removed if anything fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
