"""The batched next-token sampler: one step's logits in, one token per row out.

`Sampler.sample_step` turns one step's last-position logits into one token per row, in this
order per row:

1. penalties on the logits: repetition (prompt and output tokens), then frequency and
   presence (output tokens only); while fewer than `min_tokens` tokens were generated, EOS and
   `stop_token_ids` are masked to -inf;
2. constrained rows (a `ConstraintState` passed for the row): every token the constraint does
   not allow next is masked to -inf, for all constrained rows with one bitmask computed in
   one call and one `masked_fill`;
3. greedy rows (temperature < `SAMPLING_EPS`) take `torch.argmax` (first index on ties, as
   transformers' greedy search does), so penalties and masks apply to greedy rows too;
4. sampled rows are divided by their temperature, filtered by top-k, top-p, then min-p, and
   drawn with the exponential race `argmax(probs / q)`, `q ~ Exp(1)`, which is an exact
   categorical draw. A row with its own `torch.Generator` draws its noise only from that
   generator, so a seeded request reproduces the same tokens whatever else shares its batch.

Log-probabilities (`SamplingParams.logprobs`) are `log_softmax` of the model's raw logits,
before penalties, masks, temperature and filters (vLLM's default), with the sampled token's
rank.

This module does not detect stop strings or end requests at stop tokens (the engine and
`engine/detokenizer.py` do), does not apply logit biases, does not advance constraint states
(the engine does, token by token) and does not return prompt log-probabilities. It keeps no
state between steps: the caller passes each row's generator, token history and constraint
state every step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cascade_rag.sampling.grammar import ConstraintState, unpack_bitmask
from cascade_rag.sampling.params import SamplingParams, _check_token_ids


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a `torch.Generator` on `device` seeded with `seed`, or None when `seed` is None.

    The generator must live on the device of the logits passed to the sampler.

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


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probabilities of one generated token (from the model's raw logits).

    Attributes:
        token_id: The sampled token.
        logprob: Its log-probability.
        rank: 1 + the number of tokens strictly more likely than it (1 = most likely).
        top: `(token_id, logprob)` of the `params.logprobs` most likely tokens (fewer if the
            vocabulary is smaller), most likely first, lower id first on ties.
    """

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...]


