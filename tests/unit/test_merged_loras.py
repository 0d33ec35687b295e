"""MergedLoras keeps the UNet restorable whatever happens mid-switch: a merge that fails half-way leaves every
changed weight with its original copy, and the next request (here: no LoRA) gets the base weights back exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft.tuners.lora import Linear as LoraLinear

from triptych.families.sd1 import FAMILY as SD1
from triptych.model_store import ModelStore
from triptych.runtime.lora import MergedLoras

KOHYA, PEFT = "tiny/lora-sd15-kohya", "tiny/lora-sd15-peft"


def test_a_merge_that_fails_half_way_is_undone_by_the_next_switch(model_root, monkeypatch):
    unet = UNet2DConditionModel.from_pretrained(model_root / "tiny/sd15/unet").eval()
    original = {k: v.clone() for k, v in unet.state_dict().items()}
    loras = MergedLoras(ModelStore(model_root), 1 << 30)
    loras.activate(SD1, {"unet": unet}, ((KOHYA, 0.7),))
    loras.activate(SD1, {"unet": unet}, ((PEFT, 1.0),))  # both files loaded, PEFT merged

    merge, calls = LoraLinear.merge, []

    def failing_merge(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return merge(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "merge", failing_merge)
    with pytest.raises(RuntimeError):
        loras.activate(SD1, {"unet": unet}, ((KOHYA, 0.5), (PEFT, 0.8)))
    monkeypatch.undo()
    assert not all(torch.equal(v, original[k]) for k, v in unet.state_dict().items()), "it failed half-way"

    loras.activate(SD1, {"unet": unet}, ())
    assert all(torch.equal(v, original[k]) for k, v in unet.state_dict().items())
