"""`python -m triptych.demo.readback`, what scripts/quickstart prints: the classifier's reading in caption words, and
each part against the caption asked."""

from __future__ import annotations

from PIL import Image

from triptych.demo.readback import main, scene_of
from triptych.demo.render import render
from triptych.demo.vocabulary import Scene

STAR = Scene("star", "red", "blue", "large", "top left")


def test_a_full_caption_names_its_scene_and_anything_else_none():
    assert scene_of("a large red star at the top left on a blue background") == STAR
    assert scene_of("  A large red star at the top left  on a blue background") == STAR
    assert scene_of("a red star") is None


def test_readback_prints_the_reading_and_each_part(tmp_path, capsys):
    picture = tmp_path / "star.png"
    Image.fromarray(render(STAR)).save(picture)
    assert main([str(picture), "a small red star at the top left on a blue background"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("as: a large red star at the top left on a blue background")
    assert second == "against what was asked: size MISSED, colour ok, shape ok, position ok, background ok"
    assert main([str(picture), "a fox"]) == 0
    assert "not a full demo caption" in capsys.readouterr().out
