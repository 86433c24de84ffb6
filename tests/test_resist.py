"""ResIST and IST in one process: sub-networks, evaluation scaling, holder-weighted averaging, reassembly, errors.

The swarm runs (real peer processes) are in tests/test_resist_swarm.py; timm and torchvision models in
tests/test_resist_timm.py.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit import IndependentSubnet, ResIST
from lightning_moshpit.callbacks.ist import partition_neurons
from lightning_moshpit.callbacks.resist import find_residual_blocks, partition_blocks
from lightning_moshpit.callbacks.subnets import round_seed
from lightning_moshpit.holder_averaging import HolderMasks, holder_weighted_average
from lightning_moshpit.testing.resnets import PreActBlock, PreActResNet


def small_resnet() -> PreActResNet:
    torch.manual_seed(0)
    return PreActResNet(depths=(1, 1, 5, 1), widths=(4, 8, 8, 8), in_channels=1, num_classes=3)


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- ResIST: structure
def test_finds_the_non_downsampling_blocks_of_the_third_stage() -> None:
    model = small_resnet()
    blocks = find_residual_blocks(model)
    assert [b.path for b in blocks] == ["layer3.1", "layer3.2", "layer3.3", "layer3.4"]  # layer3.0 downsamples
    assert [b.path for b in find_residual_blocks(model, stages=(2, 3))] == ["layer3.1", "layer3.2", "layer3.3",
                                                                             "layer3.4"]  # fmt: skip
    named = find_residual_blocks(model, blocks=["layer3.2", "layer3.4"])
    assert [b.path for b in named] == ["layer3.2", "layer3.4"]
    selected = find_residual_blocks(model, blocks=lambda name, m: isinstance(m, PreActBlock) and name.endswith(".1"))
    assert [b.path for b in selected] == ["layer3.1"]  # layer1.0, layer2.0, layer4.0 are first blocks (".0")


def test_partition_is_a_round_robin_split_of_one_permutation_and_is_the_same_for_the_same_seed() -> None:
    subnets = partition_blocks(10, 4, min_blocks=0, seed=7)
    assert sorted(b for s in subnets for b in s) == list(range(10))  # disjoint and complete
    assert sorted(len(s) for s in subnets) == [2, 2, 3, 3]
    assert subnets == partition_blocks(10, 4, min_blocks=0, seed=7)
    assert subnets != partition_blocks(10, 4, min_blocks=0, seed=8)
    overlapping = partition_blocks(10, 4, min_blocks=4, seed=7)
    assert all(len(s) == 4 and len(set(s)) == 4 for s in overlapping)
    assert all(set(small) <= set(big) for small, big in zip(subnets, overlapping))  # extras are added, none removed
    assert round_seed("run", 3) == round_seed("run", 3) != round_seed("run", 4)


def test_subnetwork_forward_equals_the_full_model_with_the_skipped_blocks_removed() -> None:
    model = small_resnet()
    reference = copy.deepcopy(model)
    callback = ResIST(num_subnets=2)
    callback.attach(model)
    kept = [0, 3]  # layer3.1 and layer3.4 of the partitionable blocks
    callback.set_subnet(kept)
    reference.layer3 = nn.Sequential(reference.layer3[0], reference.layer3[1], reference.layer3[4])
    model.train(), reference.train()
    x = images()
    out = model(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    out.sum().backward()
    skipped = [model.layer3[2], model.layer3[3]]
    assert all(p.grad is None for block in skipped for p in block.parameters())  # skipped blocks are not trained
    assert all(p.grad is not None for p in model.layer3[1].parameters())


def test_evaluation_uses_every_block_with_its_residual_branch_scaled_by_one_over_s() -> None:
    model = small_resnet()
    reference = copy.deepcopy(model)
    ResIST(num_subnets=4).attach(model)

    class Scaled(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + (self.block(x) - x) / 4  # pre-activation block: x + F(x) -> x + F(x) / S

    reference.layer3 = nn.Sequential(reference.layer3[0], *[Scaled(b) for b in list(reference.layer3)[1:]])
    model.eval(), reference.eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        unscaled = copy.deepcopy(reference)
        unscaled.layer3 = nn.Sequential(*[getattr(b, "block", b) for b in unscaled.layer3])
        assert not torch.allclose(model(x), unscaled(x))  # the scaling changes the output


# ----------------------------------------------------------------------------------------------- holder averaging
def test_holder_weighted_average_on_hand_made_tensors_including_a_tensor_nobody_holds() -> None:
    values = [
        [torch.tensor([1.0, 2.0]), torch.tensor([10.0]), torch.tensor([5.0])],
        [torch.tensor([3.0, 6.0]), torch.tensor([20.0]), torch.tensor([7.0])],
        [torch.tensor([5.0, 10.0]), torch.tensor([99.0]), torch.tensor([9.0])],
    ]
    masks = [
        HolderMasks(sends=frozenset({0, 1}), needs=frozenset({0, 1, 2})),
        HolderMasks(sends=frozenset({0, 1}), needs=frozenset({0, 2})),
        HolderMasks(sends=frozenset({0}), needs=frozenset({1})),  # trained tensor 0 only; wants tensor 1 next
    ]
    result = holder_weighted_average(values, masks)
    # tensor 0: held by all three -> mean; tensor 1: held by members 0 and 1 -> (10 + 20) / 2, not touching 99;
    # tensor 2: held by nobody -> everybody keeps its own value, even those who need it
    expected = [
        [torch.tensor([3.0, 6.0]), torch.tensor([15.0]), torch.tensor([5.0])],
        [torch.tensor([3.0, 6.0]), torch.tensor([20.0]), torch.tensor([7.0])],  # does not need tensor 1: keeps it
        [torch.tensor([5.0, 10.0]), torch.tensor([15.0]), torch.tensor([9.0])],  # does not need tensor 0: keeps it
    ]
    for got, want in zip(result, expected):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_members_at_an_older_round_neither_send_nor_receive() -> None:
    values = [[torch.tensor([1.0])], [torch.tensor([3.0])], [torch.tensor([100.0])]]
    everything = frozenset({0})
    masks = [HolderMasks(everything, everything, round=5), HolderMasks(everything, everything, round=5),
             HolderMasks(everything, everything, round=4)]  # fmt: skip
    result = holder_weighted_average(values, masks)
    assert [r[0].item() for r in result] == [2.0, 2.0, 100.0]


# ----------------------------------------------------------------------------------------------- single process
class ResNetModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_resnet()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Watch(L.Callback):
    """Records, per batch, which partitioned blocks ran and how much optimizer state existed."""

    def __init__(self, resist: ResIST) -> None:
        self.resist, self.active, self.state_sizes = resist, [], []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.active.append(tuple(i for i, s in enumerate(self.resist._switches) if s.active))
        self.state_sizes.append(len(trainer.optimizers[0].state))


def test_single_process_training_draws_a_new_subnetwork_every_local_steps_and_resets_momentum() -> None:
    data = TensorDataset(torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,)))
    resist = ResIST(num_subnets=2, local_steps=3)
    watch = Watch(resist)  # after `resist` in the list: sees the state before the next round resets it
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[watch, resist])  # fmt: skip
    trainer.fit(ResNetModule(), DataLoader(data, batch_size=8))
    assert resist.round == 4
    rounds = [watch.active[i:i + 3] for i in range(0, 12, 3)]
    assert all(len(set(r)) == 1 for r in rounds)  # one sub-network per round
    for index, r in enumerate(rounds):
        assert list(r[0]) == resist.subnet_blocks(index, index % 2)  # single process: sub-network r mod S
        assert 0 < len(r[0]) < 4
    # momentum is rebuilt from scratch each round: the optimizer holds state only for the round's sub-network
    # (without the reset it would keep the momentum of every block trained in earlier rounds)
    params_per_block = [len(list(b.module.parameters())) for b in resist.blocks]
    total = sum(1 for _ in trainer.lightning_module.parameters())
    for batch, size in enumerate(watch.state_sizes):
        kept = set(resist.subnet_blocks(batch // 3, (batch // 3) % 2))
        assert size == total - sum(n for b, n in enumerate(params_per_block) if b not in kept)
    assert all(s.active for s in resist._switches)  # after training, every block is on


# ----------------------------------------------------------------------------------------------- IST
def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))


def test_ist_trains_only_its_neurons_rows_and_columns() -> None:
    model = mlp()
    ist = IndependentSubnet(num_subnets=3)
    ist.attach(model)
    plan = ist.plan(0)
    ist._activate(plan, 1)
    model.train()
    model(torch.randn(4, 5)).sum().backward()
    first, second, last = model[0], model[2], model[4]
    g1, g2 = plan.groups[0][1], plan.groups[1][1]
    out1 = torch.ones(12, dtype=torch.bool)
    out1[g1] = False
    out2 = torch.ones(8, dtype=torch.bool)
    out2[g2] = False
    assert first.weight.grad[out1].abs().sum() == 0 and first.bias.grad[out1].abs().sum() == 0
    assert second.weight.grad[:, out1].abs().sum() == 0 and second.weight.grad[out2].abs().sum() == 0
    assert last.weight.grad[:, out2].abs().sum() == 0
    assert first.weight.grad[g1].abs().sum() > 0 and last.bias.grad.abs().sum() > 0


def test_ist_reassembly_of_disjoint_parts_is_exact() -> None:
    """S peers each change only their group's rows and columns; a holder-weighted round rebuilds the full model."""
    num_subnets = 3
    base = mlp()
    ist = IndependentSubnet(num_subnets=num_subnets)
    ist.attach(base)
    plan = partition_neurons([12, 8], num_subnets, seed=5)
    peers, expected = [], copy.deepcopy(base)
    for k in range(num_subnets):
        peer = copy.deepcopy(base)
        g1, g2 = plan.groups[0][k], plan.groups[1][k]
        with torch.no_grad():  # "training" = a distinctive change to exactly what group k holds
            for target in (peer, expected):
                target[0].weight[g1] = 100.0 * (k + 1) + torch.arange(5.0)
                target[0].bias[g1] = -float(k + 1)
                target[2].weight[g2[:, None], g1[None, :]] = 10.0 * (k + 1)
                target[2].bias[g2] = 0.5 * (k + 1)
                target[4].weight[:, g2] = 7.0 * (k + 1)
            peer[4].bias.fill_(float(k))  # the shared output bias is averaged: (0 + 1 + 2) / 3
        peers.append(peer)
    with torch.no_grad():
        expected[4].bias.fill_(1.0)
    slots = []
    for peer in peers:
        copy_ist = IndependentSubnet(num_subnets=num_subnets)
        copy_ist.attach(peer)
        slots.append(copy_ist.gather(plan))
    masks = [ist._masks(plan, k, None, None) for k in range(num_subnets)]
    shared = {len(slots[0]) - 1}  # the output bias
    assert all(len(m.sends) > len(shared) for m in masks)
    assert all((a.sends & b.sends) == shared for a in masks for b in masks if a is not b)  # disjoint parts
    averaged = holder_weighted_average(slots, masks)
    for k, peer in enumerate(peers):
        copy_ist = IndependentSubnet(num_subnets=num_subnets)
        copy_ist.attach(peer)
        copy_ist._averaged_tensors()
        copy_ist.scatter(plan, averaged[k])
        for got, want in zip(peer.parameters(), expected.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- errors
def test_clear_errors_for_bad_models_and_options() -> None:
    with pytest.raises(ValueError, match="num_subnets"):
        ResIST(num_subnets=0)
    with pytest.raises(ValueError, match="num_subnets"):
        IndependentSubnet(num_subnets=-1)
    with pytest.raises(ValueError, match="local_steps"):
        ResIST(local_steps=0)
    with pytest.raises(ValueError, match="no `layer3`"):
        ResIST().attach(nn.Sequential(nn.Linear(3, 3)))
    shallow = PreActResNet(depths=(1, 1, 1, 1), widths=(4, 8, 8, 8))  # layer3 has only its downsampling block
    with pytest.raises(ValueError, match="No partitionable residual blocks"):
        ResIST().attach(shallow)
    with pytest.raises(ValueError, match="does not have"):
        ResIST(blocks=["layer9.1"]).attach(small_resnet())
    with pytest.raises(ValueError, match="min_blocks"):
        ResIST(min_blocks=9).attach(small_resnet())
    with pytest.raises(ValueError, match="at least two chained nn.Linear"):
        IndependentSubnet().attach(nn.Sequential(nn.Linear(3, 3)))


def test_in_a_swarm_the_callbacks_need_local_updates() -> None:
    from lightning_moshpit import MoshpitStrategy

    data = TensorDataset(torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,)))
    strategy = MoshpitStrategy(run_id="resist_needs_local_updates", host_maddrs="/ip4/127.0.0.1/tcp/0")
    trainer = L.Trainer(strategy=strategy, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ResIST(num_subnets=2)])  # fmt: skip
    with pytest.raises(ValueError, match="local_updates=True"):
        trainer.fit(ResNetModule(), DataLoader(data, batch_size=8))


def test_single_process_ist_switches_groups_every_round_and_evaluates_with_every_neuron() -> None:
    class MLPModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp()

        def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = MLPModule()
    ist = IndependentSubnet(num_subnets=2, local_steps=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ist])  # fmt: skip
    before = copy.deepcopy(module.net)
    data = TensorDataset(torch.randn(24, 5), torch.randint(0, 3, (24,)))
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert ist.round == 3
    changed = set((module.net[0].weight != before[0].weight).any(dim=1).nonzero().flatten().tolist())
    trained = {int(i) for r in range(3) for i in ist.plan(r).groups[0][r % 2]}  # single process: group r mod S
    assert changed and changed <= trained  # only rows of the groups this process trained moved
    module.net.eval()
    x = torch.randn(3, 5)
    with torch.no_grad():
        manual = module.net[4](torch.relu(module.net[2](torch.relu(module.net[0](x)))))
        torch.testing.assert_close(module.net(x), manual)  # no mask and no scaling at evaluation
