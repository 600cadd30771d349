"""Local training for one round: LoRA with AdamW, optionally DP-SGD (Opacus).

Under DP every step draws a Poisson sample of the node's conversations (each one
independently with probability q = batch-size / n), clips each conversation's
gradient to max-grad-norm, adds Gaussian noise of std noise_multiplier * max-grad-norm
and divides by the expected batch size. One conversation is the unit of privacy.
The sampling and the noise come from a fresh OS-random seed, never from the run seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shared.adapter import get_arrays
from shared.config import RunConfig
from shared.dialogue import Encoded, collate
from shared.model import conversation_losses
from shared.seeds import derive_seed

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    delta: list[np.ndarray]  # trained minus received, for the exchanged tensors
    train_loss: float  # token-weighted mean loss over the conversations drawn (as held-out loss is)
    steps: int
    conversations_drawn: int
    seconds: float


def _uniform_batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    """Non-private: shuffled passes over the data, fixed batch size."""
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def _poisson_batches(n: int, sample_rate: float, steps: int, gen: torch.Generator):
    """DP: each conversation joins each step's batch independently with prob. sample_rate."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(n, generator=gen) < sample_rate).flatten().tolist()


def length_chunks(idx: list[int], data: list[Encoded], max_tokens: int) -> list[list[int]]:
    """Split a batch into micro-batches of similar length so little compute goes to padding.

    Sorted longest first; a new micro-batch starts when the next conversation is under
    half as long as the micro-batch's longest, or when padded tokens would pass max_tokens.
    Gradients are accumulated over the micro-batches, so the step is the same.
    """
    chunks: list[list[int]] = []
    longest = 0
    for i in sorted(idx, key=lambda i: -len(data[i].input_ids)):
        n = len(data[i].input_ids)
        if not chunks or n * 2 < longest or (len(chunks[-1]) + 1) * longest > max_tokens:
            chunks.append([])
            longest = n
        chunks[-1].append(i)
    return chunks


def backward_batch(forward, data: list[Encoded], idx: list[int], *, pad_id: int, device, max_tokens: int,
                   dp: bool) -> tuple[float, int]:
    """Forward and backward one (possibly empty) batch in length micro-batches.

    Plain training accumulates the gradient of the batch's mean loss in .grad; under
    DP Opacus accumulates per-conversation gradients in .grad_sample (it rescales each
    micro-batch mean and later divides by the expected batch size itself).
    Returns (token-weighted loss sum, labelled tokens).
    """
    loss_sum, tokens = 0.0, 0
    for chunk in length_chunks(idx, data, max_tokens):
        batch = collate([data[i] for i in chunk], pad_id, device)
        losses, counts = conversation_losses(forward, **batch)
        (losses.mean() if dp else losses.sum() / len(idx)).backward()
        loss_sum += float((losses.detach() * counts).sum())
        tokens += int(counts.sum())
    return loss_sum, tokens


def make_private(model, optimizer, cfg: RunConfig, noise_multiplier: float, generator=None):
    """Opacus DP-SGD around a model and its optimizer: per-sample gradients, each clipped to
    dp-max-grad-norm, Gaussian noise; returns (GradSampleModule, DPOptimizer)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return gsm, DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
                            expected_batch_size=cfg.batch_size, loss_reduction="mean", generator=generator,
                            secure_mode=True)  # noise robust to floating-point attacks


def train_round(model, names: list[str], data: list[Encoded], cfg: RunConfig, *, pad_id: int,
                seed: int, noise_multiplier: float | None = None,
                on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the adapter in place for cfg.local_steps steps and return the update."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    received = get_arrays(model, names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    dp = noise_multiplier is not None
    forward, gsm = model, None
    if dp:
        # Noise from its own stream: the same seed for the batch sample and the noise would make
        # the noise a function of which conversations were drawn.
        noise_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "noise"))
        gsm, optimizer = make_private(model, optimizer, cfg, noise_multiplier, noise_gen)
        forward = gsm
        batches = _poisson_batches(len(data), min(1.0, cfg.batch_size / len(data)), cfg.local_steps, gen)
    else:
        batches = _uniform_batches(len(data), cfg.batch_size, cfg.local_steps, gen)

    loss_sum, tokens, drawn = 0.0, 0, 0
    model.train()
    try:
        for step, idx in enumerate(batches, 1):
            step_loss, step_tokens = backward_batch(forward, data, idx, pad_id=pad_id, device=device,
                                                    max_tokens=cfg.micro_batch_tokens, dp=dp)
            loss_sum, tokens, drawn = loss_sum + step_loss, tokens + step_tokens, drawn + len(idx)
            if not idx:
                # an empty Poisson sample still takes a (pure-noise) step
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step(step, loss_sum / max(tokens, 1))
    finally:
        model.eval()
        if gsm is not None:
            gsm._close()  # remove Opacus hooks so the cached model is plain again
    delta = [new - old for new, old in zip(get_arrays(model, names), received)]
    return TrainResult(delta, loss_sum / max(tokens, 1), cfg.local_steps, drawn,
                       time.perf_counter() - started)
