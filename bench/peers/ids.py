"""The calibration token ids every tool of bench/peers.py is fed: one file, one fingerprint.

Imported by the driver (our venv) and by each peer's runner (its own venv): plain torch only.
The fingerprint is the sha256 of the int64 ids in row order, so the driver's windows and what a
peer's model actually received (captured at its embedding layer) can be compared exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from pathlib import Path

import torch


def fingerprint(ids) -> str:
    t = torch.as_tensor(ids).to(torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def set_fingerprint(ids) -> str:
    """The fingerprint of the windows as a set: rows sorted first. A tool's data loader may reorder the
    windows (llm-compressor's does), which changes nothing a calibration sums over."""
    t = torch.as_tensor(ids).to(torch.int64)
    rows = sorted(tuple(r) for r in t.tolist())
    return fingerprint(torch.tensor(rows, dtype=torch.int64).reshape(t.shape))


def save_ids(ids: torch.Tensor, protocol: dict, path: Path) -> str:
    """ids [n, seqlen] and layerprune's protocol of them to `path` (.pt) and `path`.json."""
    path = Path(path)
    ids = ids.to(torch.int64).contiguous()
    fp = fingerprint(ids)
    tmp = path.with_suffix(".tmp")
    torch.save(ids, tmp)
    tmp.replace(path)
    meta = {
        "shape": list(ids.shape),
        "fingerprint": fp,
        "set_fingerprint": set_fingerprint(ids),
        "protocol": protocol,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return fp


def load_ids(path: Path) -> tuple[torch.Tensor, dict]:
    """The ids and their metadata; refuses a file whose content no longer has its fingerprint."""
    path = Path(path)
    ids = torch.load(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if fingerprint(ids) != meta["fingerprint"]:
        raise SystemExit(
            f"{path}: token ids changed since they were written; rerun bench/peers.py, which writes them anew"
        )
    return ids, meta


def peak_rss() -> int:
    """This process's peak resident memory so far (VmHWM, bytes; Linux), read between the phases."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return -1


class EmbeddingTap:
    """Records the token ids a model's input embedding receives (forward pre-hook), in call order:
    what the tool really calibrated on, whatever its data pipeline did to the dataset."""

    def __init__(self, embedding: torch.nn.Module):
        self.rows: list[torch.Tensor] = []
        self.handle = embedding.register_forward_pre_hook(self._hook)

    def _hook(self, _module, args):
        self.rows.extend(args[0].detach().reshape(-1, args[0].shape[-1]).cpu())

    def close(self) -> None:
        self.handle.remove()

    def unique_rows(self) -> torch.Tensor:
        """Distinct rows in first-seen order (a pipeline may run the same sample more than once)."""
        seen, out = set(), []
        for r in self.rows:
            key = r.numpy().tobytes()
            if key not in seen:
                seen.add(key)
                out.append(r)
        return torch.stack(out) if out else torch.empty(0, 0, dtype=torch.int64)


def runner_parser(with_ids: bool = True):
    """The arguments every runner takes from the driver (its own are added after)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    if with_ids:
        ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def save_hf(model, tokenizer, out) -> None:
    """A plain save_pretrained folder (replaced if there), with the tokenizer."""
    import shutil

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


class Phases:
    """A runner's phases (load, step, save): the time of each, the peak RSS after each, and the result
    record the driver reads, with the fingerprints of what the model's embedding was fed."""

    def __init__(self, started: float):
        self.record: dict = {"import_s": time.perf_counter() - started}
        self.rss: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        yield
        self.record[f"{name}_s"] = time.perf_counter() - t
        self.rss[f"after_{name}"] = peak_rss()

    def write(
        self, path, tool: str, tap: EmbeddingTap | None = None, meta: dict | None = None, **extra
    ) -> None:
        out = {"tool": tool, **self.record, "peak_rss_by_phase": self.rss}
        if tap is not None:
            fed = tap.unique_rows()
            out.update(
                fed_fingerprint=fingerprint(fed) if fed.numel() else None,
                fed_set_fingerprint=set_fingerprint(fed) if fed.numel() else None,
                ids_fingerprint=meta["fingerprint"],
                ids_set_fingerprint=meta["set_fingerprint"],
            )
        out.update(extra)
        Path(path).write_text(json.dumps(out, indent=1))
