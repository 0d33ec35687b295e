"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its last layer, 4-channel latents.

Mirrors diffusers' StableDiffusionPipeline (encode_prompt, the denoising loop's inputs).
"""

from __future__ import annotations

from triptych.families.base import PreviewFactors, TextEncoderSlot
from triptych.families.unet import UNetFamily


class StableDiffusion(UNetFamily):
    name = "sd1"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionControlNetPipeline",
    )
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder"),)
    default_clip_skip = 0
    lora_loader_name = "StableDiffusionLoraLoaderMixin"
    preview = PreviewFactors(
        ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721), (-0.2120, -0.2616, -0.7177))
    )

    def conditioning_layer(self, output, transformer, row: int, clip_skip: int):
        # encode_prompt: hidden_states[-(k+1)] then the final layer norm; k = 0 is the last layer, already normed.
        # clone(): a fresh tensor, so the reductions that follow (norm, emphasis mean) see the memory layout of a
        # pass of its own.
        if clip_skip == 0:
            return output.last_hidden_state[row : row + 1].clone()
        layer = output.hidden_states[-(clip_skip + 1)][row : row + 1].clone()
        return transformer.final_layer_norm(layer)


FAMILY = StableDiffusion()
