"""The SwAV recipe (recipes/swav): its pieces on their own, and its tiny preset run by 2 local peers.

The recipe needs the ``recipes`` extra (timm, torchvision); without it the module is skipped, saying so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm", reason="the SwAV recipe needs the `recipes` extra: pip install -e '.[recipes]'")
pytest.importorskip("torchvision", reason="the SwAV recipe needs torchvision (installed with timm)")

from cli_helpers import run_cli  # noqa: E402
from swarm_history import averaged_both_peers_in_most_rounds, losses, read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "swav"
sys.path.insert(0, str(RECIPE))

from multicrop import MultiCrop, synthetic_image, write_synthetic_images  # noqa: E402
from swav import FeatureQueue, SwAVHead, sinkhorn, swav_loss  # noqa: E402


# ------------------------------------------------------------------------------------------------ the method
def test_sinkhorn_codes_are_distributions_that_spread_over_all_prototypes() -> None:
    torch.manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    scores[:, 0] += 1.0  # every sample prefers prototype 0
    codes = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert codes.shape == (64, 8)
    assert torch.allclose(codes.sum(dim=1), torch.ones(64), atol=1e-5)
    per_prototype = codes.sum(dim=0)
    assert per_prototype.max() < 1.5 * 64 / 8 and per_prototype.min() > 0.5 * 64 / 8, per_prototype
    assert torch.softmax(scores / 0.05, dim=1).sum(dim=0)[0] > 0.8 * 64  # without Sinkhorn: nearly all on one


def test_sinkhorn_rejects_bad_epsilon_and_iterations() -> None:
    with pytest.raises(ValueError, match="`epsilon` must be positive, got 0"):
        sinkhorn(torch.zeros(4, 3), epsilon=0)
    with pytest.raises(ValueError, match="`iterations` must be at least 1, got 0"):
        sinkhorn(torch.zeros(4, 3), iterations=0)


def test_queue_keeps_the_newest_embeddings_first_and_is_full_after_length_samples() -> None:
    queue = FeatureQueue(num_views=2, length=6, dim=3)
    for value in (1.0, 2.0, 3.0):
        assert not queue.full
        for view in range(2):
            queue.push(view, torch.full((2, 3), value + 10 * view))
    assert queue.full
    assert queue.embeddings[0, :, 0].tolist() == [3.0, 3.0, 2.0, 2.0, 1.0, 1.0]
    assert queue.embeddings[1, 0, 0] == 13.0


def test_swav_loss_is_lower_when_views_agree_and_uses_the_full_queue() -> None:
    torch.manual_seed(0)
    head = SwAVHead(in_features=16, hidden_dim=32, output_dim=8, num_prototypes=10).eval()
    head.normalize_prototypes()
    batch, views = 32, 4
    one_view = torch.randn(batch, 16)
    agreeing = head(one_view.repeat(views, 1))
    random_views = head(torch.randn(views * batch, 16))
    kwargs = dict(batch_size=batch, assign_views=[0, 1], prototypes=head.prototypes.weight)
    loss_agree, loss_random = swav_loss(*agreeing, **kwargs), swav_loss(*random_views, **kwargs)
    assert torch.isfinite(loss_agree) and torch.isfinite(loss_random)
    assert loss_agree < loss_random

    queue = FeatureQueue(num_views=2, length=batch, dim=8)
    first = swav_loss(*random_views, **kwargs, queue=queue, use_queue=True)  # fills the queue, cannot use it yet
    assert torch.allclose(first, loss_random) and queue.full
    with_queue = swav_loss(*agreeing, **kwargs, queue=queue, use_queue=True)
    assert not torch.allclose(with_queue, loss_agree)  # codes now come from Sinkhorn over batch + queue
    assert torch.allclose(swav_loss(*agreeing, **kwargs, queue=queue, use_queue=False), loss_agree)


def test_swav_loss_names_a_batch_size_that_does_not_divide_the_views() -> None:
    scores = torch.zeros(10, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        swav_loss(scores, scores, batch_size=3, assign_views=[0], prototypes=torch.zeros(4, 4))


# ------------------------------------------------------------------------------------------------ the data
def test_multicrop_gives_large_then_small_views() -> None:
    crop = MultiCrop(crop_sizes=[32, 16], num_crops=[2, 4], min_scales=[0.3, 0.1], max_scales=[1.0, 0.3],
                     blur_probability=0.5)  # fmt: skip
    views = crop(synthetic_image("rings", 40, __import__("numpy").random.default_rng(0)))
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 4
    with pytest.raises(ValueError, match="one entry per crop kind"):
        MultiCrop(crop_sizes=[32, 16], num_crops=[2], min_scales=[0.3, 0.1], max_scales=[1.0, 0.3])


def test_synthetic_images_are_an_image_folder_and_the_same_for_the_same_seed(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    write_synthetic_images(tmp_path / "a", images_per_class=3, size=16, num_classes=4, seed=1)
    write_synthetic_images(tmp_path / "b", images_per_class=3, size=16, num_classes=4, seed=1)
    folder = ImageFolder(str(tmp_path / "a"))
    assert len(folder) == 12 and len(folder.classes) == 4
    assert (tmp_path / "a/rings/00002.png").read_bytes() == (tmp_path / "b/rings/00002.png").read_bytes()


# ------------------------------------------------------------------------------------------------ 2 local peers
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_tiny_preset_with_two_local_peers_lowers_the_loss(run_id: str, tmp_path: Path) -> None:
    """``lightning-moshpit local 2 -- python recipes/swav/train.py fit --tiny``, as the README says, for 8 global
    steps of 64 images (the preset's 128 take about 8 s per global step here, compute-bound; 64 about 3.4 s). 6 steps
    were too few: one peer's loss fell by only 0.06 (sum of 2 steps) against step-to-step noise of about 0.1, in a
    run for issue 16. Both peers exit 0, their
    gradient rounds averaged both peers in most global steps, every loss is finite, and each peer's mean loss over the
    last two global steps is below its mean over the first two.

    The linear probe after fit must beat chance (4 classes: 0.25) by PROBE_MARGIN: a collapsed backbone (every image
    the same features) probes at chance (0.242 measured, docs/recipes.md); runs of this test probed 0.32 to 0.34. The
    preset's 160 images per class leave 128 held-out images, whose accuracy has a standard error of about 0.04; 640 per
    class (512 held-out) bring it to 0.02. Both peers end at the same global step with the same model, so
    they report the same probe accuracy."""
    result = run_cli(
        ["local", "2", "--run-id", run_id, "--", sys.executable, str(RECIPE / "train.py"), "fit", "--tiny",
         "--model.max_global_steps", str(STEPS), "--data.batch_size", "16", "--trainer.strategy.init_args.target_batch_size",
         "64", "--data.synthetic_images_per_class", "640", "--progress.history_path",
         str(tmp_path / "history{peer}.jsonl"), "--probe.baseline", "false",
         "--probe.report_file", str(tmp_path / "probe{peer}.json")],
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    probes = []
    for peer in range(2):
        rows = read_history(tmp_path / f"history{peer}.jsonl", STEPS)
        assert averaged_both_peers_in_most_rounds(rows), rows
        peer_losses = losses(rows)
        assert sum(peer_losses[-2:]) < sum(peer_losses[:2]), f"peer {peer}: loss did not fall: {rows}"
        probes.append(json.loads((tmp_path / f"probe{peer}.json").read_text()))
        print(f"peer {peer}: losses {[round(x, 3) for x in peer_losses]}; {sum(r['group_size'] == 2 for r in rows)}/{STEPS} "
              f"steps averaged both peers; probe {probes[-1]}")  # fmt: skip
        assert probes[-1]["global_step"] == STEPS, probes[-1]
        assert probes[-1]["accuracy"] >= 0.25 + PROBE_MARGIN, probes[-1]
    assert probes[0]["accuracy"] == pytest.approx(probes[1]["accuracy"], abs=0.01), probes


#: Global steps of the 2-peer run, and how far above chance (0.25) its linear probe must be (see the test's docstring).
STEPS = 8
PROBE_MARGIN = 0.04