@dataclass
class SamplerOutput:
    """One step's result: a token per row, and its log-probabilities where asked for."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    """Picks one next token per row from a step's logits.

    Stateless between steps: per-request randomness lives in the generators the caller passes
    in (one per request, created once with `make_generator(params.seed, device)` and kept for
    its lifetime), and token histories are passed every step.

    Args:
        eos_token_ids: The model's end-of-sequence ids, masked while a row has generated fewer
            than `min_tokens` tokens (unless it sets `ignore_eos`).
    """

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = tuple(sorted(set(_check_token_ids("eos_token_ids", eos_token_ids))))

    def sample_step(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        constraints: Sequence[ConstraintState | None] | None = None,
        to_host: bool = True,
    ) -> SamplerOutput | torch.Tensor:
        """Sample one token per row, applying every option of each row's params.

        Args:
            logits: [batch, vocab] float logits of the last position of each request.
            params: `batch` sampling parameters, one per row.
            generators: `batch` generators (on `logits.device`) or None, one per row. A row
                with a generator draws only from it, so its tokens do not depend on the other
                rows; a row with None draws from torch's global RNG. Greedy rows draw nothing.
            prompt_ids: `batch` prompt token id sequences. Read only for rows with
                `repetition_penalty != 1`, so other rows may pass `()`.
            output_ids: `batch` sequences of the tokens generated so far. Read only for rows
                whose `params.needs_token_history` (penalties read the ids, `min_tokens` only
                the length), so other rows may pass `()`.
            constraints: None, or `batch` entries: the row's `ConstraintState` (made by one
                `GrammarCompiler.start` for the row's `params.constraint`) or None for an
                unconstrained row. Only read here: the caller advances each state with the
                token it appends.
            to_host: False returns the [batch] int64 ids on `logits.device` without reading
                them back (nothing here then waits for the device, so the caller can queue
                more work first); same draws. Rows with `params.logprobs` raise ValueError
                then (their log-probabilities are read on the host).

        Returns:
            A `SamplerOutput`: one token id per row, and a `TokenLogprob` per row whose
            `params.logprobs` is not None (None elsewhere).

        Raises:
            ConstraintError: a constrained row allows no token (its matcher failed).
            ValueError: a row with `params.constraint` but no state, or the reverse.

        Cost: a batch of greedy rows without penalties, `min_tokens`, constraints or logprobs
        is one argmax and one `.tolist()`. Penalised rows cost O(their prompt and output
        lengths) on the host per step to gather the ids. Constrained rows cost one parallel
        llguidance mask computation for all of them (tens of microseconds per row) and one
        `masked_fill`. All tensor work stays on `logits.device`; the final `.tolist()` is the
        only wait for the device.

        Example:
            >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
            >>> out = Sampler().sample_step(
            ...     logits,
            ...     [SamplingParams(repetition_penalty=4.0), SamplingParams(logprobs=1)],
            ...     [None, None],
            ...     prompt_ids=[[1], ()],
            ...     output_ids=[(), ()],
            ... )
            >>> out.token_ids, out.logprobs[0], out.logprobs[1].rank
            ([2, 0], None, 1)
        """
        states = _check_step(logits, params, generators, prompt_ids, output_ids, constraints)
        batch = logits.shape[0]
        if not to_host:
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    raise ValueError(
                        f"row {i} asks for logprobs, which are read on the host; call "
                        "sample_step with to_host=True"
                    )
            if all(p._plain_greedy for p in params):
                return torch.argmax(logits, dim=-1)
            return self._next_ids(logits, params, generators, prompt_ids, output_ids, states)
        if all(p._plain_greedy for p in params):
            return SamplerOutput(torch.argmax(logits, dim=-1).tolist(), [None] * batch)
        next_ids = self._next_ids(logits, params, generators, prompt_ids, output_ids, states)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not logprob_rows:
            return SamplerOutput(next_ids.tolist(), [None] * batch)
        return _with_logprobs(logits, next_ids, params, logprob_rows)

    def greedy_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch] int64 argmax ids on `logits.device` (first index on ties): what
        `sample_step(..., to_host=False)` returns when every row's params are plain greedy
        (greedy, no penalties, `min_tokens`, constraint or logprobs). The caller checks that
        once per batch; nothing here reads the rows' params, so the step costs one kernel.
        """
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        return torch.argmax(logits, dim=-1)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Sample one token per row, without token history (no penalties, no `min_tokens`).

        Same draws as `sample_step` (`logprobs` are not computed). Rows that need a token
        history raise `ValueError`: use `sample_step` for them.

        Args:
            logits: [batch, vocab] float logits of the last position of each request.
            params: `batch` sampling parameters, one per row.
            generators: `batch` generators (on `logits.device`) or None, one per row.

        Returns:
            [batch] int64 token ids on `logits.device`.

        Example:
            >>> logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
            >>> Sampler().sample(logits, [SamplingParams()] * 2, [None, None]).tolist()
            [1, 0]
        """
        _check_batch(logits, params, generators)
        for i, p in enumerate(params):
            if p.needs_token_history:
                raise ValueError(
                    f"row {i} uses penalties or min_tokens, which need the token history; "
                    "call Sampler.sample_step with prompt_ids and output_ids"
                )
            if p.constraint is not None:
                raise ValueError(
                    f"row {i} has a constraint; call Sampler.sample_step with its state"
                )
        return self._next_ids(logits, params, generators, (), (), [None] * len(params))

    def _next_ids(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        states: Sequence[ConstraintState | None],
    ) -> torch.Tensor:
        """[batch] int64 next token ids on `logits.device` (no host sync on CPU-side masks)."""
        batch, vocab = logits.shape
        device = logits.device
        # Greedy for every row (cheap); rows whose logits change or that sample are redone.
        next_ids = torch.argmax(logits, dim=-1)

        # Rows redone ("sub" rows) and, by position among them, what each one needs.
        sub_rows: list[int] = []
        sampled: list[int] = []
        penalised: list[int] = []
        masked_ids: list[int] = []  # masked (position, id) pairs, as position * vocab + id
        constrained: list[int] = []
        for i, p in enumerate(params):
            if p._argmax_only:
                continue
            mask = ()
            if p.min_tokens and len(output_ids[i]) < p.min_tokens:
                mask = p.stop_token_ids if p.ignore_eos else p.stop_token_ids + self.eos_token_ids
            if p.is_greedy and not p._penalised and not mask and states[i] is None:
                continue
            pos = len(sub_rows)
            sub_rows.append(i)
            if states[i] is not None:
                constrained.append(pos)
            if not p.is_greedy:
                sampled.append(pos)
            if p._penalised:
                penalised.append(pos)
            if mask:
                if max(mask) >= vocab:
                    raise ValueError(
                        f"row {i}: stop or EOS token id {max(mask)} is outside the vocabulary of "
                        f"{vocab} tokens; check SamplingParams.stop_token_ids with check_vocab "
                        "and the sampler's eos_token_ids"
                    )
                masked_ids.extend(pos * vocab + t for t in mask)
        if not sub_rows:
            return next_ids
        # Everything this step needs from the host, in one int64 and one float32 copy.
        ints, floats = _HostPack(np.int64), _HostPack(np.float32)
        i_rows = ints.add(sub_rows)
        if penalised:
            pen_params = [params[sub_rows[j]] for j in penalised]
            out_seqs = [output_ids[sub_rows[j]] for j in penalised]
            prompt_seqs = [
                prompt_ids[sub_rows[j]] if p.repetition_penalty != 1.0 else ()
                for j, p in zip(penalised, pen_params)
            ]
            i_pen = ints.add(penalised)
            # row * vocab + id of every output / prompt token, row = position among penalised
            i_out = ints.add(_flat_token_index(out_seqs, vocab, "output_ids", penalised, sub_rows))
            i_prompt = ints.add(
                _flat_token_index(prompt_seqs, vocab, "prompt_ids", penalised, sub_rows)
            )
            f_rep = floats.add([p.repetition_penalty for p in pen_params])
            f_freq = floats.add([p.frequency_penalty for p in pen_params])
            f_pres = floats.add([p.presence_penalty for p in pen_params])
        if masked_ids:
            i_mask = ints.add(masked_ids)
        if sampled:
            s_params = [params[sub_rows[j]] for j in sampled]
            i_sampled = ints.add(sampled)
            i_top_k = ints.add([p.top_k if 0 < p.top_k < vocab else vocab for p in s_params])
            s_generators = [generators[sub_rows[j]] for j in sampled]
            unseeded = [j for j, g in enumerate(s_generators) if g is None]
            i_unseeded = ints.add(unseeded)
            f_temp = floats.add([p.temperature for p in s_params])
            # top_p 1.0 keeps every token (a rounded cumulative sum could reach 1 early).
            f_top_p = floats.add([p.top_p if p.top_p < 1.0 else 2.0 for p in s_params])
            f_min_p = floats.add([p.min_p for p in s_params])
        if constrained:
            i_constrained = ints.add(constrained)
            c_states = [states[sub_rows[j]] for j in constrained]
            compiler = c_states[0].compiler
            assert all(s.compiler is compiler for s in c_states), "one compiler per sampler step"
            if compiler.vocab_size != vocab:
                raise ValueError(
                    f"constraints were compiled for a vocabulary of {compiler.vocab_size} "
                    f"tokens but the logits have {vocab}"
                )
            words = _to_device(torch.from_numpy(compiler.fill_bitmask(c_states)), device)
        int_t, float_t = ints.to(device), floats.to(device)

        # x: [num_sub_rows, vocab] float32, this step's logits of the redone rows.
        x = logits[int_t[i_rows]].float()
        if penalised:
            pen = int_t[i_pen]
            num_pen = len(penalised)
            xp = x[pen] if num_pen < len(sub_rows) else x
            # counts: [num_pen, vocab], occurrences of each token in each row's output
            counts = torch.zeros(num_pen * vocab, dtype=torch.float32, device=device)
            out_flat = int_t[i_out]
            # float adds of 1.0: exact in any order, so atomics do not make counts vary
            counts.index_add_(0, out_flat, torch.ones(out_flat.shape, device=device))
            counts = counts.view(num_pen, vocab)
            if any(p.repetition_penalty != 1.0 for p in pen_params):
                seen = (counts > 0).view(-1)
                seen.index_fill_(0, int_t[i_prompt], True)  # a Scalar fill: no host copy
                rep = float_t[f_rep][:, None]
                repeated = torch.where(xp > 0, xp / rep, xp * rep)
                xp = torch.where(seen.view(num_pen, vocab), repeated, xp)
            if any(p.frequency_penalty or p.presence_penalty for p in pen_params):
                xp = xp - (
                    float_t[f_freq][:, None] * counts
                    + float_t[f_pres][:, None] * (counts > 0).float()
                )
            if num_pen < len(sub_rows):
                x[pen] = xp
            else:
                x = xp
        if masked_ids:
            x.view(-1).index_fill_(0, int_t[i_mask], -math.inf)
        if constrained:
            banned = ~unpack_bitmask(words, vocab)  # [num_constrained, vocab]
            if len(constrained) == len(sub_rows):
                x = x.masked_fill(banned, -math.inf)
            else:
                c_idx = int_t[i_constrained]
                x[c_idx] = x[c_idx].masked_fill(banned, -math.inf)
        picked = torch.argmax(x, dim=-1)

        if sampled:
            s_idx = int_t[i_sampled]
            xs = x[s_idx] if len(sampled) < len(sub_rows) else x
            probs = _filtered_probs(
                xs,
                float_t[f_temp],
                int_t[i_top_k] if any(0 < p.top_k < vocab for p in s_params) else None,
                float_t[f_top_p] if any(p.top_p < 1.0 for p in s_params) else None,
            )
            if any(p.min_p > 0.0 for p in s_params):
                # min-p: the ratio to the top probability survives renormalisation, so it can
                # be tested on the top-k/top-p filtered probabilities.
                threshold = float_t[f_min_p][:, None] * probs.amax(dim=-1, keepdim=True)
                probs = probs.masked_fill(probs < threshold, 0.0)
            picked[s_idx] = _exponential_race(
                probs,
                s_generators,
                int_t[i_unseeded] if unseeded else None,
            )
        next_ids[int_t[i_rows]] = picked
        return next_ids


class _HostPack:
    """Per-step values gathered on the host, moved to the device in one copy."""

    def __init__(self, dtype: type) -> None:
        self._parts: list[np.ndarray] = []
        self._dtype = dtype
        self._size = 0

    def add(self, values: Sequence | np.ndarray) -> slice:
        """Append `values`; returns where they lie in the tensor that `to` returns."""
        part = np.asarray(values, dtype=self._dtype)
        start = self._size
        self._parts.append(part)
        self._size += part.size
        return slice(start, self._size)

    def to(self, device: torch.device) -> torch.Tensor:
        return _to_device(
            torch.from_numpy(
                np.concatenate(self._parts) if self._parts else np.zeros(0, self._dtype)
            ),
            device,
        )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned + non_blocking: no wait for the queued forward pass
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _check_step(logits, params, generators, prompt_ids, output_ids, constraints):
    """`sample_step`'s argument checks; returns the constraint state per row."""
    _check_batch(logits, params, generators)
    batch = logits.shape[0]
    if len(prompt_ids) != batch or len(output_ids) != batch:
        raise ValueError(
            f"got {len(prompt_ids)} prompt_ids and {len(output_ids)} output_ids for {batch} "
            "rows; pass one of each per row of logits (() for rows that need no history)"
        )
    return _check_constraints(params, constraints)


