"""Per-request sampling options and the batched next-token sampler.

`SamplingParams` holds what one request asks for (length, temperature, top-k/top-p, seed,
stop conditions). `Sampler.sample` turns one step's last-position logits into one token per
row: greedy rows take `torch.argmax` (first index on ties, as transformers' greedy search
does); the other rows are temperature-scaled, filtered by top-k then top-p, and drawn with
the exponential race `argmax(probs / q)`, `q ~ Exp(1)`, which is an exact categorical draw.
A row with its own `torch.Generator` draws its noise only from that generator, so a seeded
request reproduces the same tokens whatever else shares its batch.

This module does not apply repetition penalties or logit biases, does not return
log-probabilities, and does not detect stop strings or stop tokens (see
`engine/detokenizer.py` and the scheduler for those).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options of one request.

    Attributes:
        max_tokens: Most tokens to generate (>= 1).
        temperature: Softmax temperature; 0 means greedy (argmax), > 0 samples.
        top_k: Keep only the `top_k` most likely tokens before sampling; 0 turns it off.
        top_p: Nucleus sampling: keep the smallest set of most likely tokens whose total
            probability is >= `top_p` (the most likely token is always kept); 1.0 turns it off.
            Applied after temperature and top-k.
        seed: Seed of this request's own generator; None draws from torch's global RNG.
        stop: Stop strings. Generation ends when one appears in the generated text, which is
            cut before it (see `include_stop_str_in_output`). A single string or a list is
            accepted and stored as a tuple.
        stop_token_ids: Token ids that end generation (besides EOS unless `ignore_eos`).
        ignore_eos: Keep generating past the end-of-sequence token.
        include_stop_str_in_output: Keep the matched stop string at the end of the output.

    Example:
        >>> params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop="\\n\\n")
        >>> params.stop, params.is_greedy
        (('\\n\\n',), False)
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif not isinstance(stop, Sequence):
            raise ValueError(
                f"stop={stop!r} is not a string or a sequence of strings; pass e.g. "
                "stop=('\\n\\n',) or stop='</answer>'"
            )
        stop = tuple(stop)
        for s in stop:
            if not isinstance(s, str):
                raise ValueError(
                    f"stop string {s!r} is a {type(s).__name__}, not a str; pass stop strings "
                    "as text, and token ids as stop_token_ids"
                )
            if not s:
                raise ValueError(
                    f"stop={stop!r} contains an empty string, which would match at once; remove it"
                )
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"temperature={self.temperature} must be a finite number >= 0 "
                "(0 for greedy decoding)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(
                f"top_p={self.top_p} must be in (0, 1]; use 1.0 to turn nucleus sampling off"
            )
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0; use 0 to turn top-k off")

    @property
    def is_greedy(self) -> bool:
        """Whether this request decodes greedily (temperature 0)."""
        return self.temperature == 0.0


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a `torch.Generator` on `device` seeded with `seed`, or None when `seed` is None.

    The generator must live on the device of the logits passed to `Sampler.sample`.

    Example:
        >>> g = make_generator(1234)
        >>> make_generator(None) is None
        True
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks one next token per row from a step's logits.

    Stateless: per-request randomness lives in the generators the caller passes in (one per
    request, created once with `make_generator(params.seed)` and kept for its lifetime).
    """

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token per row.

        Args:
            logits: [batch, vocab] float logits of the last position of each request.
            params: `batch` sampling parameters, one per row.
            generators: `batch` generators (on `logits.device`) or None, one per row. A row
                with a generator draws only from it, so its tokens do not depend on the other
                rows; a row with None draws from torch's global RNG. Greedy rows draw nothing.

        Returns:
            [batch] int64 token ids on `logits.device`.

        Example:
            >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
            >>> Sampler().sample(logits, [SamplingParams()] * 2, [None, None]).tolist()
            [1, 0]
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"got {len(params)} params and {len(generators)} generators for {batch} rows; "
                "pass one of each per row of logits"
            )

        # Greedy for every row (cheap); sampled rows are overwritten below.
        next_ids = torch.argmax(logits, dim=-1)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if not rows:
            return next_ids

        device = logits.device
        row_index = torch.tensor(rows, device=device)
        row_logits = logits[row_index].float()  # [num_rows, vocab]
        temperature = torch.tensor(
            [params[i].temperature for i in rows], dtype=torch.float32, device=device
        )
        top_k = [params[i].top_k for i in rows]
        top_p = [params[i].top_p for i in rows]
        probs = _filtered_probs(row_logits, temperature, top_k, top_p)

        # Exponential race: argmax(p / q) with q ~ Exp(1) picks token i with probability p_i.
        q = torch.empty_like(probs)
        unseeded = []
        for j, i in enumerate(rows):
            generator = generators[i]
            if generator is None:
                unseeded.append(j)
            else:
                q[j].exponential_(generator=generator)
        if unseeded:
            q[torch.tensor(unseeded, device=device)] = torch.empty(
                len(unseeded), vocab, dtype=probs.dtype, device=device
            ).exponential_()
        # q == 0 would turn a filtered-out token (p == 0) into 0/0 = nan, which argmax picks.
        q.clamp_(min=torch.finfo(q.dtype).tiny)
        next_ids[row_index] = torch.argmax(probs / q, dim=-1)
        return next_ids


def _filtered_probs(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p; filtered tokens get exactly 0.

    logits: [rows, vocab] float32; temperature: [rows] > 0; top_k/top_p: per row.
    """
    rows, vocab = logits.shape
    scaled = logits / temperature[:, None]
    use_top_k = any(0 < k < vocab for k in top_k)
    use_top_p = any(p < 1.0 for p in top_p)
    if not (use_top_k or use_top_p):
        return torch.softmax(scaled, dim=-1)

    # Sort the unscaled logits so rank 0 is exactly torch.argmax (stable: first index on ties);
    # dividing by a temperature could round distinct logits into ties.
    _, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_scaled = torch.gather(scaled, -1, order)  # [rows, vocab], non-increasing
    ranks = torch.arange(vocab, device=logits.device)
    k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=logits.device)
    remove = ranks[None, :] >= k[:, None]
    if use_top_p:
        probs = torch.softmax(sorted_scaled.masked_fill(remove, -math.inf), dim=-1)
        # Keep rank r while the probability of ranks < r is below top_p; 1.0 rows keep all
        # (a rounded cumulative sum could otherwise reach 1 before the tail).
        p = torch.tensor([p if p < 1.0 else 2.0 for p in top_p], device=logits.device)
        remove |= (torch.cumsum(probs, dim=-1) - probs) >= p[:, None]
    remove[:, 0] = False
    remove = torch.zeros_like(remove).scatter_(-1, order, remove)
    return torch.softmax(scaled.masked_fill(remove, -math.inf), dim=-1)
