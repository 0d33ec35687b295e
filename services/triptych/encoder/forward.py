"""One text-encoder forward pass over many 77-token chunks, each row getting the bits it gets alone.

Rows from different prompts and requests share a pass (dynamic batching), so every per-row result must not
depend on its neighbours. Measured on CPU (torch 2.13): the Linear layers, attention and LayerNorm over
[rows, 77, dim] are row-independent, but the MLP's elementwise activation is not when 77 * intermediate_size
is not a multiple of the vector width (the tiny models' 37): the tail of a tensor takes a different code
path, so a row's values changed with the batch size. `make_rows_independent` applies the activation one row
at a time. The pooled projection (a Linear over one row per prompt) is computed per prompt, on the row
that prompt has alone (see `project_pooled`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triptych.encoder.chunks import Chunk
from triptych.encoder.textual_inversion import substituted
from triptych.families import Family


class RowwiseActivation(torch.nn.Module):
    """An elementwise activation computed one batch row at a time, each row a fresh tensor of its own shape."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 1:
            return self.inner(hidden)
        return torch.cat([self.inner(hidden[row : row + 1].clone()) for row in range(hidden.shape[0])])


def make_rows_independent(text_encoder: torch.nn.Module) -> None:
    """Wraps each CLIP MLP activation in RowwiseActivation (idempotent; no parameters change)."""
    transformer = getattr(text_encoder, "text_model", text_encoder)  # CLIPTextModelWithProjection nests it
    for layer in transformer.encoder.layers:
        if not isinstance(layer.mlp.activation_fn, RowwiseActivation):
            layer.mlp.activation_fn = RowwiseActivation(layer.mlp.activation_fn)


@dataclass
class EncodedRows:
    """Per row the conditioning layer [1, 77, dim] (before emphasis); pooled outputs [rows, dim] unprojected."""

    hidden: list[torch.Tensor]
    pooled: torch.Tensor


def encode_rows(text_encoder, family: Family, chunks: list[Chunk], clip_skips: list[int]) -> EncodedRows:
    """Runs `chunks` through one text encoder in one pass; row i uses clip skip `clip_skips[i]`, at the layer the
    family's encode_prompt takes (`Family.conditioning_layer`). Callers hold the model lock and torch.no_grad."""
    input_ids = torch.tensor([chunk.input_ids for chunk in chunks], device=text_encoder.device)
    substitutions = [
        (row, position, vector) for row, chunk in enumerate(chunks) for position, vector in chunk.substitutions
    ]
    transformer = getattr(text_encoder, "text_model", text_encoder)
    with substituted(text_encoder, substitutions):
        output = transformer(input_ids, output_hidden_states=True)
    hidden = [family.conditioning_layer(output, transformer, row, skip) for row, skip in enumerate(clip_skips)]
    return EncodedRows(hidden, output.pooler_output)


def project_pooled(text_encoder, pooled: torch.Tensor, row: int) -> torch.Tensor:
    """CLIPTextModelWithProjection's text_embeds for one row [1, dim], computed on that row alone."""
    return text_encoder.text_projection(pooled[row : row + 1].clone())