def _check_constraints(
    params: Sequence[SamplingParams], constraints: Sequence[ConstraintState | None] | None
) -> Sequence[ConstraintState | None]:
    if constraints is None:
        constraints = [None] * len(params)
    elif len(constraints) != len(params):
        raise ValueError(
            f"got {len(constraints)} constraint states for {len(params)} rows; pass one per "
            "row (None for unconstrained rows)"
        )
    for i, (p, state) in enumerate(zip(params, constraints)):
        if (p.constraint is None) != (state is None):
            raise ValueError(
                f"row {i} has {'no ' if state is None else ''}constraint state but "
                f"{'a' if p.constraint is not None else 'no'} constraint in its params; pass "
                "GrammarCompiler.start(params.constraint) for constrained rows, None elsewhere"
            )
    return constraints


def _flat_token_index(
    seqs: list[Sequence[int]], vocab: int, what: str, positions: list[int], sub_rows: list[int]
) -> np.ndarray:
    """int64 `j * vocab + id` for every id of `seqs[j]`, built with numpy (no per-token loop)."""
    lengths = np.fromiter((len(ids) for ids in seqs), dtype=np.int64, count=len(seqs))
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        for j, row_ids in enumerate(seqs):
            bad = [t for t in row_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"row {sub_rows[positions[j]]}: {what} holds token id {bad[0]}, outside the "
                    f"vocabulary of {vocab} tokens"
                )
    return ids + np.repeat(np.arange(len(seqs), dtype=np.int64) * vocab, lengths)


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if len(params) != batch or len(generators) != batch:
        raise ValueError(
            f"got {len(params)} params and {len(generators)} generators for {batch} rows; "
            "pass one of each per row of logits"
        )


