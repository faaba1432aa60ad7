"""Run llama.cpp's `convert_hf_to_gguf.py` (argv: LLAMA_CPP_DIR, then the converter's own arguments).

One change to the converter's choices, none to what it writes: its DeciLM class picks the tokenizer
by vocabulary size (128256 = Llama-3's GPT-2-style BPE, anything else = DeciLM-7B's Llama
SentencePiece-HF), so a DeciLM model with any other byte-level BPE vocabulary fails with "Cannot find
Llama BPE tokenizer". Where that happens we use the converter's own GPT-2 BPE path, as its Llama
class does for such tokenizers. Run as `python -m layerprune.models._convert_gguf` by
`models/llamacpp.py`.
"""

from __future__ import annotations

import sys


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
    sys.argv = [converter.__file__, *sys.argv[2:]]
    converter.main()


if __name__ == "__main__":
    main()
