"""Run the real transfer_worker CLI with local reads slowed down, so that a test can signal or kill
the process while a transfer is provably in flight. Only the pace of LocalObjectStore reads changes:
each chunk waits TEST_CHUNK_DELAY seconds (bounded, on an Event, not sleep) and is TEST_CHUNK_SIZE
bytes. Usage: python tests/slow_worker.py [transfer_worker arguments...]"""

import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import transfer_worker as tw

DELAY = min(float(os.environ.get("TEST_CHUNK_DELAY", "0.05")), 1.0)
_never = threading.Event()
_original_chunks = tw.LocalObjectStore._chunks


def _slow_chunks(self, handle, path, ref, info):  # type: ignore[no-untyped-def]
    self.chunk_size = int(os.environ.get("TEST_CHUNK_SIZE", "65536"))
    for chunk in _original_chunks(self, handle, path, ref, info):
        _never.wait(DELAY)
        yield chunk


tw.LocalObjectStore._chunks = _slow_chunks  # type: ignore[method-assign]
sys.exit(tw.main(sys.argv[1:]))
