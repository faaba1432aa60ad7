import json

import pytest
import torch

from layerprune.data import calibration_windows, default_bos, eval_windows, load_text
from layerprune.errors import LayerpruneError


@pytest.fixture(scope="module")
def tok(fixture_lm):
    return fixture_lm.tokenizer


def test_local_sources(tmp_path):
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps("delta") + "\n")
    assert load_text(str(tmp_path / "a.txt")).text == "alpha beta"
    assert load_text(str(tmp_path / "b.jsonl")).documents == ["gamma", "delta"]
    folder = load_text(str(tmp_path))
    assert folder.text == "alpha beta\n\ngamma\n\ndelta"
    assert folder.fingerprint != load_text(str(tmp_path / "a.txt")).fingerprint


def test_source_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LayerpruneError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(LayerpruneError, match="bad.jsonl:1 is not valid JSON"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(LayerpruneError, match="needs a network.*fixture:val"):
        load_text("wikitext2")
    with pytest.raises(LayerpruneError, match="not a file, a folder"):
        load_text("no-such-source")
    with pytest.raises(LayerpruneError, match="splits train, val and test"):
        load_text("fixture:dev")


def test_fixture_splits_are_held_out():
    val, test = load_text("fixture:val"), load_text("fixture:test")
    assert len(val.text) > 100_000 and len(test.text) > 100_000
    assert val.text[:2000] not in test.text


def test_fixture_train_slice_shares_no_document_with_held_out_text():
    import hashlib
    import json
    import re

    from layerprune.models.loading import FIXTURE_DIR

    train = load_text("fixture:train")
    manifest = json.loads((FIXTURE_DIR / "data" / "manifest.json").read_text())["files"]
    assert hashlib.sha256(train.text.encode()).hexdigest() == manifest["train_sample.txt"]["sha256"]
    documents = train.text.split("\n\n")
    held_out = load_text("fixture:val").text + load_text("fixture:test").text
    # a KJV chapter is one paragraph headed "Book N" (Python docs repeat boilerplate paragraphs)
    heading = re.compile(r"^(\d )?[A-Z][a-z]+( [A-Za-z]+)* \d+$")
    paragraphs = [d for d in documents if heading.match(d.split("\n", 1)[0])]
    assert len(paragraphs) > 30
    assert not [d for d in paragraphs if d in held_out]


def test_eval_windows_bos_policies(tok):
    text = load_text("fixture:val")
    ids = tok(text.text, add_special_tokens=False, verbose=False)["input_ids"]
    none = eval_windows(tok, text, 64, "none")
    first = eval_windows(tok, text, 64, "first")
    every = eval_windows(tok, text, 64, "every")
    assert none.input_ids.shape == (len(ids) // 64, 64)
    assert torch.equal(none.input_ids[0], torch.tensor(ids[:64]))
    assert first.input_ids[0, 0] == tok.bos_token_id and torch.equal(
        first.input_ids[0, 1:], torch.tensor(ids[:63])
    )
    assert (every.input_ids[:, 0] == tok.bos_token_id).all()
    assert torch.equal(every.input_ids[1, 1:], torch.tensor(ids[63:126]))  # no text token is skipped
    assert len({none.fingerprint, first.fingerprint, every.fingerprint}) == 3
    assert default_bos(tok) == "first"  # the fixture's tokenizer adds BOS like Llama's


def test_calibration_is_seeded_and_checked(tok):
    text = load_text("fixture:val")
    a = calibration_windows(tok, text, 10, 128, seed=0)
    b = calibration_windows(tok, text, 10, 128, seed=0)
    c = calibration_windows(tok, text, 10, 128, seed=1)
    assert a.input_ids.shape == (10, 128) and torch.equal(a.input_ids, b.input_ids)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert (a.input_ids[:, 0] == tok.bos_token_id).all()
    short = load_text(str(_write(text.text[:300])))
    with pytest.raises(LayerpruneError, match="need .* Use more text, fewer --samples"):
        calibration_windows(tok, short, 10, 128)
    with pytest.raises(LayerpruneError, match="fewer than one window"):
        eval_windows(tok, short, 256)


def _write(text):
    import tempfile
    from pathlib import Path

    p = Path(tempfile.mkdtemp()) / "short.txt"
    p.write_text(text)
    return p


def test_whole_texts_are_tokenized_once_per_tokenizer_state(tmp_path):
    """The in-process cache of whole-text token ids gives exactly the tokenizer's own ids, and a
    tokenizer whose state changed (an added token) or another text is never served the old ids."""
    from transformers import AutoTokenizer

    from layerprune.data import windows
    from layerprune.models.loading import resolve

    folder = resolve("fixture", quiet=True)[1]
    tok = AutoTokenizer.from_pretrained(folder)
    (tmp_path / "t.txt").write_text("zebra crossing and a zebra " * 40)
    text = load_text(str(tmp_path / "t.txt"))
    direct = tok(text.text, add_special_tokens=False)["input_ids"]
    assert list(windows.encode_text(tok, text)) == direct
    assert list(windows.encode_text(tok, text)) == direct  # served from the cache
    assert (
        eval_windows(tok, text, 16, "none").input_ids.flatten().tolist() == direct[: len(direct) // 16 * 16]
    )
    tok.add_tokens(["zebra"])  # the same object, another state
    changed = tok(text.text, add_special_tokens=False)["input_ids"]
    assert changed != direct and list(windows.encode_text(tok, text)) == changed
    (tmp_path / "u.txt").write_text("crossing " * 50)
    other = load_text(str(tmp_path / "u.txt"))
    assert list(windows.encode_text(tok, other)) == tok(other.text, add_special_tokens=False)["input_ids"]
