"""trainer.threads=0 on CPU: the thread count is measured in the first steps, the faster kept."""

from __future__ import annotations

import torch

from contrastive.threads import ThreadChoice, candidates


def test_the_candidates_are_the_cpus_with_and_without_the_loaders_share():
    assert candidates(2, 2) == [1, 2] and candidates(8, 2) == [6, 8] and candidates(4, 0) == [4]


def test_each_candidate_is_timed_after_the_warm_up_and_the_faster_kept():
    before = torch.get_num_threads()
    try:
        choice = ThreadChoice([1, 2], warmup=2, window=3)
        assert torch.get_num_threads() == 1 and choice.chosen is None
        seconds = {1: 0.5, 2: 0.3}  # two threads train faster here
        for step in range(1, 20):
            choice(step, seconds[torch.get_num_threads()] if step > 2 else 9.0)  # warm-up steps are slow, ignored
        assert choice.chosen == 2 and torch.get_num_threads() == 2
        assert choice.times == {1: [0.5] * 3, 2: [0.3] * 3}
        single = ThreadChoice([4])
        assert single.chosen == 4 and torch.get_num_threads() == 4  # nothing to measure
    finally:
        torch.set_num_threads(before)
