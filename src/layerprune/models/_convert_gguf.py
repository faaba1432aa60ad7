"""Run llama.cpp's `convert_hf_to_gguf.py` (argv: LLAMA_CPP_DIR, then the converter's own arguments).

Two changes to the converter's choices, none to what it writes. Its DeciLM class picks the tokenizer
by vocabulary size (128256 = Llama-3's GPT-2-style BPE, anything else = DeciLM-7B's Llama
SentencePiece-HF), so a DeciLM model with any other byte-level BPE vocabulary fails with "Cannot find
Llama BPE tokenizer". Where that happens we use the converter's own GPT-2 BPE path, as its Llama
class does for such tokenizers. And it names a byte-level BPE's pre-tokenizer (`tokenizer.ggml.pre`,
the regex llama.cpp splits text with) from a table of the hashes of known models' tokenizations, so
a tokenizer of its own training, like the bundled fixture's, fails with "BPE pre-tokenizer was not
recognized". Where that happens we name it from what the tokenizer declares, when that is exactly
a pre-tokenizer llama.cpp has (`KNOWN_PRE`). Run as `python -m layerprune.models._convert_gguf` by
`models/llamacpp.py`.
"""

from __future__ import annotations

import json
import sys

# What a tokenizer.json declares (normalizer, pre_tokenizer) -> llama.cpp's name for the same split.
# `tokenizers`' ByteLevel pre-tokenizer with use_regex splits with GPT-2's regex ('s|'t|...| ?\p{L}+|
# ?\p{N}+|...), which is llama.cpp's "gpt-2"; without a prefix space and a normalizer that is all of it.
# It is what a byte-level BPE trained with `tokenizers` declares by default: the bundled fixture's.
KNOWN_PRE = [
    (
        None,
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "gpt-2",
    ),
]


def declared_pre(tokenizer) -> str | None:
    """llama.cpp's name for the pre-tokenizer a fast tokenizer declares, if it is one of KNOWN_PRE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    for normalizer, pre, name in KNOWN_PRE:
        if spec.get("normalizer") == normalizer and spec.get("pre_tokenizer") == pre:
            return name
    return None


def main() -> None:
    root = sys.argv[1]
    sys.path[:0] = [root, f"{root}/gguf-py"]  # the converter and the gguf package of the same llama.cpp
    import convert_hf_to_gguf as converter

    try:
        from conversion.deci import DeciModel
    except ImportError:  # older llama.cpp: the classes live in the script itself
        DeciModel = getattr(converter, "DeciModel", None)
    if DeciModel is not None:
        chosen = DeciModel.set_vocab

        def set_vocab(self):
            try:
                chosen(self)
            except (FileNotFoundError, TypeError):
                self._set_vocab_gpt2()

        DeciModel.set_vocab = set_vocab
    try:
        from conversion.base import TextModel
    except ImportError:
        TextModel = converter.TextModel
    table = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return table(self, tokenizer)
        except NotImplementedError:  # not in the converter's table: named from its declaration, if we can
            name = declared_pre(tokenizer)
            if name is None:
                raise
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [converter.__file__, *sys.argv[2:]]
    converter.main()


if __name__ == "__main__":
    main()
