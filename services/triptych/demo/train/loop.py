"""The training loop every stage shares: AdamW with warmup, gradient clipping, EMA, checkpoints, resuming, timing.

A stage hands ``Trainer.run`` a function from (step, generator) to a loss; the generator is seeded from
(seed, step) alone, so nothing random has to be saved for a resumed run to draw what an unbroken one would.
Checkpoints are written atomically (temporary file, then rename) and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .configs import StageSettings

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch generator for one training step: a pure function of (seed, step)."""
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Ema:
    """Exponential moving average of a model's parameters (decay warmed up as (1 + step) / (10 + step))."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model`` (what a stage exports)."""
        for name, p in model.named_parameters():
            if name in self.shadow:
                p.copy_(self.shadow[name])


def load_part(work: Path, stage: str, part: str, model_class, dtype: torch.dtype = torch.float32):
    """A completed stage's exported ``part``, frozen, in ``dtype``."""
    path = Path(work) / stage / part
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run the {stage} stage first (python -m triptych.demo.train {stage})"
        )
    return model_class.from_pretrained(path, dtype=dtype).eval().requires_grad_(False)


def load_latest_part(work: Path, stages: tuple[str, ...], part: str, model_class, dtype: torch.dtype = torch.float32):
    """``part`` of the last of ``stages`` that has completed, each stage training on the one before it's (as
    ``vae-decoder`` trains on ``vae``): what ``assemble`` ships. None completed: the first's (its error says which
    stage to run)."""
    done = [stage for stage in stages if (Path(work) / stage / part).exists()]
    return load_part(work, done[-1] if done else stages[0], part, model_class, dtype)


class Trainer:
    """Trains ``model``'s trainable parameters for ``settings.steps`` steps, resuming from ``work/<stage>`` if a
    checkpoint is there."""

    def __init__(
        self,
        work: Path,
        stage: str,
        settings: StageSettings,
        model: nn.Module,
        log: Callable[[str], None] = print,
        log_every: int = 25,
    ):
        self.directory = Path(work) / stage
        self.directory.mkdir(parents=True, exist_ok=True)
        self.stage, self.settings, self.model, self.log, self.log_every = stage, settings, model, log, log_every
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        self.ema = Ema(model, settings.ema_decay) if settings.ema_decay else None
        self.step = 0
        self.wall_seconds = self.cpu_seconds = 0.0
        self._resume()

    @property
    def finished(self) -> bool:
        return self.step >= self.settings.steps

    def _resume(self) -> None:
        path = self.directory / CHECKPOINT
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["settings"] != self.settings.fingerprint():
            raise ValueError(
                f"{path} was written with settings {state['settings']}, not {self.settings.fingerprint()}: "
                f"resume with the same settings, or delete {self.directory} to start this stage again"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            device = self.parameters[0].device
            self.ema.shadow = {name: tensor.to(device) for name, tensor in state["ema"].items()}
        self.step = state["step"]
        self.wall_seconds, self.cpu_seconds = state["wall_seconds"], state["cpu_seconds"]
        self.log(f"{self.stage}: resumed at step {self.step} of {self.settings.steps}")

    def save(self) -> None:
        """Write the checkpoint atomically."""
        state = {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.shadow if self.ema is not None else None,
            "settings": self.settings.fingerprint(),
            "wall_seconds": self.wall_seconds,
            "cpu_seconds": self.cpu_seconds,
        }
        tmp = self.directory / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.directory / CHECKPOINT)

    def export(self, network: nn.Module, part: str, metrics: dict) -> Path:
        """Write ``network`` (its EMA weights where the stage keeps an EMA) as ``<stage>/<part>``, a diffusers or
        transformers folder, and the stage's metrics."""
        if self.ema is not None:
            self.ema.copy_to(network)
        network.save_pretrained(self.directory / part, safe_serialization=True)
        self.write_metrics(metrics)
        return self.directory / part

    def write_metrics(self, metrics: dict) -> None:
        """``<stage>/metrics.json``: ``metrics`` plus the steps and the time spent."""
        metrics = {**metrics, "steps": self.step, "wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_seconds}
        (self.directory / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")

    def _learning_rate(self, step: int) -> float:
        """Linear warmup, then constant: a run extended with more steps continues the same schedule."""
        return self.settings.learning_rate * min(1.0, (step + 1) / max(1, self.settings.warmup_steps))

    def run(self, loss_fn: Callable[[int, torch.Generator], torch.Tensor], max_seconds: float | None = None) -> bool:
        """Train until ``settings.steps`` (True) or until ``max_seconds`` have passed (False; checkpointed)."""
        self.model.train()
        started = time.monotonic()
        window = [time.monotonic(), time.process_time(), self.step, 0.0]  # wall, cpu, step, summed loss
        while not self.finished:
            wall0, cpu0 = time.monotonic(), time.process_time()
            for group in self.optimizer.param_groups:
                group["lr"] = self._learning_rate(self.step)
            loss = loss_fn(self.step, step_generator(self.settings.seed, self.step))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{self.stage}: loss is {loss.item()} at step {self.step}; lower the rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.settings.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.parameters, self.settings.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, self.step)
            self.step += 1
            self.wall_seconds += time.monotonic() - wall0
            self.cpu_seconds += time.process_time() - cpu0
            window[3] += loss.item()
            if self.step % self.log_every == 0 or self.finished:
                self._report(window)
                window = [time.monotonic(), time.process_time(), self.step, 0.0]
            out_of_time = max_seconds is not None and time.monotonic() - started >= max_seconds
            if self.step % self.settings.checkpoint_every == 0 or self.finished or out_of_time:
                self.save()
            if out_of_time and not self.finished:
                self.log(f"{self.stage}: stopped at step {self.step} after {max_seconds:.0f} s; run again to resume")
                return False
        self.model.eval()
        return True

    def _report(self, window: list) -> None:
        wall0, cpu0, step0, loss_sum = window
        steps = self.step - step0
        wall, cpu = (time.monotonic() - wall0) / steps, (time.process_time() - cpu0) / steps
        remaining = (self.settings.steps - self.step) * wall
        record = {
            "step": self.step,
            "loss": loss_sum / steps,
            "wall_s_per_step": wall,
            "cpu_s_per_step": cpu,
            "threads": torch.get_num_threads(),
        }
        with open(self.directory / LOG, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        eta = f"{math.floor(remaining / 3600)}h{math.floor(remaining % 3600 / 60):02d}m"
        self.log(
            f"{self.stage} {self.step}/{self.settings.steps} loss {record['loss']:.4f} | {1 / wall:.2f} steps/s, "
            f"{cpu:.2f} cpu-s/step on {record['threads']} threads | eta {eta}"
        )
