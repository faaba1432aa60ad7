"""bench/peers.py's contract with its peers, without any peer installed: the token ids a peer is fed
are exactly the windows layerprune calibrates on, and a peer whose venv cannot be built is skipped
with the reason (make test never installs a peer)."""

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import layerprune as lp

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ids_mod():
    return _module("peers_ids", BENCH / "peers" / "ids.py")


def test_fed_ids_are_layerprunes_windows(fixture_lm, ids_mod, tmp_path):
    """Saved, reloaded, turned into the datasets.Dataset the llm-compressor runner builds, and run
    through a model row by row: the ids its embedding receives have the fingerprint of the windows."""
    from datasets import Dataset

    windows = lp.calibration(fixture_lm, "fixture:val", samples=5, seqlen=32, kind="sparsity")
    path = tmp_path / "calib.pt"
    written = ids_mod.save_ids(windows.input_ids, windows.protocol, path)
    # an independent hash of the same bytes
    h = hashlib.sha256(str(tuple(windows.input_ids.shape)).encode())
    h.update(windows.input_ids.to(torch.int64).numpy().tobytes())
    assert written == h.hexdigest()[:16]

    ids, meta = ids_mod.load_ids(path)
    assert torch.equal(ids, windows.input_ids) and meta["protocol"]["fingerprint"] == windows.fingerprint
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * ids.shape[1]] * len(ids)})
    tap = ids_mod.EmbeddingTap(fixture_lm.model.get_input_embeddings())
    try:
        with torch.no_grad():
            for row in data.with_format("torch"):
                fixture_lm.model(input_ids=row["input_ids"][None])
            fixture_lm.model(input_ids=ids[:1])  # a second pass over a sample (propagation) is not new data
    finally:
        tap.close()
    assert ids_mod.fingerprint(tap.unique_rows()) == written
    # a loader that reorders the windows feeds the same set; other windows (one token changed) are not it
    assert ids_mod.set_fingerprint(ids.flip(0)) == ids_mod.set_fingerprint(ids) == meta["set_fingerprint"]
    assert ids_mod.fingerprint(ids.flip(0)) != written
    other = windows.input_ids.clone()
    other[2, 7] = (other[2, 7] + 1) % 100
    assert ids_mod.fingerprint(other) != written
    assert ids_mod.set_fingerprint(other) != meta["set_fingerprint"]


def test_changed_ids_file_is_refused(fixture_lm, ids_mod, tmp_path):
    windows = lp.calibration(fixture_lm, "fixture:val", samples=2, seqlen=16, kind="sparsity")
    path = tmp_path / "calib.pt"
    ids_mod.save_ids(windows.input_ids, windows.protocol, path)
    torch.save(windows.input_ids.flip(0), path)
    with pytest.raises(SystemExit, match="token ids changed since they were written"):
        ids_mod.load_ids(path)


def test_unbuildable_peer_is_skipped_with_the_reason(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        peers = _module("bench_peers", BENCH / "peers.py")
    finally:
        sys.path.remove(str(BENCH))
    req = tmp_path / "brokenpeer.txt"
    req.write_text("this is not ! a requirement\n")
    python, why = peers.peer_python("llm-compressor", requirements=req, cache=tmp_path)
    assert python is None
    assert why.startswith("pip install -r brokenpeer.txt failed:") and "requirement" in why.lower()
    assert not list((tmp_path / "peers").glob("brokenpeer-*/ok"))  # never marked usable
    # a second call tries again rather than trusting a half-built venv
    python, _ = peers.peer_python("llm-compressor", requirements=req, cache=tmp_path)
    assert python is None
