"""Telling pickles from safetensors without unpickling anything (a leaf module: standard library only).

Weights are only ever read as safetensors. `safetensors_problem` parses no
more than a file's 8-byte header length and its JSON header, so nothing in the
file can run, and says what the file looks like when it is not safetensors (a
pickle, torch.save's zip format, anything else). `pickle_files` finds pickles
and pickle containers in a folder tree: the model-code check refuses a model
folder that holds one, and the tests run it over every artifact the pipeline
writes.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

# Leading bytes of formats that execute code or need pickle to load: pickle
# protocol 2-5 (b"\x80" + protocol byte) and zip (torch.save's default format).
PICKLE_MAGIC = tuple(bytes([0x80, p]) for p in range(2, 6))
ZIP_MAGIC = b"PK\x03\x04"
# File names that say "pickle" whatever their content.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib")


def safetensors_problem(path: Path) -> str | None:
    """What `path` is instead of a safetensors file, or None when its header is well-formed.

    Only the header is read (8-byte little-endian length + that many bytes of
    JSON object), so nothing in the file is interpreted beyond it.

    Returns:
        None for a well-formed header; else "a Python pickle", "a zip archive
        (torch.save format, which holds a pickle)" or "not a safetensors file".
    """
    with open(path, "rb") as f:
        head = f.read(8)
        size = path.stat().st_size
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        ok = 0 < n <= size - 8
        if ok:
            header = f.read(n)
            try:
                ok = isinstance(json.loads(header), dict)
            except (UnicodeDecodeError, json.JSONDecodeError):
                ok = False
    if ok:
        return None
    return ("a Python pickle" if head[:2] in PICKLE_MAGIC else
            "a zip archive (torch.save format, which holds a pickle)" if head[:4] == ZIP_MAGIC else
            "not a safetensors file")


def pickle_files(root: str | Path) -> list[Path]:
    """Files under `root` that are pickles or pickle containers (by name or content).

    Looks at the extension (`PICKLE_SUFFIXES`) and the leading bytes (pickle
    protocol 2-5, or a zip archive holding a `data.pkl`, i.e. torch.save's
    format). A safetensors file whose length header happens to start with 0x80
    is recognised by its header and not reported.

    Returns:
        The offending paths, sorted.
    """
    found = []
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        if path.suffix.lower() in PICKLE_SUFFIXES:
            found.append(path)
            continue
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] in PICKLE_MAGIC:
            if safetensors_problem(path) is not None:
                found.append(path)
        elif head == ZIP_MAGIC and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith(".pkl") for n in z.namelist()):
                    found.append(path)
    return found
