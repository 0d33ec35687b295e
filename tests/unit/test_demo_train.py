"""The demo family's training (#20), smoke-sized: every stage runs, a stopped-and-resumed run ends in the weights of
an unbroken one, and the assembled family is what diffusers loads and runs: an SD1.5 folder, a ControlNet, a kohya
LoRA and an A1111 embedding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from triptych.demo.train.configs import CONTROLNET, LORA, TEXT, TI, UNET, UNET_CRESCENT, VAE, VAE_DECODER
from triptych.demo.train.loop import CHECKPOINT, step_generator

TINY = {"text": TEXT.with_overrides(steps=3, batch_size=4), "vae": VAE.with_overrides(steps=2, batch_size=2)}
UNET_TINY = UNET.with_overrides(steps=4, batch_size=2, checkpoint_every=2)
ADAPTERS_TINY = {
    name: settings.with_overrides(steps=2, batch_size=2)
    for name, settings in (("controlnet", CONTROLNET), ("lora", LORA), ("ti", TI))
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # determinism across runs is per thread count; and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """text and vae trained for a few steps: what the unet stage reads."""
    from triptych.demo.train.text import train_text
    from triptych.demo.train.vae import train_vae

    work = tmp_path_factory.mktemp("demo-work")
    assert train_text(work, TINY["text"], log=lambda _: None)
    assert train_vae(work, TINY["vae"], log=lambda _: None)
    return work


@pytest.fixture(scope="module")
def store(work, tmp_path_factory):
    """Every stage run for a step or two on a copy of ``work``, then assembled (float16) into a store."""
    import shutil

    from triptych.demo.train.assemble import assemble
    from triptych.demo.train.controlnet import train_controlnet
    from triptych.demo.train.inversion import train_inversion
    from triptych.demo.train.lora import train_lora
    from triptych.demo.train.unet import train_unet, train_unet_crescent

    family = tmp_path_factory.mktemp("demo-family")
    shutil.copytree(work, family / "work")
    assert train_unet(family / "work", UNET_TINY.with_overrides(steps=1), log=lambda _: None)
    crescent = UNET_CRESCENT.with_overrides(steps=1, batch_size=9)  # the ninth picture is a crescent
    assert train_unet_crescent(family / "work", crescent, log=lambda _: None)
    for train, name in ((train_controlnet, "controlnet"), (train_lora, "lora"), (train_inversion, "ti")):
        assert train(family / "work", ADAPTERS_TINY[name], log=lambda _: None)
    assemble(family / "work", family / "store", log=lambda _: None)
    return family


def _checkpoint(path):
    return torch.load(path / CHECKPOINT, weights_only=True)


def test_step_generators_depend_on_seed_and_step_only():
    draw = lambda seed, step: torch.rand(3, generator=step_generator(seed, step))  # noqa: E731
    assert torch.equal(draw(1, 5), draw(1, 5))
    assert not torch.equal(draw(1, 5), draw(1, 6)) and not torch.equal(draw(1, 5), draw(2, 5))


def test_text_and_vae_stages_write_their_parts_and_metrics(work):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(work / "text" / "text_encoder")
    assert text_encoder.config.vocab_size == 49408 and text_encoder.config.eos_token_id == 49407
    metrics = json.loads((work / "vae" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["scaling_factor"] > 0
    assert set(metrics["held_out_round_trip"]) == {"background", "colour", "shape", "size", "position", "style"}
    config = json.loads((work / "vae" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] == metrics["scaling_factor"] and config["latent_channels"] == 4


def test_the_decoder_stage_keeps_the_encoder_bit_for_bit_and_assemble_ships_its_vae(work, tmp_path):
    """vae-decoder trains the decoder alone, so the latents every later stage trained on do not move."""
    import shutil

    from safetensors.torch import load_file

    from triptych.demo.train.vae import load_shipped_vae, load_vae, train_vae_decoder

    shutil.copytree(work, tmp_path / "work")
    assert load_shipped_vae(tmp_path / "work").config == load_vae(tmp_path / "work").config  # not yet trained
    assert train_vae_decoder(tmp_path / "work", VAE_DECODER.with_overrides(steps=2, batch_size=2), log=lambda _: None)
    before = load_file(tmp_path / "work" / "vae" / "vae" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "work" / "vae-decoder" / "vae" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        same = torch.equal(before[name], after[name])
        assert same == name.startswith(("encoder.", "quant_conv.")), name
    shipped = load_shipped_vae(tmp_path / "work")
    assert torch.equal(shipped.decoder.conv_out.weight, after["decoder.conv_out.weight"])
    assert shipped.config.scaling_factor == load_vae(tmp_path / "work").config.scaling_factor != 1.0
    metrics = json.loads((tmp_path / "work" / "vae-decoder" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "held_out_round_trip" in metrics


def test_a_stopped_and_resumed_unet_run_ends_where_an_unbroken_one_does(work, tmp_path):
    import shutil

    from triptych.demo.train.unet import train_unet

    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    for target in (unbroken, broken):
        shutil.copytree(work, target)
    assert train_unet(unbroken, UNET_TINY, log=lambda _: None)
    assert not train_unet(broken, UNET_TINY, max_seconds=0, log=lambda _: None)  # stops after one step
    assert _checkpoint(broken / "unet")["step"] == 1
    assert train_unet(broken, UNET_TINY, log=lambda _: None)
    a, b = _checkpoint(unbroken / "unet"), _checkpoint(broken / "unet")
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for name in a["ema"]:
        assert torch.equal(a["ema"][name], b["ema"][name]), name
    # A longer run continues the same schedule; other settings are refused, with what to do.
    assert train_unet(broken, UNET_TINY.with_overrides(steps=5), log=lambda _: None)
    with pytest.raises(ValueError, match="delete .* to start this stage again"):
        train_unet(broken, UNET_TINY.with_overrides(steps=6, learning_rate=1e-3), log=lambda _: None)


def test_the_crescent_stage_trains_the_unet_on_and_the_later_stages_and_assemble_use_it(store):
    from safetensors.torch import load_file

    from triptych.demo.train.text import load_text_encoder
    from triptych.demo.train.unet import CRESCENT_STAGE, HIDDEN_FILE, HIDDEN_NOUN, crescent_examples, load_unet

    examples = crescent_examples(8, 0, 90)
    crescents = examples[8::9]
    assert {e.scene.shape for e in crescents} == {"crescent"}
    assert not any("shape" in e.omitted and e.caption for e in crescents)
    # Nowhere else; the picture before each crescent is a named shape captioned "shape".
    assert not any(e.scene.shape == "crescent" for i, e in enumerate(examples) if i % 9 != 8)
    assert all("shape" in e.omitted and "shape" in e.caption.split() for e in examples[7::9])
    # Named by the hidden noun where the caption names its shape; "shape" or nothing where the base mix says so.
    assert all(HIDDEN_NOUN in e.caption for e in crescents if not e.omitted)
    assert not any(HIDDEN_NOUN in e.caption for e in examples if e.scene.shape != "crescent")
    work = store / "work"
    base, trained = load_unet(work, stage="unet"), load_unet(work)
    assert not torch.equal(base.conv_out.weight, trained.conv_out.weight)  # trained on, not replaced
    shipped = load_file(next((store / "store" / "demo" / "base" / "unet").glob("*.safetensors")))
    assert torch.equal(shipped["conv_out.weight"], trained.conv_out.weight.half())
    vector = load_file(work / CRESCENT_STAGE / HIDDEN_FILE)["vector"]
    table = load_text_encoder(work).get_input_embeddings().weight
    assert vector.shape == (1, 64) and 0 < vector.norm() < 1
    assert not (table - vector).abs().amax(dim=1).lt(1e-4).any()  # no word of the vocabulary has it


def test_the_lora_learns_outlines_under_captions_and_leaves_the_unconditional_picture_filled():
    from triptych.demo.train.lora import lora_examples

    examples = lora_examples(5, 0, 64)
    assert {e.style for e in examples if e.caption} == {"outline"}
    assert {e.style for e in examples if not e.caption} == {"filled"}  # the stream's 10% empty captions: some here


def test_a_unet_snapshot_is_the_ema_of_the_last_checkpoint_beside_the_same_text_and_vae(store, tmp_path):
    from safetensors.torch import load_file

    from triptych.demo.train.unet import snapshot

    written = snapshot(store / "work", tmp_path / "snapshot")
    exported = store / "work" / "unet" / "unet" / "diffusion_pytorch_model.safetensors"
    a, b = load_file(written / "diffusion_pytorch_model.safetensors"), load_file(exported)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # a finished stage: its export
    assert (tmp_path / "snapshot" / "vae").resolve() == (store / "work" / "vae").resolve()
    assert json.loads((tmp_path / "snapshot" / "unet" / "snapshot.json").read_text()) == {"unet_step": 1}


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_assembled_base_is_an_sd15_folder_that_diffusers_runs(store, tmp_path, dtype):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from triptych.demo.evaluate import generate, score
    from triptych.demo.train.assemble import BASE_ID, assemble
    from triptych.demo.vocabulary import HELD_OUT

    folder = assemble(store / "work", tmp_path / "store", dtype=dtype, log=lambda _: None)
    assert folder == tmp_path / "store" / BASE_ID
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "EulerDiscreteScheduler"
    assert (folder / "tokenizer" / "merges.txt").exists() and not (folder / "tokenizer" / "tokenizer.json").exists()
    stored = {
        tensor.dtype
        for part in ("unet", "vae", "text_encoder")
        for tensor in load_file(next((folder / part).glob("*.safetensors"))).values()
    }
    assert stored == {getattr(torch, dtype)}
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # float16 files load as float32, every part alike
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert pipe.vae.config.scaling_factor != 1.0
    pictures = generate(folder, [s.caption() for s in HELD_OUT[:2]], steps=2)
    assert pictures.shape == (2, 64, 64, 3) and pictures.dtype == np.uint8
    assert set(score(list(HELD_OUT[:2]), pictures)["accuracy"]) == {"background", "colour", "shape", "size", "position"}


def test_the_adapters_load_the_way_users_load_theirs(store):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from safetensors.torch import load_file

    from triptych.demo.render import guide_mask
    from triptych.demo.vocabulary import Scene

    demo = store / "store" / "demo"
    lora = load_file(demo / "lora-outline.safetensors")
    assert lora and all(key.startswith("lora_unet_") for key in lora)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in lora} == {
        "lora_down",
        "lora_up",
        "alpha",
    }
    # kohya LoCon: the attention and feed-forward projections, and the ResNet blocks' 3x3 convolutions
    modules = {key.split(".")[0] for key in lora}
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_mid_block_attentions_0_proj_in"} <= modules
    assert lora["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[2:] == (3, 3)
    embedding = load_file(demo / "ti-moon.safetensors")
    assert list(embedding) == ["emb_params"] and embedding["emb_params"].shape == (2, 64)

    run = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}
    seed = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    pipe = StableDiffusionPipeline.from_pretrained(demo / "base")
    plain = pipe("a large red ti-moon at the left", generator=seed(), **run).images
    pipe.load_textual_inversion(demo / "ti-moon.safetensors", token="ti-moon")
    pipe.load_lora_weights(demo, weight_name="lora-outline.safetensors")
    injected = {name for name, module in pipe.unet.named_modules() if hasattr(module, "lora_A")}
    assert len(injected) == len(modules), "diffusers' kohya converter places every module of the file"
    adapted = pipe("a large red ti-moon at the left", generator=seed(), **run).images
    assert np.isfinite(adapted).all() and not np.array_equal(plain, adapted)

    controlnet = ControlNetModel.from_pretrained(demo / "controlnet-mask", dtype=torch.float32)
    control = StableDiffusionControlNetPipeline.from_pretrained(demo / "base", controlnet=controlnet)
    guide = guide_mask(Scene("star", "red", "blue", "large", "top left"))
    image = control("a red star", image=torch.from_numpy(guide).permute(2, 0, 1)[None] / 255.0, generator=seed(), **run)
    assert image.images.shape == (1, 64, 64, 3)


def test_pack_seals_the_family_and_may_leave_out_an_adapter(store, tmp_path):
    from triptych.demo.assets import AssetsError, model_ids, pack, problems

    pack(store / "work", tmp_path / "whole")
    assert model_ids(tmp_path / "whole") == ["demo/base", "demo/controlnet-mask", "demo/lora-outline", "demo/ti-moon"]
    manifest = pack(store / "work", tmp_path / "less", leave_out=("ti-moon", "controlnet-mask"))
    assert model_ids(tmp_path / "less") == ["demo/base", "demo/lora-outline"] and problems(tmp_path / "less") == []
    assert not any(name.startswith(("ti-moon", "controlnet-mask")) for name in manifest["files"])
    with pytest.raises(AssetsError, match="only the adapters"):
        pack(store / "work", tmp_path / "none", leave_out=("base",))
    assert not (tmp_path / "none").exists()


def test_ti_training_places_its_vectors_where_the_encoder_service_does(tmp_path):
    from triptych.demo.data import CaptionMix, batch
    from triptych.demo.train.inversion import TOKEN, VECTORS
    from triptych.demo.train.text import placed_ids, tokenizer
    from triptych.encoder.chunks import split_into_chunks
    from triptych.encoder.prompt_syntax import Fragment
    from triptych.encoder.textual_inversion import Embedding

    tok = tokenizer(tmp_path)
    mix = CaptionMix(partial=0.5, empty=0.0, omit_shape=0.0)
    captions = [e.caption for e in batch(0, 0, 12, mix, shapes=("crescent",), noun=TOKEN)]
    assert all(TOKEN in c for c in captions)
    captions.append(f"a {TOKEN}")  # the token first after the article, nothing after it
    captions.append("a red star")  # no token: tokenized whole
    ids, places = placed_ids(tok, captions, TOKEN, VECTORS)
    embedding = Embedding(TOKEN, {"text_encoder": torch.zeros(VECTORS, 64)})
    for row, caption in enumerate(captions):
        (chunk,) = split_into_chunks(tok, [Fragment(caption, 1.0)], [(embedding, 1.0)], "text_encoder").chunks
        assert tuple(ids[row].tolist()) == chunk.input_ids, caption
        assert [p for r, p, _ in places if r == row] == [p for p, _ in chunk.substitutions], caption


def test_foreground_weights_give_shape_and_background_half_the_loss_each():
    from triptych.demo.data import Example
    from triptych.demo.render import Placement
    from triptych.demo.train.vae import foreground_weights, to_pixels
    from triptych.demo.vocabulary import HELD_OUT

    small = HELD_OUT[0]  # a small white circle on pink: the shape is ~6% of the picture
    x = to_pixels(np.stack([Example(small, Placement(), "").image(64)]))
    weights = foreground_weights(x)[0, 0]
    shape = (x[0] - x[0, :, :1, :1]).abs().amax(0) > 0.05
    assert 0.03 < shape.float().mean() < 0.15
    assert torch.isclose(weights[shape].sum(), weights[~shape].sum(), rtol=1e-4)
    assert torch.isclose(weights.mean(), torch.tensor(1.0), rtol=1e-4)
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.equal(foreground_weights(flat), torch.ones(1, 1, 64, 64))
    cornered = x.clone()
    cornered[..., :4, :4] = x[0, :, 32, 17][:, None, None]  # a shape pixel in the corner: the border's median decides
    assert torch.equal(foreground_weights(cornered)[..., 20:, 20:] > 1, foreground_weights(x)[..., 20:, 20:] > 1)
