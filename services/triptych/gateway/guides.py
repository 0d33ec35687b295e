"""ControlNet guides for the families whose ControlNets take latents (FLUX, SD3): each guide image is encoded by the
decoder service (the denoiser holds no VAE) before the denoiser runs, sampled as the diffusers pipelines sample it.

FluxControlNetPipeline samples its guides' latent distributions with the request's generator, in unit order, and then
draws the initial noise from the same generator: the decoder starts a generator from the image's seed, each unit
continues the previous unit's state, and the denoiser continues the last one. StableDiffusion3ControlNetPipeline
samples its guides (one row per CFG half) from torch's global generator, which no request can set: Triptych seeds it
with the image's seed (docs/decisions.md), and the denoiser starts a fresh generator from the seed as usual.
Torch-free, like the rest of the gateway.
"""

from __future__ import annotations

from triptych.v1 import decoder_service_pb2, denoiser_service_pb2, image_service_pb2


def encode_guides(
    calls,
    decoder,
    request: image_service_pb2.GenerateRequest,
    denoise_request: denoiser_service_pb2.DenoiseRequest,
    family,
    seed: int,
) -> None:
    """Replaces each unit's guide_image in `denoise_request` with its guide_latents (one EncodeImage call per unit,
    in order), and hands the generator on to the denoiser where the family's pipeline shares it."""
    state = b""
    samples = family.guide_samples(denoise_request.guidance_scale)
    for index, unit in enumerate(denoise_request.control_net):
        encode = decoder_service_pb2.EncodeImageRequest(
            model=request.model, vae=request.vae, image=unit.guide_image, samples=samples, seed=seed
        )
        encode.generator_state = state
        for side in ("width", "height"):
            if request.HasField(side):
                setattr(encode, side, getattr(request, side))
        renames = {"image": f"control_net[{index}].guide_image"}
        response = calls.unary("guide", decoder.EncodeImage, encode, renames)
        unit.guide_latents.CopyFrom(response.latents)
        unit.guide_image = b""  # the denoiser reads the latents; the image need not travel twice
        state = response.generator_state
    if family.guides_share_generator:
        denoise_request.generator_state = state
