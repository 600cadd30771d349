"""Local training for one round: LoRA with AdamW, optionally DP-SGD (Opacus).

Under DP every step draws a Poisson sample of the node's conversations (each one
independently with probability q = batch-size / n), clips each conversation's
gradient to max-grad-norm, adds Gaussian noise of std noise_multiplier * max-grad-norm
and divides by the expected batch size B. One conversation is the unit of privacy.

The released step is exactly (sum of clipped per-conversation gradients + noise) / B,
however the sample is split into length micro-batches: each micro-batch's per-sample
gradients are clipped and summed as soon as it is done (memory stays flat), and the
noise and the division by B happen once per step (`ExactDPOptimizer`). Opacus' own
optimizer would divide by B times the number of backward passes, a number that
depends on the lengths of the conversations drawn.

A drawn conversation whose gradient is not finite (inf or NaN in any tensor) counts as a zero
gradient, before clipping: zero is within the clipping bound, so the guarantee is unchanged, and
one such conversation cannot turn the whole update into NaN (which would show it was drawn).

The Poisson sample and the noise come from two independent PCG64DXSM streams (128-bit
state) seeded with 256 bits from the OS, never from torch's CPU generator (which keeps
32 bits of a seed) and never from the run seed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer

from shared.adapter import get_arrays
from shared.config import RunConfig
from shared.dialogue import Encoded, collate
from shared.model import conversation_losses

log = logging.getLogger("fedchat.node")


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


def secure_seed() -> int:
    """256 bits from the OS for one round's DP randomness, unknown to anyone else."""
    return int.from_bytes(os.urandom(32), "little")


def dp_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """(sampling, noise): independent 128-bit-state streams from every bit of `seed`.

    Independent so the noise is not a function of which conversations were drawn."""
    sampling, noise = np.random.SeedSequence(seed).spawn(2)
    return np.random.Generator(np.random.PCG64DXSM(sampling)), np.random.Generator(np.random.PCG64DXSM(noise))


def poisson_batches(n: int, sample_rate: float, steps: int, rng: np.random.Generator):
    """DP: each conversation joins each step's batch independently with prob. sample_rate."""
    for _ in range(steps):
        yield np.flatnonzero(rng.random(n) < sample_rate).tolist()


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
                   dp_optimizer: ExactDPOptimizer | None = None) -> tuple[float, int]:
    """Forward and backward one (possibly empty) batch in length micro-batches.

    Plain training accumulates the gradient of the batch's mean loss in .grad. Under DP
    (`forward` is the GradSampleModule) each micro-batch's per-conversation gradients are
    clipped and summed into the optimizer at once, before the next micro-batch.
    Returns (token-weighted loss sum, labelled tokens).
    """
    loss_sum, tokens = 0.0, 0
    for chunk in length_chunks(idx, data, max_tokens):
        batch = collate([data[i] for i in chunk], pad_id, device)
        losses, counts = conversation_losses(forward, **batch)
        # Under DP Opacus undoes the mean: each grad_sample row is that conversation's own gradient.
        (losses.mean() if dp_optimizer else losses.sum() / len(idx)).backward()
        if dp_optimizer:
            dp_optimizer.clip_micro_batch()
        loss_sum += float((losses.detach() * counts).sum())
        tokens += int(counts.sum())
    return loss_sum, tokens


class ExactDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with a step that is (sum of clipped per-sample gradients + noise) / B
    whatever the micro-batching, and noise from a numpy stream of 128-bit state.

    `clip_micro_batch` after each backward pass clips and sums that pass's per-sample
    gradients (Opacus' own `clip_and_accumulate`, the per-sample norm taken over every
    trainable tensor) and drops them; `pre_step` adds the noise once and divides by the
    expected batch size once.
    """

    def __init__(self, optimizer, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int,
                 noise_rng: np.random.Generator) -> None:
        super().__init__(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, loss_reduction="mean")
        self.noise_rng = noise_rng
        self.non_finite_samples = 0  # conversations whose gradient was inf/NaN, counted as zero

    def clip_micro_batch(self) -> None:
        self.zero_non_finite_samples()
        self.clip_and_accumulate()
        for p in self.params:
            p.grad_sample = None

    def zero_non_finite_samples(self) -> None:
        """A conversation whose gradient holds inf or NaN in any tensor (a float16 overflow, a crafted global
        adapter) counts as a zero gradient: clipped, it would make the whole sum NaN and so reveal that it
        was drawn. Zero is within the clipping bound, so the step stays a sum of per-conversation vectors of
        norm at most max-grad-norm plus the same noise: the DP guarantee is unchanged. Counted in
        `non_finite_samples`, which stays on the node (its log)."""
        samples = [self._get_flat_grad_sample(p) for p in self.params]
        if not samples or len(samples[0]) == 0:
            return
        bad = torch.zeros(len(samples[0]), dtype=torch.bool, device=samples[0].device)
        for g in samples:
            bad |= ~torch.isfinite(g.reshape(len(g), -1)).all(dim=1).to(bad.device)
        if bad.any():
            self.non_finite_samples += int(bad.sum())
            for p, g in zip(self.params, samples):
                keep = ~bad.to(g.device).view(-1, *[1] * (g.dim() - 1))
                p.grad_sample = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            # Opacus' secure mode (Holohan et al., arXiv 2107.10138): the sum of 4 draws / 2 has the
            # same std and resists floating-point attacks; drawn in float64, then cast.
            noise = self.noise_rng.standard_normal((4, *p.summed_grad.shape)).sum(0) * (std / 2)
            p.grad = (p.summed_grad + torch.from_numpy(noise).to(p.summed_grad)).view_as(p)

    def pre_step(self, closure=None) -> bool:
        if any(getattr(p, "grad_sample", None) is not None for p in self.params):
            self.clip_micro_batch()  # a pass not yet clipped (the caller skipped clip_micro_batch)
        for p in self.params:
            if p.summed_grad is None:  # an empty Poisson sample still takes a (pure-noise) step
                p.summed_grad = torch.zeros_like(p)
        self.add_noise()
        for p in self.params:
            p.grad /= self.expected_batch_size
            p.summed_grad = None
        self._is_last_step_skipped = False
        return True


def make_private(model, optimizer, cfg: RunConfig, noise_multiplier: float, noise_rng: np.random.Generator):
    """Opacus DP-SGD around a model and its optimizer: per-sample gradients, each clipped to
    dp-max-grad-norm, Gaussian noise; returns (GradSampleModule, ExactDPOptimizer)."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    return gsm, ExactDPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
                                 expected_batch_size=cfg.batch_size, noise_rng=noise_rng)


