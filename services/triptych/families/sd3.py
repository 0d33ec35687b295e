"""Stable Diffusion 3: CLIP-L + CLIP-G penultimate layers (joined, zero-padded to T5's width) followed by T5's
sequence, pooled outputs of both CLIPs; an `SD3Transformer2DModel` with true classifier-free guidance.

Mirrors diffusers' StableDiffusion3Pipeline (encode_prompt, prepare_latents, the timestep preparation, the loop) and
StableDiffusion3ControlNetPipeline (the guide as scaled VAE latents, one sample per half of the CFG batch; the
ControlNet's block residuals added in the transformer).
"""

from __future__ import annotations

from triptych.families.base import DenoiserConditioning, PreviewFactors, TextEncoderSlot
from triptych.families.flow import FlowFamily, calculate_shift


class StableDiffusion3(FlowFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    controlnet_class_name = "SD3ControlNetModel"
    text_encoders = (
        TextEncoderSlot("tokenizer", "text_encoder"),
        TextEncoderSlot("tokenizer_2", "text_encoder_2"),
        TextEncoderSlot("tokenizer_3", "text_encoder_3"),
    )
    t5_slot = text_encoders[-1]
    default_max_sequence_length = 256  # StableDiffusion3Pipeline's default
    network_class_name = "SD3Transformer2DModel"
    lora_loader_name = "SD3LoraLoaderMixin"
    default_clip_skip = 1  # the penultimate CLIP layers, as SDXL
    # Latent -> RGB approximation for the SD3 VAE's 16 channels (ComfyUI's latent_formats.SD3).
    preview = PreviewFactors(
        (
            (-0.0922, -0.0175, 0.0749),
            (0.0311, 0.0633, 0.0954),
            (0.1994, 0.0927, 0.0458),
            (0.0856, 0.0339, 0.0902),
            (0.0587, 0.0272, -0.0496),
            (-0.0006, 0.1104, 0.0309),
            (0.0978, 0.0306, 0.0427),
            (-0.0042, 0.1038, 0.1358),
            (-0.0194, 0.0020, 0.0669),
            (-0.0488, 0.0130, -0.0268),
            (0.0922, 0.0988, 0.0951),
            (-0.0278, 0.0524, -0.0542),
            (0.0332, 0.0456, 0.0895),
            (-0.0069, -0.0030, -0.0810),
            (-0.0596, -0.0465, -0.0293),
            (-0.1448, -0.1463, -0.1189),
        ),
        (0.2394, 0.2135, 0.1925),
    )

    def read_lora(self, path):
        state_dict, metadata = self.lora_loader().lora_state_dict(
            str(path.parent), weight_name=path.name, return_lora_metadata=True
        )
        return state_dict, None, metadata  # SD3's loader keeps no network alphas

    def inject_network_lora(self, loader, network, state_dict: dict, alphas, name: str, metadata) -> None:
        loader.load_lora_into_transformer(state_dict, network, adapter_name=name, metadata=metadata)

    def text_width(self, config: dict) -> int:
        return config["joint_attention_dim"]

    def default_size(self, config: dict) -> int:
        return config["sample_size"] * self.latent_scale

    def uses_cfg(self, config: dict, guidance_scale: float) -> bool:
        return guidance_scale > 1

    def encode_prompt(self, parts, prompt: str, clip_skip: int, max_sequence_length: int, field: str = "prompt"):
        import torch

        notes: list[str] = []
        layers, pooled = [], []
        for slot in self.text_encoders[:2]:  # _get_clip_prompt_embeds, clip_model_index 0 and 1
            encoder = parts[slot.encoder]
            ids = self.clip_input_ids(parts[slot.tokenizer], prompt, notes if not layers else [], field)
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            pooled.append(output[0])
            layers.append(output.hidden_states[-(clip_skip + 2)])
        clip_embeds = torch.cat(layers, dim=-1)
        t5 = self.t5_embeds(parts, prompt, max_sequence_length, notes, field)
        clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5.shape[-1] - clip_embeds.shape[-1]))
        return torch.cat([clip_embeds, t5], dim=-2), torch.cat(pooled, dim=-1), notes

    def set_timesteps(self, scheduler, steps: int, latent_shape, network_config: dict, device) -> None:
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):  # SD3.5: mu from the patch count
            patch = network_config["patch_size"]
            kwargs["mu"] = calculate_shift(
                (latent_shape[-2] // patch) * (latent_shape[-1] // patch),
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=device, **kwargs)

    # ---- ControlNet units (StableDiffusion3ControlNetPipeline) ----
    def guide_samples(self, guidance_scale: float) -> int:
        # The pipeline VAE-encodes the CFG-doubled guide image, so each half gets its own sample.
        return 2 if self.uses_cfg({}, guidance_scale) else 1

    def guide_rows(self, do_cfg: bool) -> tuple[int, ...]:
        return (1, 2) if do_cfg else (1,)

    def controlnet_violation(self, net_config: dict, network_config: dict) -> str | None:
        if not net_config.get("use_pos_embed", True):
            return "shares the transformer's position embedding (SD3.5's own ControlNets): not served yet"
        joint = net_config.get("joint_attention_dim")
        if joint is not None and joint != network_config.get("joint_attention_dim"):
            return "was not built for this base model's family"
        return super().controlnet_violation(net_config, network_config)

    def scaled_guide(self, net, latents, guide, do_cfg: bool):
        import torch

        shift = 0 if net.config.force_zeros_for_pooled_projection else guide.shift_factor  # InstantX: no shift
        scaled = (latents - (shift or 0)) * guide.scaling_factor
        return torch.cat([scaled] * 2) if do_cfg and scaled.shape[0] == 1 else scaled  # one guide for both halves

    def control_residuals(self, state, latent_model_input, timestep):
        """Summed block residuals of every unit at this model call, as StableDiffusion3ControlNetPipeline's loop
        (SD3MultiControlNetModel for several units) computes them."""
        import torch

        from triptych.denoiser.controlnet import kept_scale, merged

        pooled, blocks = state.conditioning.extra["pooled_projections"], None
        for unit in state.control:
            config = unit.net.config
            block = unit.net(
                hidden_states=latent_model_input,
                timestep=timestep,
                # SD3.5's own ControlNets read no prompt tokens; InstantX's read zero pooled projections
                encoder_hidden_states=state.conditioning.prompt_embeds if config.joint_attention_dim else None,
                pooled_projections=torch.zeros_like(pooled) if config.force_zeros_for_pooled_projection else pooled,
                joint_attention_kwargs=None,
                controlnet_cond=unit.image,
                conditioning_scale=kept_scale(unit, state.first_call + state.index, state.schedule_length),
                return_dict=False,
            )[0]
            blocks = merged(blocks, block)
        return blocks

    def denoiser_conditioning(self, info, network, job, do_cfg: bool, height: int, width: int, place):
        import torch

        conditioning = super().denoiser_conditioning(info, network, job, do_cfg, height, width, place)
        pooled = place.tensor(job.positive.pooled_prompt_embeds)
        if do_cfg:
            pooled = torch.cat([place.tensor(job.negative.pooled_prompt_embeds), pooled])
        conditioning.extra["pooled_projections"] = pooled
        return conditioning

    def predict(self, state, network, t, copy_output: bool = False):
        import torch

        latent_model_input = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
        timestep = t.expand(latent_model_input.shape[0])
        control = {}
        if state.control:
            control["block_controlnet_hidden_states"] = self.control_residuals(state, latent_model_input, timestep)
        noise_pred = network(
            hidden_states=latent_model_input,
            timestep=timestep,
            encoder_hidden_states=state.conditioning.prompt_embeds,
            pooled_projections=state.conditioning.extra["pooled_projections"],
            joint_attention_kwargs=None,
            return_dict=False,
            **control,
        )[0]
        if copy_output:
            noise_pred = noise_pred.clone()
        return self.guided(state, noise_pred)


FAMILY = StableDiffusion3()
__all__ = ["FAMILY", "DenoiserConditioning"]
