"""Training the demo family (issue #20): one module per stage, run by ``python -m triptych.demo.train`` or
``scripts/train-demo``.

Order: ``text`` (the CLIP text encoder learns to say what a caption names; minutes), ``vae`` (the autoencoder learns
flat shapes; independent of ``text``), ``unet`` (DDPM on the VAE's latents, conditioned on the frozen text encoder),
then ``assemble`` writes ``demo/base`` into a model store and ``evaluate`` measures it on the held-out captions.

Every stage is deterministic and resumable: its state lives in ``WORK/<stage>/checkpoint.pt``, written every
``checkpoint_every`` steps and when the stage stops; the batch and the noise of step k are drawn from ``(seed, k)``,
so a run stopped and resumed ends in exactly the weights of a run that never stopped (same torch build and threads).
"""
