"""One real peer (its own DHT and p2pd on 127.0.0.1) running Trainer.fit: counting, schedulers, checkpoints, precision."""

from __future__ import annotations

import multiprocessing
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.testing.peer import TinyClassifier, make_task

torch.set_num_threads(1)


def make_strategy(run_id: str, **kwargs) -> MoshpitStrategy:
    kwargs.setdefault("target_batch_size", 64)
    return MoshpitStrategy(run_id=run_id, host_maddrs="/ip4/127.0.0.1/tcp/0", matchmaking_time=0.5,
                           averaging_timeout=5.0, **kwargs)  # fmt: skip


def make_trainer(strategy: MoshpitStrategy, **kwargs) -> L.Trainer:
    kwargs.setdefault("max_steps", 20)
    kwargs.setdefault("max_epochs", -1)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)  # fmt: skip


def loader(num_samples: int = 512, batch_size: int = 16) -> DataLoader:
    return DataLoader(make_task(num_samples), batch_size=batch_size)


@pytest.mark.timeout(120)
def test_one_global_step_per_target_batch_of_samples(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=64)
    trainer = make_trainer(strategy, max_steps=40)
    trainer.fit(TinyClassifier(), loader(batch_size=16))
    assert trainer.global_step == 40  # local optimizer steps
    assert strategy.global_step == 40 * 16 // 64  # 640 samples / 64 per global step
    assert trainer.callback_metrics["moshpit/global_step"] >= 9
    assert trainer.callback_metrics["moshpit/num_peers"] == 1
    assert strategy.swarm_optimizer is None  # left the swarm after fit
    assert not [child for child in multiprocessing.active_children() if child.is_alive()]  # no averager/DHT process


@pytest.mark.timeout(120)
def test_accumulate_grad_batches_counts_every_sample(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=64)
    trainer = make_trainer(strategy, max_steps=10, accumulate_grad_batches=4)
    trainer.fit(TinyClassifier(), loader(batch_size=16))
    assert trainer.global_step == 10  # optimizer steps, each over 4 batches of 16
    assert strategy.global_step == 10 * 4 * 16 // 64


@pytest.mark.timeout(120)
def test_short_last_batch_is_counted_by_its_real_size(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=40)
    trainer = make_trainer(strategy, max_steps=-1, max_epochs=4)
    trainer.fit(TinyClassifier(), loader(num_samples=40, batch_size=16))  # batches of 16, 16, 8
    assert trainer.global_step == 12
    assert strategy.samples_contributed == 4 * 40  # not 12 * 16 = 192
    assert strategy.global_step == 4


@pytest.mark.timeout(120)
def test_scheduler_steps_once_per_global_step(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=64)
    trainer = make_trainer(strategy, max_steps=24)
    model = TinyClassifier(lr=0.1, scheduler=True)  # StepLR(step_size=1, gamma=0.5), interval="step"
    trainer.fit(model, loader(batch_size=16))
    assert strategy.global_step == 6
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(0.1 * 0.5**6)  # not 0.5**24, as per-batch stepping gives


class TwoOptimizers(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False  # Lightning itself allows several optimizers only in manual mode

    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.SGD(self.parameters(), lr=0.1)]


class Plateau(TinyClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "train_loss"}}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model_cls, match", [(TwoOptimizers, "exactly one optimizer"), (Plateau, "ReduceLROnPlateau")])
def test_unsupported_optimizer_setups_raise_clearly(run_id, model_cls, match) -> None:
    trainer = make_trainer(make_strategy(run_id))
    with pytest.raises(ValueError, match=match):
        trainer.fit(model_cls(), loader())


@pytest.mark.timeout(60)
def test_unreachable_initial_peer_fails_fast_naming_the_address(run_id) -> None:
    address = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWKRyCQB49DDZ7aXiL7cN447m31SW3NTFbtgoxkAyZbPQZ"
    strategy = make_strategy(run_id, initial_peers=[address], bootstrap_timeout=10)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match="tcp/9/p2p"):
        make_trainer(strategy).fit(TinyClassifier(), loader())
    assert time.monotonic() - started < 30


@pytest.mark.timeout(180)
def test_checkpoint_carries_global_step_and_resume_continues_from_it(run_id, tmp_path) -> None:
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
    strategy = make_strategy(run_id, target_batch_size=64)
    trainer = make_trainer(strategy, max_steps=24, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(TinyClassifier(batch_norm=True), loader(batch_size=16))
    assert strategy.global_step == 6
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 24
    assert saved["optimizer_states"][0]["state"]["local_epoch"] == 6
    assert "net.1.running_mean" in saved["state_dict"]

    resumed_strategy = make_strategy(run_id + "_resumed", target_batch_size=64)
    resumed = make_trainer(resumed_strategy, max_steps=40)
    resumed.fit(TinyClassifier(batch_norm=True), loader(batch_size=16), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == 40
    assert resumed_strategy.global_step == 6 + 16 * 16 // 64  # continued from global step 6, not from 0


@pytest.mark.timeout(120)
def test_bf16_mixed_precision_trains_on_cpu(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=32)
    trainer = make_trainer(strategy, max_steps=16, precision="bf16-mixed")
    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit(model, loader(batch_size=16))
    assert strategy.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="16-mixed precision needs a CUDA device")
def test_fp16_mixed_precision_trains_on_cuda(run_id) -> None:
    strategy = make_strategy(run_id, target_batch_size=32)
    trainer = L.Trainer(strategy=strategy, accelerator="cuda", devices=1, precision="16-mixed", max_steps=16,
                        logger=False, enable_progress_bar=False, enable_checkpointing=False)  # fmt: skip
    model = TinyClassifier()
    trainer.fit(model, loader(batch_size=16))
    assert strategy.global_step == 8
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.timeout(120)
def test_max_global_steps_ends_the_fit_there_whatever_the_trainer_limits(run_id) -> None:
    """max_steps=3 local batches would stop after 0 global steps; max_global_steps=5 lifts it and stops at 5 exactly."""
    strategy = make_strategy(run_id, target_batch_size=64, max_global_steps=5)
    trainer = make_trainer(strategy, max_steps=3, max_epochs=1)
    trainer.fit(TinyClassifier(), loader(num_samples=128, batch_size=16))  # 2 global steps per epoch
    assert strategy.global_step == 5
    assert trainer.global_step == 5 * 64 // 16  # local batches: it stopped at the first batch of global step 5
    assert trainer.callback_metrics["moshpit/rejected_records"] == 0


def test_max_global_steps_comes_from_the_environment_and_bad_values_name_the_setting(monkeypatch) -> None:
    monkeypatch.setenv("MOSHPIT_MAX_GLOBAL_STEPS", "7")
    assert MoshpitStrategy().max_global_steps == 7
    assert MoshpitStrategy(max_global_steps=3).max_global_steps == 3  # the argument wins
    monkeypatch.setenv("MOSHPIT_MAX_GLOBAL_STEPS", "seven")
    with pytest.raises(ValueError, match="MOSHPIT_MAX_GLOBAL_STEPS='seven' is not an integer"):
        MoshpitStrategy()
    monkeypatch.delenv("MOSHPIT_MAX_GLOBAL_STEPS")
    assert MoshpitStrategy().max_global_steps is None
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=f"`max_global_steps` must be a positive integer .*got {bad!r}"):
            MoshpitStrategy(max_global_steps=bad)
