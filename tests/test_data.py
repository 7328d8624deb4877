"""The synthetic Markov data: a known entropy rate, reproducible samples, and an exact batch split."""
import itertools
import math

import numpy as np
import pytest

from numerics.cell.data import global_batch, markov_chain, micro_batch_indices, sample_sequence

CHAIN = markov_chain()


def surprisals(tokens: np.ndarray) -> np.ndarray:
    """-ln P(next | current) for every transition of one sequence."""
    return -np.log(CHAIN.transition[tokens[:-1], tokens[1:]])


def test_chain_is_a_stationary_markov_chain():
    assert np.allclose(CHAIN.transition.sum(axis=1), 1.0)
    assert np.allclose(CHAIN.stationary @ CHAIN.transition, CHAIN.stationary)


def test_entropy_rate_matches_the_mean_surprisal_of_samples():
    # Sequences are independent; tokens within one are not, so the standard error comes from sequence means.
    means = np.array([surprisals(sample_sequence(CHAIN, 64, seed=3, step=0, index=i)).mean() for i in range(2000)])
    standard_error = means.std(ddof=1) / math.sqrt(len(means))
    assert abs(means.mean() - CHAIN.entropy_rate) < 3 * standard_error


def test_entropy_rate_leaves_room_to_learn():
    assert 0 < CHAIN.entropy_rate <= math.log(CHAIN.vocab) - 1.0


def test_sample_is_a_pure_function_of_seed_step_and_index():
    tokens = sample_sequence(CHAIN, 32, seed=0, step=5, index=3)
    assert np.array_equal(tokens, sample_sequence(CHAIN, 32, seed=0, step=5, index=3))
    for other in [dict(seed=1, step=5, index=3), dict(seed=0, step=6, index=3), dict(seed=0, step=5, index=4)]:
        assert not np.array_equal(tokens, sample_sequence(CHAIN, 32, **other))
    assert tokens.min() >= 0 and tokens.max() < CHAIN.vocab


def test_global_batch_stacks_the_samples_in_order():
    batch = global_batch(16, seed=0, step=2, size=4)
    assert tuple(batch.shape) == (4, 16)
    assert np.array_equal(batch[3].numpy(), sample_sequence(CHAIN, 16, seed=0, step=2, index=3))


@pytest.mark.parametrize("micro_batch, grad_accum, world_size", [(4, 1, 2), (1, 4, 2), (2, 1, 4), (3, 2, 3), (1, 1, 1)])
def test_micro_batches_partition_the_global_batch(micro_batch, grad_accum, world_size):
    size = micro_batch * grad_accum * world_size
    owned = [i for rank, micro in itertools.product(range(world_size), range(grad_accum))
             for i in micro_batch_indices(size, micro_batch, grad_accum, world_size, rank, micro)]
    assert sorted(owned) == list(range(size))


@pytest.mark.parametrize("sigmas", [1.0, 5.0])
def test_floor_tightens_toward_the_entropy_rate_as_tokens_grow(sigmas):
    floors = [CHAIN.floor(n, sigmas) for n in (10, 100, 1_000, 10_000, 10**8)]
    assert all(f < CHAIN.entropy_rate for f in floors)
    assert floors == sorted(floors)
    assert CHAIN.entropy_rate - floors[-1] < 1e-3
