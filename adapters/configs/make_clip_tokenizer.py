"""Write clip-tokenizer/vocab.json and merges.txt: CLIP's byte-level BPE vocabulary, in Hugging Face's layout.

    python adapters/configs/make_clip_tokenizer.py path/to/bpe_simple_vocab_16e6.txt.gz

The input is OpenAI CLIP's BPE file, which open_clip_torch ships (MIT licence) as
open_clip/bpe_simple_vocab_16e6.txt.gz; `pip download --no-deps open-clip-torch==3.3.0` fetches the wheel that
holds it (sha256 of the .gz: 924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a). The derivation is
CLIP's own (`SimpleTokenizer.__init__`): the first 48,894 merges; the vocabulary is the 256 byte symbols, the same
with `</w>`, one token per merge, then `<|startoftext|>` and `<|endoftext|>` (49,408 tokens). Every Stable
Diffusion text encoder (SD 1.x, SD 2.x, both of SDXL's) uses this one vocabulary; they differ only in padding.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "clip-tokenizer"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary size less the byte symbols and the two special tokens


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 bytes to printable characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def vocabulary(merges: list[str]) -> dict[str, int]:
    """The token -> id table CLIP builds from its merges."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def main(bpe_gz: str) -> None:
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : MERGES + 1]  # the first line is a header
    OUT.mkdir(exist_ok=True)
    vocab = json.dumps(vocabulary(merges), ensure_ascii=False, separators=(",", ":"))
    (OUT / "vocab.json").write_text(vocab, encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])
