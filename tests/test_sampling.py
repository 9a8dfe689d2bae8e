"""The sampler on fixed logits (no model): greedy, seeds, top-k, top-p, penalties, extreme temperatures."""

from __future__ import annotations

import pytest
import torch

from sinkchat.errors import SinkchatError
from sinkchat.sampling import Sampler
from sinkchat.settings import Settings

LOGITS = torch.tensor([1.0, 3.0, 2.0, -1.0, 0.5])


def draws(settings: Settings, n: int = 200, logits=LOGITS, recent=()) -> list[int]:
    sampler = Sampler(settings)
    return [sampler(logits, list(recent)) for _ in range(n)]


def test_greedy_takes_the_argmax():
    assert set(draws(Settings(temperature=0), 5)) == {1}


def test_a_seed_replays_and_other_seeds_differ():
    s = Settings(temperature=1.0, top_p=1.0, top_k=0, seed=3)
    assert draws(s) == draws(s)
    assert draws(s) != draws(s.replace(seed=4))


def test_top_k_and_top_p_limit_the_choices():
    assert set(draws(Settings(temperature=1.0, top_p=1.0, top_k=2, seed=0))) == {1, 2}
    # softmax(LOGITS): 0.63, 0.23, ... ; top_p 0.5 keeps only the best token
    assert set(draws(Settings(temperature=1.0, top_p=0.5, top_k=0, seed=0))) == {1}


def test_repetition_penalty_turns_a_near_greedy_draw_away_from_recent_tokens():
    assert draws(Settings(temperature=1e-6, repetition_penalty=2.0, seed=0), 5, recent=[1]) == [2] * 5


def test_temperature_0_is_pure_greedy_whatever_the_penalty():
    """``-t 0`` is the argmax of the model's logits: the penalty does not apply (it used to, and turned
    greedy replies away from what the user had just said)."""
    assert draws(Settings(temperature=0, repetition_penalty=2.0), 3, recent=[1]) == [1] * 3


def test_extreme_temperatures_stay_finite():
    """A tiny temperature is greedy in effect (no NaN from inf - inf); a huge one is near uniform."""
    assert set(draws(Settings(temperature=1e-40, seed=0), 20)) == {1}
    wide = draws(Settings(temperature=100, top_p=1.0, top_k=0, seed=0), 500)
    assert set(wide) == {0, 1, 2, 3, 4}
    big = torch.tensor([1e30, -1e30, 3e38, 0.0])
    assert draws(Settings(temperature=1e-3, seed=0), 5, logits=big) == [2] * 5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logits_that_are_not_numbers_are_one_clear_error(bad, temperature):
    logits = torch.zeros(8)
    logits[3] = bad
    with pytest.raises(SinkchatError, match="NaN .* or infinity"):
        Sampler(Settings(temperature=temperature, seed=0))(logits, [])
    logits[3] = float("-inf")  # a token ruled out is fine
    assert Sampler(Settings(temperature=temperature, seed=0))(logits, []) != 3
