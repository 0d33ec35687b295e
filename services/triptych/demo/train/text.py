"""Stage ``text``: the CLIP text encoder learns to say what a caption names.

SD trains its UNet against a frozen text encoder that CLIP had already taught what captions mean. Ours is taught the
same way in miniature: CLIP's image side is replaced by the scene itself, so the encoder learns, by linear probes on
its end-of-text state, to tell each caption's shape, colour, background, size and position (or that the caption
leaves it out). The probes read the last three layers through the final layer norm with one set of weights, which
keeps clip skip 1 and 2 meaning what clip skip 0 means. The probes are thrown away; the encoder is frozen for the
UNet (docs/demo-model.md, "Text encoder").
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ...model_builders.clip_vocab import write_clip_tokenizer
from ..data import BASE_MIX, Example, batch
from ..render import Placement
from ..vocabulary import COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES
from .configs import TEXT, StageSettings, text_encoder_config
from .loop import Trainer, load_part

STAGE = "text"
CLIP_SKIPS = (0, 1, 2)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": tuple(COLOURS),
    "background": tuple(COLOURS),
    "size": SIZES,
    "position": tuple(POSITIONS),
}


def tokenizer(work: Path) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer (SD1.5 pads with <|endoftext|>), written once under ``work/tokenizer``."""
    directory = Path(work) / "tokenizer"
    if not (directory / "vocab.json").exists():
        write_clip_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory)


def token_ids(tok: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(n, 77) ids, padded and truncated as SD1.5's pipeline does."""
    return tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


PLACEHOLDER_ID = 0  # as the encoder service: an ordinary id, never BOS/EOS


def placed_ids(
    tok: CLIPTokenizer, captions: list[str], token: str, count: int
) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    """(n, 77) ids with ``count`` placeholders where ``token`` stands, and (row, position, vector index) of each; a
    caption without the token is tokenized whole.

    The text around the token is tokenized piece by piece, as the encoder service tokenizes around an embedding
    (``encoder/chunks.py``; a test compares the two).
    """
    rows, places = [], []
    for row, caption in enumerate(captions):
        before, found, after = caption.partition(token)
        ids = [tok.bos_token_id, *tok(before.strip(), add_special_tokens=False).input_ids]
        if found:
            places += [(row, len(ids) + k, k) for k in range(count)]
            ids += [PLACEHOLDER_ID] * count + tok(after.strip(), add_special_tokens=False).input_ids
        ids = [*ids[:76], tok.eos_token_id]
        rows.append(ids + [tok.pad_token_id] * (77 - len(ids)))
    return torch.tensor(rows), [p for p in places if p[1] < 76]


def placed_states(
    text_encoder: CLIPTextModel,
    ids: torch.Tensor,
    places: list[tuple[int, int, int]],
    vectors: torch.Tensor,
    clip_skip: torch.Tensor,
) -> torch.Tensor:
    """``hidden_states`` with ``vectors[k]`` written over the token embedding at each (row, position, k) of
    ``places``: a hook on the token-embedding layer, as the encoder service places an embedding's vectors
    (``encoder/textual_inversion.py``). Gradients reach ``vectors``."""

    def place(module, inputs, output):
        output = output.clone()
        for row, position, k in places:
            output[row, position] = vectors[k]
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(place)
    try:
        return hidden_states(text_encoder, ids, clip_skip)
    finally:
        handle.remove()


def hidden_states(text_encoder: CLIPTextModel, ids: torch.Tensor, clip_skip: torch.Tensor) -> torch.Tensor:
    """(n, 77, width): row i at clip skip ``clip_skip[i]``, as the encoder service computes it (families/sd1.py:
    hidden_states[-(k + 1)], then the final layer norm)."""
    layers = text_encoder(ids, output_hidden_states=True).hidden_states
    stacked = torch.stack([text_encoder.final_layer_norm(layers[-(k + 1)]) for k in CLIP_SKIPS])
    return stacked[clip_skip.to(stacked.device), torch.arange(ids.shape[0], device=stacked.device)]


def targets(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Per attribute, the class each caption names; ``len(words)`` where the caption leaves it out (a crescent's
    caption never names its shape)."""
    out = {}
    for name, words in ATTRIBUTES.items():
        values = [getattr(e.scene, name) for e in examples]
        out[name] = torch.tensor(
            [
                words.index(value) if name not in e.omitted and value in words else len(words)
                for e, value in zip(examples, values, strict=True)
            ]
        )
    return out


class Probes(nn.Module):
    """One linear read-out per attribute, shared by every probed layer."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, len(words) + 1) for name, words in ATTRIBUTES.items()})

    def forward(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(state) for name, head in self.heads.items()}


def _end_of_text(text_encoder: CLIPTextModel, ids: torch.Tensor) -> torch.Tensor:
    """(len(CLIP_SKIPS), n, width): each probed layer's normed state at the first <|endoftext|>."""
    layers = text_encoder(ids, output_hidden_states=True).hidden_states
    position = (ids == text_encoder.config.eos_token_id).int().argmax(dim=-1)
    rows = torch.arange(ids.shape[0])
    return torch.stack([text_encoder.final_layer_norm(layers[-(k + 1)])[rows, position] for k in CLIP_SKIPS])


def new_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**text_encoder_config()))


