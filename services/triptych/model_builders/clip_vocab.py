"""Build the real CLIP BPE tokenizer offline from the vendored open_clip vocabulary.

Stable Diffusion's text encoders use OpenAI's CLIP BPE (49408 tokens). The tiny
test models need the *real* tokenizer so that token ids, padding and
prompt-weighting maths match production, but the Hugging Face hub is not
reachable. ``data/bpe_simple_vocab_16e6.txt.gz`` (MIT, from open-clip-torch) holds
the merges; the vocabulary is derived from them exactly as open_clip does.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

BPE_PATH = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
VOCAB_SIZE = 49408
# open_clip keeps 49152 - 256 - 2 merges: 256 byte tokens and 2 specials fill the rest.
_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return ``(vocab, merges)`` of the CLIP BPE tokenizer (49408 tokens, 48894 merges)."""
    text = gzip.decompress(BPE_PATH.read_bytes()).decode("utf-8")
    # Line 0 is the "#version" header; the file holds more merges than CLIP uses.
    lines = text.split("\n")[1 : 1 + _NUM_MERGES]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:  # duplicates would silently shift ids
        raise RuntimeError(f"CLIP vocab has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def write_clip_tokenizer(directory: Path, pad_token: str = EOS_TOKEN) -> None:
    """Write a ``CLIPTokenizer`` folder (vocab.json, merges.txt, configs) into ``directory``.

    Load it with ``transformers.CLIPTokenizer.from_pretrained(directory)``; passing
    the files to the constructor is silently ignored by transformers 5. SD1.5 pads
    with ``<|endoftext|>``; SDXL's ``tokenizer_2`` pads with ``"!"`` (id 0).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (directory / "merges.txt").write_text(merges_text, encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": pad_token}
    (directory / "special_tokens_map.json").write_text(
        json.dumps(special, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
