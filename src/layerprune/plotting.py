"""matplotlib for every chart of the package: pyplot with the Agg backend (no display needed), and an
atomic PNG writer. A bottom-level module: planners and reports both draw with it."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot with the Agg backend (no display needed), or None where it is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically (a temporary file renamed into place) and close it."""
    import matplotlib.pyplot as plt

    from .io import publish, temp_file_beside

    path = Path(path)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path)
    try:
        with open(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        publish(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
