"""The demo family's foundations (issue #20): procedural pictures, their captions, a pixel classifier, training.

A model family that draws what it is told must be trained on something: here flat coloured shapes, drawn on the fly
and captioned exactly ("a large red star at the top left on a blue background"), so that every feature (CFG, negative
prompt, clip skip, schedulers, LoRA, textual inversion, ControlNet) has a visible effect that a test can read back.

- ``vocabulary``: the words (shapes, colours, sizes, positions), a ``Scene`` and its caption, the held-out scenes.
- ``render``: a ``Scene`` to pixels (filled or outlined) and to a white-on-black mask; numpy + Pillow, no torch.
- ``data``: the deterministic training stream: example ``i`` of seed ``s`` is always the same picture and caption.
- ``classify``: reads a picture back into a ``Reading`` (background, colour, shape, size, position, style).
- ``train``: the training stages (text encoder, VAE, UNet) and the assembly of ``demo/base`` (torch).

docs/demo-model.md is the model card: the decisions, the budgets and the commands.
"""
