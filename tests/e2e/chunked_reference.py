"""An independent reference for long and weighted prompts, written out from docs/prompts.md (A1111's method).

Each 75-token chunk is encoded on its own as [BOS, tokens, EOS, padding] at batch size 1 by transformers'
own text encoder; A1111 emphasis is applied per chunk (scale by the multipliers, restore the chunk's mean);
chunks are concatenated on the sequence axis, encoders on the feature axis; the pooled output is the first
chunk's. Nothing here imports Triptych's encoder code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CHUNK = 75


class ChunkedReference:
    """The text encoders of one tiny model folder, loaded by transformers alone."""

    def __init__(self, folder: Path):
        self.family = "sdxl" if (folder / "text_encoder_2").exists() else "sd1"
        self.parts = [
            (CLIPTokenizer.from_pretrained(folder / tok), cls.from_pretrained(folder / enc).eval())
            for tok, enc, cls in (
                ("tokenizer", "text_encoder", CLIPTextModel),
                ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
            )
            if (folder / enc).exists()
        ]

    def chunks(self, tokenizer, fragments: list[tuple[str, float]]) -> list[tuple[list[int], list[float]]]:
        """(text, weight) fragments ("BREAK", None closes a chunk) -> [(ids[77], multipliers[77])]."""
        groups: list[list[tuple[int, float]]] = [[]]
        for text, weight in fragments:
            if weight is None:
                groups.append([])
                continue
            for token in tokenizer(text, add_special_tokens=False, verbose=False).input_ids:
                if len(groups[-1]) == CHUNK:
                    groups.append([])
                groups[-1].append((token, weight))
        if not groups[-1] and len(groups) > 1:
            groups.pop()
        out = []
        for group in groups:
            pad = CHUNK - len(group)
            ids = [tokenizer.bos_token_id, *[t for t, _ in group], tokenizer.eos_token_id]
            ids += [tokenizer.pad_token_id] * pad
            out.append((ids, [1.0, *[w for _, w in group], 1.0] + [1.0] * pad))
        return out

    @torch.no_grad()
    def encode(
        self, fragments: list[tuple[str, float]], clip_skip: int = 0, pad_to: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompt_embeds [1, 77·chunks, dim] (padded with empty chunks up to `pad_to`) and the pooled output."""
        per_encoder, pooled = [], None
        for tokenizer, encoder in self.parts:
            chunks = self.chunks(tokenizer, fragments)
            empty = ([tokenizer.bos_token_id, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * CHUNK, [1.0] * 77)
            chunks += [empty] * (pad_to - len(chunks))
            zs = []
            for index, (ids, multipliers) in enumerate(chunks):
                out = encoder(torch.tensor([ids]), output_hidden_states=True)
                if self.family == "sdxl":
                    z = out.hidden_states[-(clip_skip + 2)]
                    if index == 0 and isinstance(encoder, CLIPTextModelWithProjection):
                        pooled = out.text_embeds
                elif clip_skip == 0:
                    z = out.last_hidden_state
                else:
                    z = encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
                original_mean = z.mean()
                z = z * torch.tensor(multipliers).reshape(1, -1, 1)
                zs.append(z * (original_mean / z.mean()))
            per_encoder.append(torch.cat(zs, dim=1))
        return torch.cat(per_encoder, dim=-1), pooled

    def chunk_count(self, fragments: list[tuple[str, float]]) -> int:
        return len(self.chunks(self.parts[0][0], fragments))
