"""A1111-style "parameters" text, so an image can be read (and reproduced) by the tools users already have."""

from __future__ import annotations

from triptych.v1 import image_service_pb2


def a1111_parameters(
    request: image_service_pb2.GenerateRequest,
    seed: int,
    steps: int,
    cfg_scale: float,
    width: int,
    height: int,
    version: str,
) -> str:
    """Prompt, "Negative prompt: ...", then "Key: value" pairs as A1111 writes them (Clip skip is ours + 1)."""
    lines = [request.positive_prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    pairs = [
        ("Steps", steps),
        ("Sampler", request.scheduler or "Default"),
        ("CFG scale", f"{cfg_scale:g}"),
        ("Seed", seed),
        ("Size", f"{width}x{height}"),
        ("Model", request.model),
    ]
    if request.HasField("clip_skip") and request.clip_skip:
        pairs.append(("Clip skip", request.clip_skip + 1))
    if request.vae:
        pairs.append(("VAE", request.vae))
    if request.lora:
        pairs.append(
            ("Lora", ", ".join(f"{x.model}:{x.weight if x.HasField('weight') else 1.0:g}" for x in request.lora))
        )
    if request.HasField("refiner"):
        pairs.append(("Refiner", request.refiner.model))
    pairs.append(("Version", f"triptych {version}"))
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs))
    return "\n".join(lines)
