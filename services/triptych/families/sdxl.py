"""Stable Diffusion XL, base and refiner: CLIP-L + OpenCLIP-G (the refiner: G only), pooled text embeddings and
size (or aesthetic-score) time ids as the UNet's added inputs.

Mirrors diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline (encode_prompt,
_get_add_time_ids, the added_cond_kwargs of the denoising loop).
"""

from __future__ import annotations

from triptych.families.base import DenoiserConditioning, PreviewFactors, TextEncoderSlot
from triptych.families.unet import UNetFamily

REFINER = "sdxl-refiner"


class StableDiffusionXL(UNetFamily):
    name = "sdxl"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLControlNetPipeline",
    )
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder"), TextEncoderSlot("tokenizer_2", "text_encoder_2"))
    default_clip_skip = 1  # SDXL conditions on the penultimate layer
    lora_loader_name = "StableDiffusionXLLoraLoaderMixin"
    preview = PreviewFactors(
        ((0.3651, 0.4232, 0.4341), (-0.2533, -0.0042, 0.1068), (0.1076, 0.1111, -0.0362), (-0.3165, -0.2492, -0.2188)),
        (0.1084, -0.0175, -0.0011),
    )

    def variant(self, info) -> str:
        return REFINER if self.is_refiner(info) else self.name

    @staticmethod
    def is_refiner(info) -> bool:
        """A refiner folder has its own text_encoder_2 only."""
        return (info.index.get("text_encoder") or [None])[0] is None

    def refiner_variants(self) -> tuple[tuple[str, str], ...]:
        return ((self.name, REFINER),)

    def conditioning_layer(self, output, transformer, row: int, clip_skip: int):
        # encode_prompt: hidden_states[-(k+2)], without the final layer norm.
        return output.hidden_states[-(clip_skip + 2)][row : row + 1].clone()

    @staticmethod
    def time_ids(info, height: int, width: int, aesthetic_score: float, negative_aesthetic_score: float):
        """The added time ids (positive, negative) as _get_add_time_ids builds them: original = target = (h, w),
        crop (0, 0); a refiner (requires_aesthetics_score) takes its aesthetic scores instead of the target."""
        if info.flag("requires_aesthetics_score", False):
            return [height, width, 0, 0, aesthetic_score], [height, width, 0, 0, negative_aesthetic_score]
        time_ids = [height, width, 0, 0, height, width]
        return time_ids, time_ids

    def check_prompt_conditioning(self, name: str, conditioning) -> list:
        return self.pooled_violations(name, conditioning, "an SDXL")

    def check_negative_matches(self, job) -> list:
        return self.pooled_mismatch(job)

    def check_added_inputs(self, info, config: dict, job, height: int, width: int) -> list:
        # The added embedding (diffusers' text_time): the time ids and the pooled text embeddings, concatenated.
        time_ids, _ = self.time_ids(info, height, width, job.aesthetic_score, job.negative_aesthetic_score)
        added = config["projection_class_embeddings_input_dim"]
        passed = config["addition_time_embed_dim"] * len(time_ids) + job.positive.pooled_prompt_embeds.shape[-1]
        if added != passed:
            return [
                (
                    "positive.pooled_prompt_embeds",
                    f"{job.model!r} expects {added} added-embedding features, got {passed}",
                )
            ]
        return []

    def denoiser_conditioning(
        self, info, network, job, do_cfg: bool, height: int, width: int, place
    ) -> DenoiserConditioning:
        import torch

        conditioning = super().denoiser_conditioning(info, network, job, do_cfg, height, width, place)
        time_ids, negative_time_ids = self.time_ids(
            info, height, width, job.aesthetic_score, job.negative_aesthetic_score
        )
        add_text_embeds = place.tensor(job.positive.pooled_prompt_embeds)
        add_time_ids = place.tensor(torch.tensor([time_ids], dtype=torch.float32))
        if do_cfg:
            add_text_embeds = torch.cat([place.tensor(job.negative.pooled_prompt_embeds), add_text_embeds])
            add_time_ids = torch.cat(
                [place.tensor(torch.tensor([negative_time_ids], dtype=torch.float32)), add_time_ids]
            )
        conditioning.added_cond_kwargs = {"text_embeds": add_text_embeds, "time_ids": add_time_ids}
        return conditioning

    def zero_conditioning(self, info, network):
        import torch

        embeds, _ = super().zero_conditioning(info, network)
        time_ids = len(self.time_ids(info, 0, 0, 0.0, 0.0)[0])
        features = network.add_embedding.linear_1.in_features - network.config.addition_time_embed_dim * time_ids
        return embeds, torch.zeros(1, features)


FAMILY = StableDiffusionXL()
