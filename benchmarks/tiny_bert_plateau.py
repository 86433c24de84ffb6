"""How many global steps the tiny-BERT recipe test needs: its model and task in one process, over many data orders.

``tests/recipes/test_hf_finetune.py`` fine-tunes a random-init 2-layer BERT on a two-topic task. Such a model sits on
a plateau at ln 2 before it learns, and the plateau's length depends on the batches drawn (and on dropout). A test
that stops too early fails now and then with a flat loss. This script trains the test's model, data, AdamW, schedule
and 64-text global batches without a swarm, once per data order, and prints per order the first step whose loss is
below 0.6 and the test's measure of learning (median loss of the first 3 steps minus the median of the last 3), then
how many orders fell by less than the test's bar::

    .venv-recipes/bin/python benchmarks/tiny_bert_plateau.py --orders 150 --steps 30

No swarm is involved: averaging two peers' gradients over a 64-text global batch takes the same step as one process
with 64-text batches, so this is the learning curve the swarm test sees, minus timing effects.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "recipes"))


def train_one_order(folder: Path, examples: list[dict], order: int, steps: int, lr: float) -> list[float]:
    """Losses of ``steps`` AdamW updates (the recipe's settings, warm-up 2 and decay over 100 steps) in one order."""
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        get_linear_schedule_with_warmup,
    )

    with torch.random.fork_rng():
        torch.manual_seed(0)  # the test's saved model, as every peer loads it
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    model.train()  # dropout on, as under Trainer.fit (from_pretrained returns the model in eval mode)
    no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)]},
              {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, 2, 100)
    collate = DataCollatorWithPadding(_tokenizer(folder))
    rng = random.Random(order)
    pool: list[dict] = []
    losses = []
    for _ in range(steps):
        if len(pool) < 64:
            pool += rng.sample(examples, len(examples))
        batch, pool = collate(pool[:64]), pool[64:]
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _tokenizer(folder: Path):  # noqa: ANN202  (a transformers tokenizer)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=150, help="data orders (runs) to train")
    parser.add_argument("--steps", type=int, default=30, help="global steps per run (the test's STEPS)")
    parser.add_argument("--lr", type=float, default=0.01, help="AdamW learning rate (the test's --model.lr)")
    args = parser.parse_args(argv)
    import test_hf_finetune as test  # the test's own model, data and bar

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        test.save_tiny_bert(folder / "bert")
        test.write_texts(folder / "train.csv", 400, seed=0)
        with (folder / "train.csv").open() as file:
            rows = list(csv.DictReader(file))
        labels = sorted({row["label"] for row in rows})
        encoded = _tokenizer(folder / "bert")([row["text"] for row in rows], truncation=True, max_length=16)
        examples = [{**{k: v[i] for k, v in encoded.items()}, "labels": labels.index(row["label"])}
                    for i, row in enumerate(rows)]  # fmt: skip
        falls = []
        for order in range(args.orders):
            losses = train_one_order(folder / "bert", examples, order, args.steps, args.lr)
            fall = statistics.median(losses[:3]) - statistics.median(losses[-3:])
            leaves = next((step for step, loss in enumerate(losses) if loss < 0.6), None)
            falls.append(fall)
            print(f"order {order}: loss below 0.6 from step {leaves}; fall {fall:.3f}", flush=True)
    short = sum(fall < test.FALL for fall in falls)
    print(f"{args.steps} steps at lr {args.lr}: {short} of {args.orders} orders fell by less than {test.FALL} "
          f"(least fall {min(falls):.3f}, median {statistics.median(falls):.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