def _filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p; filtered tokens get exactly 0.

    logits: [rows, vocab] float32; temperature: [rows] >= SAMPLING_EPS; top_k: [rows] in
    [1, vocab] (vocab = off) or None when no row uses it; top_p: [rows] in (0, 1] or 2.0 (off),
    or None when no row uses it.
    """
    rows, vocab = logits.shape
    scaled = logits / temperature[:, None]
    if top_k is None and top_p is None:
        return torch.softmax(scaled, dim=-1)

    # Sort the unscaled logits so rank 0 is exactly torch.argmax (stable: first index on ties);
    # dividing by a temperature could round distinct logits into ties.
    _, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    sorted_scaled = torch.gather(scaled, -1, order)  # [rows, vocab], non-increasing
    ranks = torch.arange(vocab, device=logits.device)
    if top_k is not None:
        remove = ranks[None, :] >= top_k[:, None]
    else:
        remove = torch.zeros(rows, vocab, dtype=torch.bool, device=logits.device)
    if top_p is not None:
        probs = torch.softmax(sorted_scaled.masked_fill(remove, -math.inf), dim=-1)
        # Keep rank r while the probability of ranks < r is below top_p.
        remove |= (torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None]
    remove[:, 0] = False
    remove = torch.zeros_like(remove).scatter_(-1, order, remove)
    return torch.softmax(scaled.masked_fill(remove, -math.inf), dim=-1)


def _exponential_race(
    probs: torch.Tensor,
    generators: Sequence[torch.Generator | None],
    unseeded: torch.Tensor | None,
) -> torch.Tensor:
    """[rows] draws `argmax(probs / q)`, `q ~ Exp(1)`: token i with probability ∝ probs[i].

    probs: [rows, vocab] >= 0 (need not sum to 1). Row j draws its [vocab] noise from
    `generators[j]`; the rows listed in `unseeded` (None generators) draw one block from the
    global RNG.
    """
    q = torch.empty_like(probs)
    for j, generator in enumerate(generators):
        if generator is not None:
            q[j].exponential_(generator=generator)
    if unseeded is not None:
        q[unseeded] = torch.empty(
            unseeded.shape[0], probs.shape[1], dtype=probs.dtype, device=probs.device
        ).exponential_()
    # q == 0 would turn a filtered-out token (p == 0) into 0/0 = nan, which argmax picks.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return torch.argmax(probs / q, dim=-1)


def _with_logprobs(
    logits: torch.Tensor,
    next_ids: torch.Tensor,
    params: Sequence[SamplingParams],
    rows: list[int],
) -> SamplerOutput:
    """Token ids plus `TokenLogprob`s for `rows`, fetched in one copy to the host."""
    batch, vocab = logits.shape
    device = logits.device
    num_top = min(max(params[i].logprobs for i in rows), vocab)
    pack = _HostPack(np.int64)
    pack.add(rows)
    index = pack.to(device)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [rows, vocab]
    token = next_ids[index]
    token_logprob = logprobs.gather(-1, token[:, None])  # [rows, 1]
    rank = (logprobs > token_logprob).sum(dim=-1) + 1
    parts = [next_ids.double(), token_logprob[:, 0].double(), rank.double()]
    if num_top:
        top_ids = _top_ids(logprobs, num_top)  # [rows, num_top]
        parts += [top_ids.double().flatten(), logprobs.gather(-1, top_ids).double().flatten()]
    host = torch.cat(parts).tolist()  # float64 holds ids, ranks and float32 values exactly

    token_ids = [int(t) for t in host[:batch]]
    n = len(rows)
    token_lps, ranks = host[batch : batch + n], host[batch + n : batch + 2 * n]
    top_ids_host = host[batch + 2 * n : batch + 2 * n + n * num_top]
    top_lps_host = host[batch + 2 * n + n * num_top :]
    out: list[TokenLogprob | None] = [None] * batch
    for j, i in enumerate(rows):
        k = min(params[i].logprobs, vocab)
        base = j * num_top
        out[i] = TokenLogprob(
            token_id=token_ids[i],
            logprob=token_lps[j],
            rank=int(ranks[j]),
            top=tuple((int(top_ids_host[base + r]), top_lps_host[base + r]) for r in range(k)),
        )
    return SamplerOutput(token_ids, out)


def _top_ids(values: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, k] ids of the k largest float32 `values` per row, larger first, lower id on ties.

    `torch.topk` leaves the order of ties unspecified, so rank a unique int64 key instead: the
    float's bits mapped to an order-preserving int32, shifted up, minus the column index.
    """
    bits = (values + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into 0.0 (they tie)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    columns = torch.arange(values.shape[-1], device=values.device)
    return torch.topk((ordered << 32) - columns, k, dim=-1).indices
