"""The CPU random generator a request's sampling draws from (diffusers' randn_tensor with a CPU generator gives the
same numbers on every device), seeded from the request or continued from a state an earlier call returned."""

from __future__ import annotations

import secrets

import torch

from triptych.serving.errors import InvalidArgument


def cpu_generator(seed: int | None, state: bytes, field: str = "generator_state") -> tuple[torch.Generator, int]:
    """(generator, seed to report): seeded with `seed` (unset: a random one), then set to `state` when one is
    given. A continued state without a seed draws from that state alone, and there is no seed to report (0)."""
    random_seed = 0 if state else secrets.randbits(64)
    seed = seed if seed is not None else random_seed
    generator = torch.Generator("cpu").manual_seed(seed)
    if state:
        try:
            generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
        except RuntimeError as exc:
            raise InvalidArgument.one(field, f"not a CPU generator state ({exc})") from exc
    return generator, seed


def generator_state(generator: torch.Generator) -> bytes:
    """The generator's state as the wire carries it (`generator_state` fields)."""
    return generator.get_state().numpy().tobytes()
