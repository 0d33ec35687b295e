"""What the flow-matching transformer families (FLUX, SD3) share: T5 + CLIP prompts encoded whole as their
diffusers pipelines encode them (no 75-token chunks, no A1111 weighting), FlowMatchEulerDiscreteScheduler with the
shift (and dynamic shift `mu`) from the model's configs, 16-channel latents whose sides must be multiples of 16.

torch is imported inside the methods: importing a family loads no torch.
"""

from __future__ import annotations

from triptych.families.base import Family, TextEncoderSlot
from triptych.rules.scheduler_table import SchedulerRow

# The names that make sense for flow matching. "Euler" is the flow-matching Euler scheduler the models ship with.
FLOW_TABLE = (SchedulerRow("Euler", "FlowMatchEulerDiscreteScheduler"),)


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15) -> float:
    """diffusers' calculate_shift (pipeline_flux.py, pipeline_stable_diffusion_3.py): mu for dynamic shifting,
    linear in the image's token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class FlowFamily(Family):
    denoiser_folder = "transformer"
    chunked_clip_prompts = False
    scheduler_table = FLOW_TABLE
    size_multiple = 16  # VAE 8 x (packing or patch) 2
    default_max_sequence_length: int = 512
    t5_slot: TextEncoderSlot  # the T5 encoder and its tokenizer
    supports_controlnet = True
    guide_latents = True  # their ControlNet pipelines VAE-encode the guide image
    # Config keys a ControlNet must share with the transformer.
    controlnet_matching_keys: tuple[str, ...] = ("in_channels", "patch_size", "pooled_projection_dim")

    def uses_cfg(self, config: dict, guidance_scale: float) -> bool:
        return False

    def initial_latents(self, shape, generator, place, scheduler):
        from diffusers.utils.torch_utils import randn_tensor

        return randn_tensor(shape, generator=generator, device=place.device, dtype=place.dtype)

    def zero_conditioning(self, info, network):
        import torch

        return torch.zeros(1, 77, self.text_width(network.config)), torch.zeros(1, network.config.pooled_projection_dim)

    def check_prompt_conditioning(self, name: str, conditioning) -> list:
        return self.pooled_violations(name, conditioning, f"a {self.name}")

    def check_negative_matches(self, job) -> list:
        return self.pooled_mismatch(job)

    def check_added_inputs(self, info, config: dict, job, height: int, width: int) -> list:
        expected, got = config["pooled_projection_dim"], job.positive.pooled_prompt_embeds.shape[-1]
        if expected != got:
            return [("positive.pooled_prompt_embeds", f"{job.model!r} expects {expected} pooled features, got {got}")]
        return []

    # ---- ControlNet units: guides as VAE latents ----
    def controlnet_violation(self, net_config: dict, network_config: dict) -> str | None:
        def widths(config) -> list:  # its residuals are added to the transformer's tokens: the same widths
            keys = self.controlnet_matching_keys
            return [config.get(key) for key in keys] + [config["num_attention_heads"] * config["attention_head_dim"]]

        return None if widths(net_config) == widths(network_config) else "was not built for this base model's family"

    def guide_rows(self, do_cfg: bool) -> tuple[int, ...]:
        """Rows of guide latents a unit may carry: one sample, or (SD3 under CFG) one per CFG half."""
        return (1,)

    def latent_channels(self, network_config: dict) -> int:
        """Channels of the VAE latents the transformer works on."""
        return network_config["in_channels"]

    def control_unit_violations(self, unit, network_config: dict, height: int, width: int, do_cfg: bool) -> list:
        field = f"{unit.field}.guide_latents"
        if unit.guide_latents is None:
            why = "the guide image's VAE latents (DecoderService.EncodeImage)"
            return [(field, f"required for {self.name} models: {why}")]
        rows = self.guide_rows(do_cfg)
        channels, scale = self.latent_channels(network_config), self.latent_scale
        shape = list(unit.guide_latents.latents.shape)
        expected = [channels, height // scale, width // scale]
        if len(shape) != 4 or shape[0] not in rows or shape[1:] != expected:
            batch = " or ".join(str(row) for row in rows)
            return [(f"{field}.latents", f"expected [{batch}, {', '.join(map(str, expected))}], got {shape}")]
        return []

    def scaled_guide(self, net, latents, guide, do_cfg: bool):
        """The guide's latents (on the network's device) scaled as the family's ControlNet pipeline scales them
        after `vae.encode`: (latents - shift_factor) * scaling_factor."""
        return (latents - (guide.shift_factor or 0.0)) * guide.scaling_factor

    def prepare_control(self, units, nets, do_cfg: bool, height: int, width: int, place) -> list:
        from triptych.denoiser.controlnet import PreparedUnit

        prepared = []
        for unit, net in zip(units, nets, strict=True):
            guide = unit.guide_latents
            condition = self.scaled_guide(net, place.tensor(guide.latents), guide, do_cfg)
            prepared.append(PreparedUnit(net, condition, unit.scale, unit.start, unit.end, unit.mode))
        return prepared

    # ---- prompts ----
    def clip_input_ids(self, tokenizer, prompt: str, notes: list[str], field: str):
        """CLIP ids padded to 77, truncated as _get_clip_prompt_embeds truncates (noted when it does)."""
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        whole = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if whole.shape[-1] > ids.shape[-1]:
            notes.append(f"{field}: CLIP reads the first {tokenizer.model_max_length} tokens of {whole.shape[-1]}")
        return ids

    def t5_embeds(self, parts, prompt: str, max_sequence_length: int, notes: list[str], field: str):
        """_get_t5_prompt_embeds: ids padded and truncated to max_sequence_length, the encoder's last layer."""
        tokenizer, encoder = parts[self.t5_slot.tokenizer], parts[self.t5_slot.encoder]
        ids = tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        whole = tokenizer(prompt, padding="longest", return_tensors="pt").input_ids
        if whole.shape[-1] > ids.shape[-1]:
            notes.append(f"{field}: T5 read the first {max_sequence_length} tokens of {whole.shape[-1]}")
        return encoder(ids.to(encoder.device))[0]


__all__ = ["FLOW_TABLE", "FlowFamily", "calculate_shift"]
