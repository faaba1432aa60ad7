"""Training data for recovery: plain text packed into windows, or Alpaca-style instructions.

- Text (a .txt / .jsonl-of-text file or folder, `fixture:train`, or a named corpus when online) is
  tokenized whole and cut into non-overlapping windows of `seqlen` tokens; the loss is on every token.
- Instruction JSONL in the Alpaca format, one object per line with `instruction`, optional `input`,
  and `output`: the Alpaca prompt, then the response and EOS; the loss is on the response only.
  `alpaca` names the cleaned Alpaca set (yahma/alpaca-cleaned) that LLM-Pruner and Shortened LLaMA
  use, when a network exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import default_bos, encode, eval_windows, json_lines, load_text, read_utf8
from ..errors import LayerpruneError

IGNORE = -100  # label of a token the loss skips (the prompt of an instruction)

PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class TrainingData:
    """Examples as (input_ids, labels) pairs of at most `seqlen` tokens, and how they were made."""

    input_ids: list[torch.Tensor]
    labels: list[torch.Tensor]
    protocol: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded batch; padding is masked out of attention and loss."""
        width = max(self.input_ids[i].numel() for i in indices)
        ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = self.input_ids[i].numel()
            ids[row, :n] = self.input_ids[i]
            labels[row, :n] = self.labels[i]
            attention[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def training_data(tokenizer, source: str, seqlen: int, bos: str | None = None) -> TrainingData:
    """Read `source` (see the module docstring) into training examples of at most `seqlen` tokens."""
    if seqlen < 2:
        raise LayerpruneError(f"--seqlen {seqlen} is too short for training; use at least 2 tokens")
    records = _instruction_records(source)
    if records is not None:
        return _instructions(tokenizer, records, source, seqlen)
    text = load_text(source, "train")
    windows = eval_windows(tokenizer, text, seqlen, bos or default_bos(tokenizer))  # < 1 window: an error
    ids = list(windows.input_ids)
    protocol = {**windows.protocol, "kind": "train", "format": "text", "examples": len(ids)}
    return TrainingData(ids, [t.clone() for t in ids], protocol)


def _instruction_records(source: str) -> list[dict] | None:
    """Alpaca records if `source` is an instruction file (or the named set), else None (plain text)."""
    if source == "alpaca":
        return _named_alpaca()
    path = Path(source).expanduser()
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return None
    lines = read_utf8(path).splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        head = json.loads(first)
    except json.JSONDecodeError:
        return None  # not JSON lines: load_text reports it
    if not (isinstance(head, dict) and ("instruction" in head or "output" in head)):
        return None  # {"text": ...} lines: plain text
    records = []
    for n, obj in json_lines(path, lines, "an object with instruction, input, output"):
        missing = [k for k in ("instruction", "output") if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise LayerpruneError(
                f"{path}:{n} has no {' or '.join(missing)} field; an Alpaca line is "
                '{"instruction": ..., "input": ..., "output": ...}'
            )
        for key in ("instruction", "input", "output"):
            if not isinstance(obj.get(key, ""), str):
                raise LayerpruneError(f"{path}:{n}: field {key} must be a string")
        records.append(obj)
    return records


def _named_alpaca() -> list[dict]:
    from ..models.loading import hub_offline

    if hub_offline():
        raise LayerpruneError(
            "dataset 'alpaca' needs a network and none is reachable; pass a local Alpaca .jsonl or text file"
        )
    try:
        import datasets
    except ImportError:
        raise LayerpruneError("dataset 'alpaca' needs the datasets package: pip install datasets") from None
    return [dict(r) for r in datasets.load_dataset("yahma/alpaca-cleaned", split="train")]


def _instructions(tokenizer, records: list[dict], source: str, seqlen: int) -> TrainingData:
    ids, labels = [], []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    digest = hashlib.sha256()
    for r in records:
        template = PROMPT if r.get("input") else PROMPT_NO_INPUT
        prompt = bos + encode(
            tokenizer, template.format(instruction=r["instruction"], input=r.get("input", ""))
        )
        response = encode(tokenizer, r["output"]) + eos
        tokens = (prompt + response)[:seqlen]
        target = ([IGNORE] * len(prompt) + response)[:seqlen]
        digest.update(json.dumps(r, sort_keys=True).encode())
        if any(t != IGNORE for t in target[1:]):  # a response token survives the cut
            ids.append(torch.tensor(tokens, dtype=torch.long))
            labels.append(torch.tensor(target, dtype=torch.long))
    if not ids:
        raise LayerpruneError(
            f"no example of {source} keeps a response token within {seqlen} tokens; use a larger --seqlen"
        )
    protocol = {
        "dataset": source,
        "text_sha256": digest.hexdigest()[:16],
        "seqlen": seqlen,
        "kind": "train",
        "format": "alpaca",
        "examples": len(ids),
        "dropped": len(records) - len(ids),
        "tokens": sum(int((t != IGNORE).sum()) for t in labels),
    }
    return TrainingData(ids, labels, protocol)
