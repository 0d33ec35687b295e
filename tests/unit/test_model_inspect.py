"""`triptych models inspect`: a model's family, which role loads which part, and sizes, from headers only."""

from __future__ import annotations

from triptych.cli import main


def test_inspect_names_each_part_and_the_role_that_loads_it(model_root, capsys):
    assert main(["models", "inspect", "tiny/flux", "--root", str(model_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny/flux: flux pipeline") and "(FluxPipeline)" in lines[0]
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert rows["transformer"][0] == "denoiser" and rows["transformer"][2] == "FluxTransformer2DModel"
    assert rows["text_encoder_2"][:3] == ["encoder", "text_encoder_2", "T5EncoderModel"]
    assert rows["vae"][0] == "decoder"
    assert int(rows["transformer"][3].replace(",", "")) > 0 and rows["transformer"][4] == "F32"


def test_inspect_describes_files_and_refuses_unknown_ids(model_root, capsys):
    assert main(["models", "inspect", "tiny/lora-flux", "--root", str(model_root)]) == 0
    assert "LoRA" in capsys.readouterr().out
    assert main(["models", "inspect", "tiny/ti-sd15", "--root", str(model_root)]) == 0
    assert "textual-inversion embedding" in capsys.readouterr().out
    assert main(["models", "inspect", "tiny/nothing", "--root", str(model_root)]) == 1
    assert "tiny/nothing" in capsys.readouterr().err
    assert main(["models", "inspect", "--root", str(model_root)]) == 2
