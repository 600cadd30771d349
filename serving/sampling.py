"""Per-request sampling inside transformers' continuous batching: the one piece it lacks.

transformers 5.23's continuous batching picks the tokens of a whole batch one way: `do_sample` is a
single flag of the manager, and its random draws come from one process-wide torch generator. Its
per-request logits processors (temperature, top_p) only reshape the scores before that shared draw.
A server mixes greedy requests (temperature 0) with sampled ones in one batch, and a request with a
`seed` must get the same answer whoever else is in the batch. So the manager runs greedy (argmax)
for every row, and `RequestSampler`, a continuous-batching logits processor, handles the sampled
rows: it draws the token from that request's own generator and returns a row whose only finite score
is that token, which the manager's argmax then picks. A greedy row passes through untouched.

The generator is numpy's PCG64 seeded with the request's whole 64-bit seed (torch's CPU generator
keeps 32 bits of a seed: two seeds that differ above bit 32 would draw the same answer).
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.logits_process import LogitsProcessorList


def request_rng(seed: int | None) -> np.random.Generator:
    """A request's generator: from its seed (any signed 64-bit integer), else from the OS."""
    return np.random.default_rng(None if seed is None else seed % 2**64)


def sample(logits: torch.Tensor, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token id drawn from softmax(logits / temperature), restricted to the top_p nucleus."""
    # shifted so the largest is 0: a tiny temperature then gives 0 and -inf (a NaN only where it
    # underflows to 0 and 0/0 meets the largest, which is then weight 1), never inf - inf
    scaled = torch.nan_to_num((logits.float() - logits.max()) / temperature, nan=0.0)
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), descending=True, stable=True)
    if top_p < 1.0:
        probs[torch.cumsum(probs, dim=-1) - probs > top_p] = 0.0  # keeps at least the first
    cdf = np.cumsum(probs.double().numpy())
    k = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(order[min(k, len(cdf) - 1)])


class RequestSampler(ContinuousBatchingLogitsProcessor):
    """Samples the rows of requests with a temperature above 0 (see the module's note); a request's
    settings travel in its `logit_processor_kwargs`: temperature, top_p and rng (its generator)."""

    supported_kwargs = {"temperature": float, "top_p": float, "rng": np.random.Generator}
    ignored_kwargs = ()

    def __init__(self) -> None:
        self._rows: list[dict] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.zero_()  # no tensor argument: the settings are read from the requests

    def prepare_tensor_args(self, requests_with_new_token) -> torch.Tensor:
        # Called for each batch before its forward pass, with the requests in the order of the
        # score rows; the manager runs synchronously (use_async_batching=False), so the next
        # batch is prepared only after this one's scores went through __call__.
        self._rows = [request.state.logit_processor_kwargs for request in requests_with_new_token]
        return torch.zeros(len(self._rows), dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        for row, settings in enumerate(self._rows[:scores.size(0)]):
            temperature = settings.get("temperature", 0.0)
            if temperature > 0:
                token = sample(scores[row], temperature, settings.get("top_p", 1.0), settings["rng"])
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


def per_request_sampling() -> ContinuousBatchingLogitsProcessorList:
    """The logits processing a manager runs with: RequestSampler alone."""
    processors = ContinuousBatchingLogitsProcessorList(LogitsProcessorList([RequestSampler()]))
    processors.tensors_required = 1  # the manager sizes one row of tensor arguments per processor that asks
    return processors
