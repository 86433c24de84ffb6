"""CenteredClip, the math and the hivemind reducer that applies it: fast, no peers."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.clipping import centered_clip, coordinate_median
from lightning_moshpit.reducers import CenteredClipReducer, ClipConfig, check_aggregation


def honest_vectors(count: int = 3, size: int = 50, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    center = torch.randn(size, generator=generator)
    return center + 0.1 * torch.randn(count, size, generator=generator)


def test_identical_vectors_come_back_unchanged() -> None:
    vector = torch.randn(100)
    for tau in (None, 0.5):
        result = centered_clip([vector, vector.clone(), vector.clone()], tau=tau)
        assert torch.allclose(result.value, vector)
        assert result.dropped == () and result.clipped == ()


def test_without_outliers_and_with_a_large_radius_it_is_the_weighted_mean() -> None:
    vectors = honest_vectors()
    weights = [1.0, 2.0, 2.0]  # the median cap (2.0) leaves these weights as they are
    result = centered_clip(vectors, weights=weights, tau=1e6, iterations=50)
    expected = (torch.tensor(weights)[:, None] * vectors).sum(0) / sum(weights)
    assert torch.allclose(result.value, expected, atol=1e-5)


@pytest.mark.parametrize("tau", [None, 0.5])
def test_one_huge_outlier_barely_moves_the_result(tau: float | None) -> None:
    honest = honest_vectors()
    honest_mean = honest.mean(0)
    attacker = -1000 * honest_mean  # sign flip x(-1000)
    result = centered_clip(torch.cat([honest, attacker[None]]), tau=tau)
    plain_mean = torch.cat([honest, attacker[None]]).mean(0)
    moved = float((result.value - honest_mean).norm())
    assert moved < 0.5 * result.tau + 1e-6, (moved, result.tau)  # bounded by the radius, not by the outlier's norm
    assert moved < 1e-2 * float((plain_mean - honest_mean).norm())
    assert 3 in result.clipped


def test_nan_and_inf_rows_are_dropped() -> None:
    honest = honest_vectors()
    nan_row = torch.full((50,), float("nan"))
    inf_row = honest[0].clone()
    inf_row[7] = float("inf")
    result = centered_clip(torch.cat([honest, nan_row[None], inf_row[None]]))
    assert result.dropped == (3, 4)
    assert bool(torch.isfinite(result.value).all())
    assert torch.allclose(result.value, centered_clip(honest).value)
    assert math.isinf(result.distances[3])


def test_only_non_finite_rows_give_zeros_not_nan() -> None:
    result = centered_clip(torch.full((2, 5), float("nan")))
    assert torch.equal(result.value, torch.zeros(5)) and result.dropped == (0, 1)


def test_a_huge_claimed_weight_buys_no_extra_influence() -> None:
    honest = honest_vectors()
    attacker = honest.mean(0) + 100.0
    vectors = torch.cat([honest, attacker[None]])
    modest = centered_clip(vectors, weights=[1, 1, 1, 1], tau=0.5)
    greedy = centered_clip(vectors, weights=[1, 1, 1, 1e9], tau=0.5)
    assert torch.allclose(modest.value, greedy.value, atol=1e-6)


def test_zero_weight_rows_are_ignored() -> None:
    honest = honest_vectors()
    outlier = torch.full((1, 50), 1e6)
    result = centered_clip(torch.cat([honest, outlier]), weights=[1, 1, 1, 0], tau=1e9, iterations=50)
    assert torch.allclose(result.value, honest.mean(0), atol=1e-5)


def test_median_of_two_is_their_midpoint() -> None:
    assert torch.equal(coordinate_median(torch.tensor([[0.0, 2.0], [4.0, -2.0]])), torch.tensor([2.0, 0.0]))


def test_two_vectors_cannot_be_told_apart() -> None:
    """The documented limit: in a group of two, the honest vector and the attacker's are symmetric."""
    honest, attacker = torch.ones(10), -1000 * torch.ones(10)
    result = centered_clip([honest, attacker])
    assert torch.allclose(result.value, (honest + attacker) / 2)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="tau"):
        centered_clip([torch.ones(3)], tau=-1.0)
    with pytest.raises(ValueError, match="weights"):
        centered_clip([torch.ones(3), torch.ones(3)], weights=[1.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        centered_clip(torch.empty(0, 3))


def run_reducer(parts_by_sender: list[list[torch.Tensor]], weights: list[float], ban: int | None = None) -> list:
    """Feed every sender's parts to one CenteredClipReducer concurrently, as hivemind's runner does."""

    async def main() -> list:
        shapes = [part.shape for part in parts_by_sender[0]]
        reducer = CenteredClipReducer(shapes, len(parts_by_sender), clip=ClipConfig())

        async def send(sender: int) -> list[torch.Tensor]:
            return [
                await reducer.accumulate_part(sender, index, part, weight=weights[sender])
                for index, part in enumerate(parts_by_sender[sender])
            ]

        senders = [index for index in range(len(parts_by_sender)) if index != ban]
        tasks = [asyncio.create_task(send(sender)) for sender in senders]
        if ban is not None:
            await asyncio.sleep(0)
            reducer.on_sender_failed(ban)  # a sender that never shows up and is banned by the runner
        results = await asyncio.gather(*tasks)
        reducer.finalize()
        return results

    return asyncio.run(main())


def test_reducer_returns_the_same_robust_parts_to_every_sender() -> None:
    honest = [honest_vectors(seed=seed) for seed in range(2)]  # two parts, three honest senders each
    parts_by_sender = [[honest[0][i], honest[1][i]] for i in range(3)]
    parts_by_sender.append([-1000 * honest[0].mean(0), torch.full((50,), float("nan"))])
    results = run_reducer(parts_by_sender, weights=[16.0] * 4)
    for part_index in range(2):
        expected = centered_clip(torch.stack([p[part_index] for p in parts_by_sender]), weights=[16.0] * 4,
                                 drop_factor=ClipConfig().drop_factor).value  # the reducer's default rule
        for sender_results in results:
            assert torch.equal(sender_results[part_index], expected)
        assert float((expected - honest[part_index].mean(0)).norm()) < 1.0


def test_reducer_finishes_without_a_banned_sender() -> None:
    parts_by_sender = [[row] for row in honest_vectors(count=4)]
    results = run_reducer(parts_by_sender, weights=[1.0] * 4, ban=3)
    expected = centered_clip(torch.stack([p[0] for p in parts_by_sender[:3]])).value
    assert all(torch.equal(r[0], expected) for r in results)


def test_aggregation_arguments_are_validated() -> None:
    assert check_aggregation("mean", None, 10) is None
    assert check_aggregation("centered_clip", 2, 3) == ClipConfig(tau=2.0, iterations=3)
    with pytest.raises(ValueError, match=r"`aggregation` must be one of \['mean', 'centered_clip'\], got 'median'"):
        MoshpitStrategy(aggregation="median")
    with pytest.raises(ValueError, match=r"`clip_tau` must be a positive finite number .* got -1"):
        MoshpitStrategy(aggregation="centered_clip", clip_tau=-1)
    with pytest.raises(ValueError, match=r"`clip_iters` must be a positive integer .* got 0"):
        MoshpitStrategy(aggregation="centered_clip", clip_iters=0)
    with pytest.raises(ValueError, match="grad_averager_factory"):
        MoshpitStrategy(aggregation="centered_clip", grad_averager_factory=object())
    strategy = MoshpitStrategy(aggregation="centered_clip", clip_tau=0.5, clip_iters=4)
    assert strategy.clip == ClipConfig(tau=0.5, iterations=4)


def test_attacks_replace_the_sent_vector_as_documented() -> None:
    from lightning_moshpit.testing.attacks import corrupt, flip_labels

    honest = [torch.randn(4, 3), torch.randn(5)]
    norm = float(torch.sqrt(sum((t**2).sum() for t in honest)))
    generator = torch.Generator().manual_seed(0)
    direction = [torch.randn(4, 3), torch.randn(5)]
    for attack in ("sign_flip", "gaussian", "nan", "constant"):
        sent = [t.clone() for t in honest]
        corrupt(sent, attack, 1000.0, generator, direction)
        if attack == "sign_flip":
            assert all(torch.allclose(s, -1000 * h) for s, h in zip(sent, honest))
        elif attack == "nan":
            assert all(bool(torch.isnan(s).all()) for s in sent)
        else:
            sent_norm = float(torch.sqrt(sum((s**2).sum() for s in sent)))
            assert sent_norm == pytest.approx(1000 * norm, rel=1e-4)
    constant = [t.clone() for t in honest]
    corrupt(constant, "constant", 1.0, generator, direction)
    cosine = torch.cat([c.flatten() for c in constant]) @ torch.cat([d.flatten() for d in direction])
    assert float(cosine) == pytest.approx(float(torch.cat([d.flatten() for d in direction]).norm()) * norm, rel=1e-4)
    assert torch.equal(flip_labels(torch.tensor([0, 3, 9]), 10), torch.tensor([9, 6, 0]))


def test_a_private_centered_clip_swarm_builds_averagers_with_both_the_clip_and_the_secret_check() -> None:
    from lightning_moshpit.reducers import (
        CenteredClipAveragerMixin,
        ClippedPrivateGradientAverager,
        ClippedPrivateTrainingStateAverager,
        check_aggregation,
        gradient_averager_factory,
        state_averager_class,
    )
    from lightning_moshpit.security import PrivateAveragerMixin, SwarmSecret

    clip = check_aggregation("centered_clip", None, 10)
    secret = SwarmSecret("a-secret-of-16-chars-or-more")
    factory = gradient_averager_factory(clip, swarm_secret=secret, target_group_size=4)
    assert factory.cls is ClippedPrivateGradientAverager
    assert factory.kwargs["clip"] is clip and factory.kwargs["swarm_secret"] is secret
    assert state_averager_class(clip, secret) is ClippedPrivateTrainingStateAverager
    for cls in (ClippedPrivateGradientAverager, ClippedPrivateTrainingStateAverager):
        assert issubclass(cls, CenteredClipAveragerMixin) and issubclass(cls, PrivateAveragerMixin)
    # the RPC handlers keep the clipping class's name, so a clipping peer without the secret reaches the refusal
    assert ClippedPrivateGradientAverager._get_handle_name(None, "rpc_join_group") == (
        "ClippedGradientAverager.rpc_join_group"
    )


# --- rejecting far outliers (``drop_factor``, BTARD-style) ---


def test_with_rejection_and_no_outlier_it_is_still_exactly_the_weighted_mean() -> None:
    vectors = honest_vectors()
    weights = [1.0, 2.0, 2.0]
    result = centered_clip(vectors, weights=weights, tau=1e6, iterations=50, drop_factor=4.0)
    expected = (torch.tensor(weights)[:, None] * vectors).sum(0) / sum(weights)
    assert result.rejected == ()
    assert torch.allclose(result.value, expected, atol=1e-6)


@pytest.mark.parametrize("attack", ["sign_flip", "huge_constant"])
def test_a_far_outlier_is_rejected_and_keeps_no_influence(attack: str) -> None:
    honest = honest_vectors(count=3, size=200, seed=1)
    outlier = -1000 * honest.mean(0) if attack == "sign_flip" else torch.full((200,), 1e4)
    vectors = torch.cat([honest, outlier[None]])
    clipped_only = centered_clip(vectors)
    result = centered_clip(vectors, drop_factor=4.0, iterations=50)
    assert result.rejected == (3,) and result.dropped == ()
    assert result.distances[3] > 100 * result.tau  # its real distance, not inf
    # exactly what the honest vectors alone give with the same radius: the outlier's pull is gone
    alone = centered_clip(honest, tau=result.tau, iterations=50)
    assert torch.allclose(result.value, alone.value, atol=1e-6)
    # ... whereas clipping alone leaves a pull of about τ/n towards the outlier
    bias_clipped = float((clipped_only.value - alone.value).norm())
    bias_rejected = float((result.value - alone.value).norm())
    assert bias_clipped > 0.1 * clipped_only.tau and bias_rejected < 1e-3 * bias_clipped


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("count", [3, 4, 8])
def test_no_honest_vector_is_rejected_when_all_are_close(seed: int, count: int) -> None:
    # honest vectors: one shared center plus independent noise, at every scale
    for scale in (1e-4, 1.0, 1e4):
        vectors = scale * honest_vectors(count=count, size=64, seed=seed)
        result = centered_clip(vectors, drop_factor=4.0)
        assert result.rejected == (), (scale, result.distances, result.tau)


def test_rejection_never_removes_a_majority() -> None:
    honest = honest_vectors(count=2, size=50)
    far = torch.stack([torch.full((50,), 1e3), torch.full((50,), -1e3)])
    vectors = torch.cat([honest, far])  # two far vectors of four: at most (4 - 1) // 2 = 1 may go
    result = centered_clip(vectors, drop_factor=4.0)
    assert len(result.rejected) == 1 and result.rejected[0] in (2, 3)
    assert bool(torch.isfinite(result.value).all())


def test_rejection_with_nan_and_zero_radius() -> None:
    honest = honest_vectors()
    nan_row = torch.full((1, 50), float("nan"))
    far_row = torch.full((1, 50), 1e5)
    result = centered_clip(torch.cat([honest, nan_row, far_row]), drop_factor=4.0)
    assert result.dropped == (3,) and result.rejected == (4,)
    assert math.isinf(result.distances[3]) and result.distances[4] > 1e5
    # a zero radius (a majority of identical vectors) returns the median and rejects nothing
    same = torch.stack([honest[0]] * 3 + [honest[1]])
    result = centered_clip(same, drop_factor=4.0)
    assert result.tau == 0 and result.rejected == () and torch.equal(result.value, honest[0])


def test_drop_factor_is_validated() -> None:
    for bad in (1.0, 0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"`drop_factor` must be a finite number > 1"):
            centered_clip(honest_vectors(), drop_factor=bad)
    assert check_aggregation("centered_clip", None, 10, None) == ClipConfig(drop_factor=None)
    assert check_aggregation("centered_clip", None, 10, 3) == ClipConfig(drop_factor=3.0)
    with pytest.raises(ValueError, match=r"`clip_drop` must be a finite number > 1 .* got 0.5"):
        MoshpitStrategy(aggregation="centered_clip", clip_drop=0.5)
    assert MoshpitStrategy(aggregation="centered_clip").clip.drop_factor == 4.0


def test_the_reducer_rejects_a_far_sender_and_names_it(caplog: pytest.LogCaptureFixture) -> None:
    honest = honest_vectors(count=3, size=40, seed=2)
    parts_by_sender = [[row] for row in honest] + [[-1000 * honest.mean(0)]]
    with caplog.at_level("DEBUG", logger="lightning_moshpit.reducers"):
        results = run_reducer(parts_by_sender, weights=[1.0] * 4)
    expected = centered_clip(torch.stack([p[0] for p in parts_by_sender]), drop_factor=4.0).value
    assert all(torch.allclose(r[0], expected) for r in results)
    assert any("left out of the average" in record.getMessage() and "4 x the radius" in record.getMessage()
               for record in caplog.records)  # fmt: skip
