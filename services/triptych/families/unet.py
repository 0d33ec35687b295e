"""What the UNet families (SD1.x/2.x, SDXL) share: a `UNet2DConditionModel` on DDPM-style schedulers, classifier-free
guidance as one [negative, positive] batch, ControlNet residuals, LCM's guidance embedding, denoising windows.

Mirrors the denoising loop of diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline (and their ControlNet
variants). torch is imported inside the methods: importing a family loads no torch.
"""

from __future__ import annotations

from triptych.families.base import DenoiserConditioning, Family
from triptych.rules.control_units import BALANCED, CONTROLNET, PROMPT


class UNetFamily(Family):
    network_class_name = "UNet2DConditionModel"
    supports_windows = True
    supports_controlnet = True
    controlnet_class_name = "ControlNetModel"
    control_modes = (BALANCED, PROMPT, CONTROLNET)

    def text_width(self, config: dict) -> int:
        return config["cross_attention_dim"]

    def default_size(self, config: dict) -> int:
        return config["sample_size"] * self.latent_scale

    def uses_cfg(self, config: dict, guidance_scale: float) -> bool:
        """CFG above scale 1, except on a guidance-distilled (LCM) UNet, which takes the scale as an embedding."""
        return guidance_scale > 1 and config["time_cond_proj_dim"] is None

    def set_timesteps(self, scheduler, steps: int, latent_shape, network_config: dict, device) -> None:
        scheduler.set_timesteps(steps, device=device)

    def initial_latents(self, shape, generator, place, scheduler):
        from diffusers.utils.torch_utils import randn_tensor

        # Noise from the CPU generator in the network's dtype, then moved: the same numbers on every device, as
        # diffusers' randn_tensor gives them for a CPU generator.
        latents = randn_tensor(shape, generator=generator, device=place.device, dtype=place.dtype)
        return latents * scheduler.init_noise_sigma

    def denoiser_conditioning(self, info, network, job, do_cfg: bool, height: int, width: int, place):
        conditioning = super().denoiser_conditioning(info, network, job, do_cfg, height, width, place)
        time_cond_proj_dim = network.config.time_cond_proj_dim
        if time_cond_proj_dim is not None:  # a guidance-distilled (LCM) UNet: the scale as `timestep_cond`
            import torch

            guidance = torch.tensor(job.guidance_scale - 1).repeat(1)
            conditioning.extra["timestep_cond"] = guidance_scale_embedding(guidance, time_cond_proj_dim).to(
                device=place.device, dtype=place.dtype
            )
        return conditioning

    def controlnet_violation(self, net_config: dict, network_config: dict) -> str | None:
        """A ControlNet must be built for the base model's UNet (cross-attention width, added conditioning)."""
        keys = ("cross_attention_dim", "addition_embed_type", "in_channels")
        if any(net_config.get(key) != network_config.get(key) for key in keys):
            return "was not built for this base model's family"
        return None

    def prepare_control(self, units, nets, do_cfg: bool, height: int, width: int, place) -> list:
        from triptych.denoiser.controlnet import prepare_units

        return prepare_units(list(units), nets, width, height, do_cfg, place.device, place.dtype, self.latent_scale)

    def predict(self, state, network, t, copy_output: bool = False):
        """The guided noise prediction at timestep t: model input -> ControlNet residuals -> UNet -> guidance."""
        import torch

        from triptych.denoiser.controlnet import residuals

        conditioning = state.conditioning
        latents = torch.cat([state.latents] * 2) if state.do_cfg else state.latents
        latent_model_input = state.scheduler.scale_model_input(latents, t)
        down, mid = None, None
        if state.control:
            # A unit's window is a fraction of the whole schedule, not of this window: diffusers' SDXL ControlNet
            # pipeline sets controlnet_keep before it applies denoising_end.
            down, mid = residuals(
                state.control,
                state.first_call + state.index,
                state.schedule_length,
                t,
                state.latents,
                latent_model_input,
                state.scheduler.scale_model_input,
                conditioning.prompt_embeds,
                conditioning.added_cond_kwargs,
                state.do_cfg,
            )
        noise_pred = network(
            latent_model_input,
            t,
            encoder_hidden_states=conditioning.prompt_embeds,
            timestep_cond=conditioning.extra.get("timestep_cond"),
            cross_attention_kwargs=None,
            added_cond_kwargs=conditioning.added_cond_kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        if copy_output:
            noise_pred = noise_pred.clone()
        return self.guided(state, noise_pred)

    def inject_network_lora(self, loader, network, state_dict: dict, alphas, name: str, metadata) -> None:
        loader.load_lora_into_unet(state_dict, alphas, network, adapter_name=name, metadata=metadata)

    def zero_conditioning(self, info, network):
        import torch

        return torch.zeros(1, 77, network.config.cross_attention_dim), None


def guidance_scale_embedding(w, embedding_dim: int):
    """diffusers' get_guidance_scale_embedding (the pipelines' `timestep_cond` for a UNet with time_cond_proj_dim):
    sinusoidal features of 1000 w, [len(w), embedding_dim], float32."""
    import torch

    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -emb)
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


__all__ = ["DenoiserConditioning", "UNetFamily", "guidance_scale_embedding"]