@torch.no_grad()
def probe_accuracy(text_encoder: CLIPTextModel, probes: Probes, tok: CLIPTokenizer, examples: list[Example]) -> dict:
    """{attribute: share right} over the examples at every probed layer."""
    states = _end_of_text(text_encoder, token_ids(tok, [e.caption for e in examples]).to(text_encoder.device))
    want = targets(examples)
    return {
        f"{name}@clip_skip{k}": float((probes(states[i])[name].argmax(-1).cpu() == want[name]).float().mean())
        for i, k in enumerate(CLIP_SKIPS)
        for name in ATTRIBUTES
    }


def train_text(
    work: Path, settings: StageSettings = TEXT, max_seconds: float | None = None, log=print, device: str = "cpu"
) -> bool:
    """Run (or resume) the stage on ``device``; when it completes, write ``work/text/text_encoder`` and metrics."""
    tok = tokenizer(work)
    text_encoder = new_text_encoder(settings.seed)
    torch.manual_seed(settings.seed + 1)
    probes = Probes(text_encoder.config.hidden_size)
    model = nn.ModuleDict({"text_encoder": text_encoder, "probes": probes}).to(device)
    trainer = Trainer(work, STAGE, settings, model, log=log)
    cross_entropy = nn.CrossEntropyLoss()

    def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
        examples = batch(settings.seed, step * settings.batch_size, settings.batch_size, BASE_MIX)
        states = _end_of_text(text_encoder, token_ids(tok, [e.caption for e in examples]).to(device))
        want = {name: classes.to(device) for name, classes in targets(examples).items()}
        losses = [cross_entropy(probes(s)[name], want[name]) for s in states for name in ATTRIBUTES]
        return torch.stack(losses).mean()

    if not trainer.run(loss_fn, max_seconds):
        return False
    held_out = [Example(scene=s, placement=Placement(), caption=s.caption()) for s in HELD_OUT]
    partial = batch(settings.seed + 1000, 0, 512, BASE_MIX)
    metrics = {
        "held_out": probe_accuracy(text_encoder, probes, tok, held_out),
        "stream": probe_accuracy(text_encoder, probes, tok, partial),
    }
    trainer.export(text_encoder, "text_encoder", metrics)
    log(f"text: held-out probe accuracy, lowest field: {min(metrics['held_out'].values()):.3f}")
    return True


def load_text_encoder(work: Path, dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """The trained, frozen text encoder of a completed ``text`` stage."""
    return load_part(work, STAGE, "text_encoder", CLIPTextModel, dtype)
