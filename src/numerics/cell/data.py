"""Synthetic token streams from a fixed Markov chain whose entropy rate is known exactly.

Why a Markov chain: a correct model trained on fresh samples can approach, but
never clearly beat, the chain's entropy rate H. That gives every run a floor
("no collapse": a loss well below H means information leaked, e.g. through a
broken causal mask, or the loss is being computed wrong) and a ceiling with room
("learns": ln V is far above H when transitions are sparse).

Sample ``i`` of step ``s`` is a pure function of ``(seed, s, i)``, so every world
size and accumulation split sees the same global batch.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from functools import cache, cached_property, lru_cache

import numpy as np
import torch

VOCAB = 61  # odd on purpose: the embedding and LM head then have an odd element count
DIRICHLET_ALPHA = 0.1  # sparse rows: H sits well below ln(VOCAB)
CHAIN_SEED = 20241123  # the chain is fixed; run seeds only change which samples are drawn


@dataclass(frozen=True)
class MarkovChain:
    transition: np.ndarray  # [V, V], rows sum to 1
    stationary: np.ndarray  # [V]
    entropy_rate: float  # nats per predicted token
    surprisal_std: float  # std of -ln P(next | current) under the stationary chain

    @cached_property
    def cumulative(self) -> np.ndarray:
        """Row-wise CDFs of the transition matrix, with the stationary CDF as an extra last row."""
        return np.cumsum(np.vstack([self.transition, self.stationary]), axis=1)

    @cached_property
    def cumulative_rows(self) -> list[list[float]]:
        """`cumulative` as Python lists: ``bisect`` on a list picks the index ``np.searchsorted``
        picks on the row, ~4x faster a sequence with the generator's set-up (sampling was ~15 % of a Trainer cell's time)."""
        return self.cumulative.tolist()

    @property
    def vocab(self) -> int:
        return self.transition.shape[0]

    def floor(self, n_tokens: int, sigmas: float) -> float:
        """Lowest mean loss a correct model plausibly shows on ``n_tokens`` fresh tokens."""
        return self.entropy_rate - sigmas * self.surprisal_std / math.sqrt(n_tokens)


@cache
def markov_chain(vocab: int = VOCAB, alpha: float = DIRICHLET_ALPHA, seed: int = CHAIN_SEED) -> MarkovChain:
    rng = np.random.default_rng(seed)
    transition = rng.dirichlet(np.full(vocab, alpha), size=vocab)
    transition = np.maximum(transition, 1e-12)
    transition /= transition.sum(axis=1, keepdims=True)
    eigvals, eigvecs = np.linalg.eig(transition.T)
    stationary = np.real(eigvecs[:, np.argmin(np.abs(eigvals - 1.0))])
    stationary = np.abs(stationary) / np.abs(stationary).sum()
    surprisal = -np.log(transition)
    entropy_rate = float(np.sum(stationary[:, None] * transition * surprisal))
    second_moment = float(np.sum(stationary[:, None] * transition * surprisal**2))
    return MarkovChain(transition, stationary, entropy_rate, math.sqrt(second_moment - entropy_rate**2))


def sample_sequence(chain: MarkovChain, seq_len: int, seed: int, step: int, index: int) -> np.ndarray:
    """Sequence ``index`` of step ``step``: first token from the stationary distribution."""
    rng = np.random.default_rng([seed, step, index])
    cumulative, last = chain.cumulative_rows, chain.vocab - 1
    tokens, row = [], chain.vocab  # the stationary row first
    for uniform in rng.random(seq_len).tolist():
        row = min(bisect.bisect_left(cumulative[row], uniform), last)
        tokens.append(row)
    return np.array(tokens, dtype=np.int64)


def global_batch(seq_len: int, seed: int, step: int, size: int) -> torch.Tensor:
    """All ``size`` sequences of a step of the fixed chain, in global sample order (a fresh
    tensor each call)."""
    return torch.from_numpy(_global_batch(seq_len, seed, step, size).copy())


@lru_cache(maxsize=256)  # the drivers and the reference ask for a step's batch ~9 times a step
def _global_batch(seq_len: int, seed: int, step: int, size: int) -> np.ndarray:
    return np.stack([sample_sequence(markov_chain(), seq_len, seed, step, i) for i in range(size)])


def micro_batch_indices(step_size: int, micro_batch: int, grad_accum: int, world_size: int, rank: int, micro: int) -> range:
    """Global sample indices of one rank's micro-batch: ranks own contiguous slices of each micro-step."""
    assert step_size == micro_batch * grad_accum * world_size
    start = (micro * world_size + rank) * micro_batch
    return range(start, start + micro_batch)
