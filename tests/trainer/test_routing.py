import pytest
import torch

from srpo.routing import advantages, route_group


@pytest.mark.parametrize("rewards,algo,distill,in_loss", [
    # correct with a sibling, wrong with a sibling
    ([1, 0, 0, 1], "srpo", [0, 1, 1, 0], [1, 1, 1, 1]),
    # lone success (correct without sibling) -> GRPO; its failed siblings are distilled
    ([1, 0, 0, 0], "srpo", [0, 1, 1, 1], [1, 1, 1, 1]),
    # wrong without a correct sibling (all-wrong group) -> GRPO
    ([0, 0, 0, 0], "srpo", [0, 0, 0, 0], [1, 1, 1, 1]),
    ([1, 1, 1, 1], "srpo", [0, 0, 0, 0], [1, 1, 1, 1]),
    ([1, 0, 0, 1], "grpo", [0, 0, 0, 0], [1, 1, 1, 1]),
    # SDPO as its authors run it: every rollout with *another* correct rollout, correct or not; the rest drop out
    ([1, 0, 0, 1], "sdpo", [1, 1, 1, 1], [1, 1, 1, 1]),
    ([1, 0, 0, 0], "sdpo", [0, 1, 1, 1], [0, 1, 1, 1]),
    ([0, 0, 0, 0], "sdpo", [0, 0, 0, 0], [0, 0, 0, 0]),
])
def test_routing_table(rewards, algo, distill, in_loss):
    r = route_group(torch.tensor(rewards, dtype=torch.float), algo)
    assert r.distill.tolist() == [bool(d) for d in distill]
    assert r.in_loss.tolist() == [bool(d) for d in in_loss]
    for i, sib in enumerate(r.sibling):
        if r.distill[i]:
            assert sib != i and rewards[sib] == 1  # a correct sibling, never the rollout itself
        else:
            assert sib is None


def test_partial_rewards_use_the_half_threshold():
    r = route_group(torch.tensor([0.6, 0.4]), "srpo")
    assert r.distill.tolist() == [False, True]


def test_advantages_dr_grpo_and_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert advantages(rewards).tolist() == [0.5, -0.5, -0.5, 0.5]
    assert torch.allclose(advantages(rewards, std_normalize=True), torch.tensor([1.0, -1.0, -1.0, 1.0]))
    assert advantages(torch.ones(4), std_normalize=True).tolist() == [0.0] * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3])
def test_equal_partial_rewards_have_no_advantage(dtype, value):
    """A group whose rollouts all scored the same partial reward: its std is 0, but the mean of seven 0.3s rounds,
    and std normalisation turned that rounding into an advantage of +1 for every rollout."""
    for size in (3, 7, 8, 16):
        rewards = torch.full((size,), value, dtype=dtype)
        assert advantages(rewards, std_normalize=True).tolist() == [0.0] * size
        assert advantages(rewards).abs().max() <= torch.finfo(dtype).eps


@pytest.mark.parametrize("algo", ["srpo", "sdpo"])
def test_unscorable_rollouts_are_never_distilled_and_have_no_advantage(algo):
    """TRL marks a rollout no reward function could score with a NaN reward and gives it advantage 0. Counted as a
    failure (nansum's 0) it was distilled toward a sibling, and lowered the group's mean."""
    r = route_group(torch.tensor([1.0, float("nan"), 0.0, 1.0]), algo)
    assert not r.distill[1] and r.sibling[1] is None
    assert r.in_loss[1] == (algo == "srpo")
    assert r.advantages.tolist() == pytest.approx([1 / 3, 0.0, -2 / 3, 1 / 3])
    assert advantages(torch.tensor([1.0, float("nan"), 0.0]), std_normalize=True).tolist() == [1.0, 0.0, -1.0]
    assert advantages(torch.full((3,), float("nan"))).tolist() == [0.0] * 3


def test_infinite_rewards_are_refused():
    """An inf reward (a broken reward function) made every other advantage of its group -inf, silently clamped to
    -3.4e38; fp16 rewards far apart overflowed the advantages' dtype."""
    with pytest.raises(ValueError, match=r"rewards must be finite .* index \[2\]"):
        route_group(torch.tensor([1.0, 0.0, float("inf"), 0.0]), "srpo")
    with pytest.raises(ValueError, match="rewards must be finite"):
        advantages(torch.tensor([float("-inf"), 0.0]), std_normalize=True)
    with pytest.raises(ValueError, match="overflow torch.float16"):
        advantages(torch.tensor([65504.0, -65504.0, -65504.0], dtype=torch.float16))
    assert advantages(torch.tensor([65504.0, -65504.0, -65504.0])).tolist() == pytest.approx([87338.67, -43669.33,
                                                                                               -43669.33])


def test_unknown_algo():
    with pytest.raises(ValueError, match="algo"):
        route_group(torch.zeros(2), "ppo")


def test_route_rollouts_is_route_group_per_group_with_batch_sibling_indices():
    from srpo.routing import route_rollouts

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    routed = route_rollouts(rewards, 3, "srpo")
    for k in range(3):
        group = route_group(rewards[3 * k:3 * k + 3], "srpo")
        assert routed.distill[3 * k:3 * k + 3] == group.distill.tolist()
        assert routed.advantages[3 * k:3 * k + 3] == group.advantages.tolist()
        assert routed.sibling[3 * k:3 * k + 3] == [None if s is None else 3 * k + s for s in group.sibling]
    assert routed.sibling == [None, 0, 0, None, None, None, None, None, 6]
    with pytest.raises(ValueError, match="groups of 4"):
        route_rollouts(rewards, 4, "srpo")
