"""Where a service's networks run: torch device, dtype and memory format, from Settings (device, dtype,
channels_last). On the default (cpu, float32) every conversion here is a no-op, so results stay bit-identical
to diffusers' fp32 pipelines. (Whether networks are compiled is each engine's own setting; compiled_graphs here
counts what torch.compile built in the process.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from triptych.serving.settings import ConfigurationError, Settings

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    channels_last: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement:
        try:
            device = torch.device(settings.device)
        except RuntimeError as exc:
            raise ConfigurationError(f"TRIPTYCH_DEVICE: {exc}") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigurationError(f"TRIPTYCH_DEVICE={settings.device}, but torch sees no CUDA device")
        return cls(device, DTYPES[settings.dtype], settings.channels_last)

    def module(self, module: torch.nn.Module, *, convolutional: bool = True) -> torch.nn.Module:
        """Moves a freshly loaded network to the device and dtype (and channels-last, for UNets/ControlNets)."""
        if next(module.parameters()).dtype != self.dtype:
            module = module.to(dtype=self.dtype)
        module = module.to(device=self.device)
        if self.channels_last and convolutional:
            module = module.to(memory_format=torch.channels_last)
        return module

    def tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.dtype)


CPU_FLOAT32 = Placement(torch.device("cpu"), torch.float32)


def compile_in_place(module: torch.nn.Module, mode: str) -> None:
    """torch.compile `module` in place (it stays the object LoRAs patch and caches hold). Its parameters are graph
    inputs, not constants, so weights changed in place (merged LoRAs) are read as they are. A network that fails
    to compile (no C compiler on the host, an inductor bug) runs eager, with dynamo's warning in the log: the
    service keeps serving, and compiled_graphs shows what was built."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    module.compile(mode=mode)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (each first use of a shape, and every recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
