"""Listing a library and reading its stored inventory load no audio decoder (`status` and the plan read it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DECODERS = {"av", "soundfile", "soxr", "mutagen", "librosa"}
PROBE = """
import json, sys
from genre_batch.library.discovery import discover
from genre_batch.status import status
from genre_batch.storage.feature_store import read_inventory, write_inventory
from genre_batch.storage.store import Store
store = Store.at(sys.argv[2])
write_inventory(store, discover(sys.argv[1]))
facts = status(store)
print(json.dumps({"listed": read_inventory(store)["uri"].to_pylist(), "tracks": facts["tracks"],
                  "modules": sorted({m.split('.')[0] for m in sys.modules})}))
"""


def test_listing_and_reading_an_inventory_import_no_decoder(tmp_path: Path) -> None:
    library, store = tmp_path / "library", tmp_path / "store"
    (library / "rock").mkdir(parents=True)
    store.mkdir()
    (library / "rock" / "a.flac").write_bytes(b"fLaC")  # listed by name and size: nothing is decoded
    (library / "rock" / "notes.txt").write_text("not audio")
    done = subprocess.run([sys.executable, "-c", PROBE, str(library), str(store)], capture_output=True, text=True, timeout=300, check=True)
    found = json.loads(done.stdout)
    assert found["listed"] == [str(library / "rock" / "a.flac")] and found["tracks"] == 0
    assert "genre_batch" in found["modules"] and not DECODERS & set(found["modules"])
