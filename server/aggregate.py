"""Aggregation maths on plain arrays.

Nodes send updates (trained minus received). The new global adapter is the old one
plus the weighted average of the updates, which equals weighted FedAvg of the
weights. With FFA-LoRA only B travels and A is identical everywhere, so the average
of the nodes' B·A products is exactly (average B)·A.
"""

from __future__ import annotations

import numpy as np


def weighted_average(updates: list[list[np.ndarray]], weights: list[float]) -> list[np.ndarray]:
    """sum_i w_i * u_i / sum_i w_i, tensor by tensor (float64 accumulation)."""
    if not updates or len(updates) != len(weights):
        raise ValueError("need one weight per update and at least one update")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    out = []
    for tensors in zip(*updates):
        acc = np.zeros(tensors[0].shape, dtype=np.float64)
        for w, t in zip(weights, tensors):
            acc += w * t.astype(np.float64)
        out.append((acc / total).astype(np.float32))
    return out


def apply_update(global_arrays: list[np.ndarray], update: list[np.ndarray]) -> list[np.ndarray]:
    return [(g + u).astype(np.float32) for g, u in zip(global_arrays, update)]


def update_problem(update: list[np.ndarray], shapes: list[tuple[int, ...]], bound: float) -> str | None:
    """Why an update must be rejected (wrong shape, NaN, beyond what training can produce), or None."""
    if len(update) != len(shapes):
        return f"{len(update)} tensors instead of {len(shapes)}"
    for i, (u, shape) in enumerate(zip(update, shapes)):
        if tuple(u.shape) != tuple(shape):
            return f"tensor {i} has shape {tuple(u.shape)} instead of {tuple(shape)}"
        if not np.all(np.isfinite(u)):
            return f"tensor {i} has NaN or infinite values"
        peak = float(np.abs(u).max()) if u.size else 0.0
        if peak > bound * 1.01:
            return f"tensor {i} moves a value by {peak:.3g}, beyond the {bound:.3g} that local-steps AdamW steps can"
    return None


class ServerAdam:
    """Adam on the coordinator, for distributed DP: each round's unmasked, noised mean gradient in, the
    update to the global adapter out (a post-processing of the DP sum). Its moments go into each checkpoint
    (`state`), and a resumed run takes them up again (`load`)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None
        self.t = 0

    def state(self) -> dict[str, np.ndarray]:
        """The moments and step count (empty before the first step)."""
        return {} if self.m is None else {"m": self.m, "v": self.v, "t": np.array(self.t)}

    def load(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self.m, self.v, self.t = np.array(state["m"]), np.array(state["v"]), int(state["t"])

    def step(self, grad: np.ndarray) -> np.ndarray:
        b1, b2 = self.betas
        if self.m is None or self.m.shape != grad.shape:
            self.m, self.v, self.t = np.zeros_like(grad), np.zeros_like(grad), 0
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad**2
        m_hat, v_hat = self.m / (1 - b1**self.t), self.v / (1 - b2**self.t)
        return -self.lr * m_hat / (np.sqrt(v_hat) + self.eps)