def train_round(model, names: list[str], data: list[Encoded], cfg: RunConfig, *, pad_id: int,
                seed: int, noise_multiplier: float | None = None,
                on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the adapter in place for cfg.local_steps steps and return the update. AdamW starts from
    zero moments every round."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    received = get_arrays(model, names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)  # wrapped by Opacus under DP
    forward, gsm, dp_optimizer = model, None, None
    if noise_multiplier is not None:
        sampling, noise = dp_streams(seed)
        gsm, optimizer = make_private(model, optimizer, cfg, noise_multiplier, noise)
        forward, dp_optimizer = gsm, optimizer
        batches = poisson_batches(len(data), min(1.0, cfg.batch_size / len(data)), cfg.local_steps, sampling)
    else:  # reproducible from the run seed: nothing private is at stake
        batches = _uniform_batches(len(data), cfg.batch_size, cfg.local_steps, torch.Generator().manual_seed(seed))

    loss_sum, tokens, drawn = 0.0, 0, 0
    model.train()
    try:
        for step, idx in enumerate(batches, 1):
            step_loss, step_tokens = backward_batch(forward, data, idx, pad_id=pad_id, device=device,
                                                    max_tokens=cfg.micro_batch_tokens, dp_optimizer=dp_optimizer)
            loss_sum, tokens, drawn = loss_sum + step_loss, tokens + step_tokens, drawn + len(idx)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step(step, loss_sum / max(tokens, 1))
    finally:
        model.eval()
        if gsm is not None:
            gsm._close()  # remove Opacus hooks so the cached model is plain again
    if dp_optimizer is not None and dp_optimizer.non_finite_samples:
        log.warning("%d drawn conversation(s) had an inf/NaN gradient and counted as zero (kept on the node)",
                    dp_optimizer.non_finite_samples)
    delta = [new - old for new, old in zip(get_arrays(model, names), received)]
    return TrainResult(delta, loss_sum / max(tokens, 1), cfg.local_steps, drawn, time.perf_counter() - started)


def clipped_gradient_sum(model, names: list[str], data: list[Encoded], cfg: RunConfig, *, pad_id: int,
                         sampling: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Distributed DP's node step: the sum of the clipped per-conversation gradients of the exchanged tensors
    over one Poisson sample (rate batch-size / n), with no noise and no division: the secure sum adds the
    nodes' noise shares and the coordinator divides and steps. Returns (sum per tensor, conversations drawn)."""
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    by_name = dict(model.named_parameters())
    wanted = [by_name[n] for n in names]
    gsm, dp_optimizer = make_private(model, torch.optim.SGD(trainable, lr=0.0), cfg, 0.0, sampling)
    (idx,) = poisson_batches(len(data), min(1.0, cfg.batch_size / len(data)), 1, sampling)
    model.train()
    try:
        backward_batch(gsm, data, idx, pad_id=pad_id, device=device, max_tokens=cfg.micro_batch_tokens,
                       dp_optimizer=dp_optimizer)
        sums = [p.summed_grad if getattr(p, "summed_grad", None) is not None else torch.zeros_like(p)
                for p in wanted]
        result = [s.detach().to(torch.float64).cpu().numpy().reshape(p.shape) for s, p in zip(sums, wanted)]
    finally:
        model.eval()
        for p in trainable:
            p.grad, p.grad_sample, p.summed_grad = None, None, None
        gsm._close()
    if dp_optimizer.non_finite_samples:
        log.warning("%d drawn conversation(s) had an inf/NaN gradient and counted as zero (kept on the node)",
                    dp_optimizer.non_finite_samples)
    return result, len(idx)
