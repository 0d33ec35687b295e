"""FLUX.1: CLIP-L's pooled output + T5's sequence; a guidance-distilled `FluxTransformer2DModel` on packed latents
(2x2 patches of 16 channels as one 64-wide token) with image and text position ids; no unconditional pass.

Mirrors diffusers' FluxPipeline (encode_prompt, prepare_latents, _pack_latents / _unpack_latents,
_prepare_latent_image_ids, the timestep preparation with calculate_shift, the denoising loop) and
FluxControlNetPipeline (InstantX ControlNets: the guide as packed, scaled VAE latents sampled with the request's
generator before the initial noise; the block residuals added in the transformer).
"""

from __future__ import annotations

from triptych.families.base import DenoiserConditioning, PreviewFactors, TextEncoderSlot
from triptych.families.flow import FlowFamily, calculate_shift


class Flux(FlowFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    controlnet_class_name = "FluxControlNetModel"
    guides_share_generator = True  # FluxControlNetPipeline samples the guides, then the noise, from one generator
    controlnet_matching_keys = ("in_channels", "patch_size", "pooled_projection_dim", "joint_attention_dim")
    text_encoders = (TextEncoderSlot("tokenizer", "text_encoder"), TextEncoderSlot("tokenizer_2", "text_encoder_2"))
    t5_slot = text_encoders[-1]
    default_max_sequence_length = 512  # FluxPipeline's default and maximum
    network_class_name = "FluxTransformer2DModel"
    lora_loader_name = "FluxLoraLoaderMixin"
    default_clip_skip = 0
    takes_negative_prompt = False  # guidance-distilled: CFGScale is its guidance embedding
    clip_skip_has_effect = False  # CLIP-L gives only its pooled output
    # Latent -> RGB approximation for the FLUX VAE's 16 channels (ComfyUI's latent_formats.Flux).
    preview = PreviewFactors(
        (
            (-0.0346, 0.0244, 0.0681),
            (0.0034, 0.0210, 0.0687),
            (0.0275, -0.0668, -0.0433),
            (-0.0174, 0.0160, 0.0617),
            (0.0859, 0.0721, 0.0329),
            (0.0004, 0.0383, 0.0115),
            (0.0405, 0.0861, 0.0915),
            (-0.0236, -0.0185, -0.0259),
            (-0.0245, 0.0250, 0.1180),
            (0.1008, 0.0755, -0.0421),
            (-0.0515, 0.0201, 0.0011),
            (0.0428, -0.0012, -0.0036),
            (0.0817, 0.0765, 0.0749),
            (-0.1264, -0.0522, -0.1103),
            (-0.0280, -0.0881, -0.0499),
            (-0.1262, -0.0982, -0.0778),
        ),
        (-0.0329, -0.0718, -0.0851),
    )

    def read_lora(self, path):
        return self.lora_loader().lora_state_dict(
            str(path.parent), weight_name=path.name, return_alphas=True, return_lora_metadata=True
        )

    def inject_network_lora(self, loader, network, state_dict: dict, alphas, name: str, metadata) -> None:
        loader.load_lora_into_transformer(state_dict, alphas, network, adapter_name=name, metadata=metadata)

    def text_width(self, config: dict) -> int:
        return config["joint_attention_dim"]

    def default_size(self, config: dict) -> int:
        return 128 * self.latent_scale  # FluxPipeline.default_sample_size x vae_scale_factor

    def hidden_layer_index(self, clip_skip: int) -> int:
        return -1  # T5's last layer; CLIP gives only its pooled output

    def encode_prompt(self, parts, prompt: str, clip_skip: int, max_sequence_length: int, field: str = "prompt"):
        notes: list[str] = []
        clip = parts["text_encoder"]
        ids = self.clip_input_ids(parts["tokenizer"], prompt, notes, field)
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output  # _get_clip_prompt_embeds
        embeds = self.t5_embeds(parts, prompt, max_sequence_length, notes, field)
        return embeds, pooled, notes

    # ---- latents: packed 2x2 patches ----
    def latent_shape(self, channels: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (1, channels // 4, height // self.latent_scale, width // self.latent_scale)

    @staticmethod
    def pack(latents):
        """FluxPipeline._pack_latents: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
        batch, channels, height, width = latents.shape
        latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)

    def wire_latents(self, latents, height: int, width: int):
        """FluxPipeline._unpack_latents: [B, (H/2)(W/2), 4C] -> [B, C, H, W]."""
        batch, _, channels = latents.shape
        h, w = height // self.latent_scale, width // self.latent_scale
        latents = latents.view(batch, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(batch, channels // 4, h, w)

    def initial_latents(self, shape, generator, place, scheduler):
        return self.pack(super().initial_latents(shape, generator, place, scheduler))

    # ---- ControlNet units (FluxControlNetPipeline) ----
    def controlnet_violation(self, net_config: dict, network_config: dict) -> str | None:
        if net_config.get("conditioning_embedding_channels") is not None:
            return "is an XLabs-style FLUX ControlNet (the guide as pixels): only InstantX-style ones are served"
        if net_config.get("num_mode") is not None:
            return "is a union FLUX ControlNet, which needs a control type per unit: not served yet"
        return super().controlnet_violation(net_config, network_config)

    def latent_channels(self, network_config: dict) -> int:
        return network_config["in_channels"] // 4  # 2x2 patches of the VAE's channels are packed into one token

    def scaled_guide(self, net, latents, guide, do_cfg: bool):
        return self.pack(super().scaled_guide(net, latents, guide, do_cfg))

    @staticmethod
    def network_inputs(state, timestep) -> dict:
        """What the transformer and its ControlNets both take at a model call, as FluxPipeline passes it."""
        extra = state.conditioning.extra
        return dict(
            hidden_states=state.latents,
            timestep=timestep / 1000,
            pooled_projections=extra["pooled_projections"],
            encoder_hidden_states=state.conditioning.prompt_embeds,
            txt_ids=extra["txt_ids"],
            img_ids=extra["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )

    def control_residuals(self, state, timestep):
        """Summed (block, single-block) residuals of every unit at this model call, as FluxControlNetPipeline's loop
        (FluxMultiControlNetModel for several units) computes them."""
        import torch

        from triptych.denoiser.controlnet import kept_scale, merged

        blocks, single_blocks = None, None
        for unit in state.control:
            guidance = None
            if unit.net.config.guidance_embeds:  # the ControlNet's own flag, as the pipeline reads it
                guidance = torch.tensor([state.job.guidance_scale], device=state.latents.device)
                guidance = guidance.expand(state.latents.shape[0])
            block, single = unit.net(
                **self.network_inputs(state, timestep),
                controlnet_cond=unit.image,
                controlnet_mode=None,
                conditioning_scale=kept_scale(unit, state.first_call + state.index, state.schedule_length),
                guidance=guidance,
            )
            blocks, single_blocks = merged(blocks, block), merged(single_blocks, single)
        return blocks, single_blocks

    def set_timesteps(self, scheduler, steps: int, latent_shape, network_config: dict, device) -> None:
        import numpy as np

        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        config = scheduler.config
        mu = calculate_shift(
            (latent_shape[-2] // 2) * (latent_shape[-1] // 2),  # the packed sequence length
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)

    def denoiser_conditioning(self, info, network, job, do_cfg: bool, height: int, width: int, place):
        import torch

        embeds = place.tensor(job.positive.prompt_embeds)
        h, w = height // self.latent_scale // 2, width // self.latent_scale // 2
        image_ids = torch.zeros(h, w, 3)  # _prepare_latent_image_ids
        image_ids[..., 1] = image_ids[..., 1] + torch.arange(h)[:, None]
        image_ids[..., 2] = image_ids[..., 2] + torch.arange(w)[None, :]
        extra = {
            "pooled_projections": place.tensor(job.positive.pooled_prompt_embeds),
            "txt_ids": torch.zeros(embeds.shape[1], 3).to(device=place.device, dtype=place.dtype),
            "img_ids": image_ids.reshape(h * w, 3).to(device=place.device, dtype=place.dtype),
            "guidance": None,
        }
        if network.config.guidance_embeds:  # FLUX.1-dev: CFGScale is the distilled guidance
            extra["guidance"] = torch.full([1], job.guidance_scale, device=place.device, dtype=torch.float32)
        return DenoiserConditioning(embeds, extra=extra)

    def predict(self, state, network, t, copy_output: bool = False):
        extra = state.conditioning.extra
        timestep = t.expand(state.latents.shape[0]).to(state.latents.dtype)
        control = {}
        if state.control:  # InstantX ControlNets: their blocks are not repeated (XLabs' would be)
            blocks, single_blocks = self.control_residuals(state, timestep)
            control = dict(controlnet_block_samples=blocks, controlnet_single_block_samples=single_blocks)
        noise_pred = network(**self.network_inputs(state, timestep), guidance=extra["guidance"], **control)[0]
        return noise_pred.clone() if copy_output else noise_pred


FAMILY = Flux()
