"""ResIST on timm and torchvision ResNets (needs timm, which CI installs with torch 2.14.1 + torchvision 0.29.1)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_moshpit import ResIST

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def test_timm_resnet_blocks_are_found_skipped_and_scaled_through_drop_path() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnet26", num_classes=5, in_chans=1, pretrained=False)  # stages of 2 blocks
    reference = copy.deepcopy(model)
    callback = ResIST(num_subnets=2, stages=[2, 3])
    callback.attach(model)
    assert [b.path for b in callback.blocks] == ["layer2.1", "layer3.1"]  # the first block of a stage downsamples
    assert all(b.branch_end is b.module.bn3 for b in callback.blocks)  # no drop_path or se in resnet26
    x = torch.randn(2, 1, 32, 32)

    callback.set_subnet([1])  # layer2.1 is skipped
    model.train(), reference.train()
    reference.layer2 = nn.Sequential(reference.layer2[0])
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)

    model.eval()
    block = model.layer3[1]
    inputs = torch.randn(2, block.conv1.in_channels, 4, 4)
    with torch.no_grad():
        shortcut = inputs
        branch = block.bn3(block.conv3(block.act2(block.bn2(block.conv2(block.act1(block.bn1(block.conv1(inputs))))))))
        torch.testing.assert_close(block(inputs), block.act3(shortcut + branch / 2))  # post-activation: relu(x + F/S)


def test_torchvision_resnet_branch_is_scaled_before_the_final_relu() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5)
    callback = ResIST(num_subnets=4)
    callback.attach(model)
    assert [b.path for b in callback.blocks] == ["layer3.1"]
    block = model.layer3[1]
    assert callback.blocks[0].branch_end is block.bn2
    model.eval()
    inputs = torch.randn(2, 256, 4, 4)
    with torch.no_grad():
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(inputs)))))
        torch.testing.assert_close(block(inputs), torch.relu(inputs + branch / 4))
        model.train()
        callback.set_subnet([])
        torch.testing.assert_close(block(inputs), inputs)  # switched off: the identity


def test_timm_resnetv2_preactivation_blocks_are_found_in_stages_and_scaled_as_x_plus_f_over_s() -> None:
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_18", num_classes=5, in_chans=1, pretrained=False)
    callback = ResIST(num_subnets=2, stages=[2, 3])
    callback.attach(model)
    assert [b.path for b in callback.blocks] == ["stages.1.blocks.1", "stages.2.blocks.1"]
    block = model.stages[2].blocks[1]
    model.eval()
    inputs = torch.randn(2, block.conv1.in_channels, 4, 4)
    with torch.no_grad():
        branch = block.conv2(block.norm2(block.conv1(block.norm1(inputs))))
        torch.testing.assert_close(block(inputs), inputs + branch / 2)
