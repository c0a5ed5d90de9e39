"""`python tests/support/hashed_run.py OUT_JSON ARGS...`: `fp8q ARGS...` as a user runs it, counting the bytes
huggingface_hub's client hashes (sha256) on its own, written to OUT_JSON at exit: {"bytes": N, "calls": K}. fp8q hands
each shard's sha256 to the client, so a push should leave the client nothing to hash but small side files. fp8q itself
has no such hook: it is put in place from here.
"""

from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import huggingface_hub.lfs as lfs  # noqa: E402

counted = {"bytes": 0, "calls": 0}


def _count_fileobj(fileobj: BinaryIO, chunk_size: int | None = None) -> bytes:
    start = fileobj.tell()
    digest = original_fileobj(fileobj) if chunk_size is None else original_fileobj(fileobj, chunk_size)
    counted["bytes"] += fileobj.tell() - start
    counted["calls"] += 1
    return digest


def _count_bytes(data: bytes = b"", *args: Any, **kwargs: Any) -> Any:
    counted["bytes"] += len(data)
    counted["calls"] += 1
    return original_bytes(data, *args, **kwargs)


original_fileobj, original_bytes = lfs.sha_fileobj, lfs.sha256
lfs.sha_fileobj = _count_fileobj  # type: ignore[assignment]
lfs.sha256 = _count_bytes  # type: ignore[assignment]

if __name__ == "__main__":
    out = Path(sys.argv[1])
    atexit.register(lambda: out.write_text(json.dumps(counted)))
    sys.argv = ["fp8q", *sys.argv[2:]]
    from fp8q.__main__ import main

    main()
