"""What every artifact records about the software that produced it."""

from __future__ import annotations

import platform
import time


def versions() -> dict[str, str]:
    import torch
    import transformers

    from . import __version__

    return {
        "layerprune": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def stamp() -> dict:
    return {"versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
