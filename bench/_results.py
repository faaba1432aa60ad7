"""Writing a benchmark's JSON: versions and time stamped, written atomically, path printed."""

from layerprune.io import atomic_write_json
from layerprune.provenance import stamp


def write(doc: dict, path) -> dict:
    doc.update(stamp())
    atomic_write_json(path, doc)
    print(f"wrote {path}")
    return doc
