"""Does Editable Training make edits local? A baseline and an Editable-trained MLP on scikit-learn's digits.

Both models have the same architecture, initial weights, data order, optimizer and epochs; the only difference is the
``EditableTraining`` callback. Each is then edited 1,000 times: a held-out sample (never trained on, never in the
test set) gets a uniformly random wrong label, the editor (the same for both models) changes only the editable layer
until the model predicts that label, and the edited model's test error is measured. Every edit starts from the
unedited model. Reported per model: base test error, edit success rate (within ``max_steps``), mean editor steps and
drawdown (test error after one edit minus base error, averaged over the edits), as in Sinitsin et al., ICLR 2020.
The baseline is also edited with a much gentler editor, to check that its drawdown is not just a too-large step. The
whole comparison runs once per seed (``--seeds``, default 0 1 2: a new split, initialization and set of edits each).

    python benchmarks/editable.py            # writes docs/benchmarks/editable.json and the table in docs/editable.md

Everything is offline (``sklearn.datasets.load_digits``), seeded, and runs on one CPU thread in about 2 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_moshpit.callbacks import EditableTraining, evaluate_edits, random_label_edits

TABLE_BEGIN, TABLE_END = "<!-- editable-benchmark:begin -->", "<!-- editable-benchmark:end -->"


class DigitsMLP(L.LightningModule):
    """64 → hidden → hidden → 10 with ReLU; ``net.2`` is the second hidden layer, ``net.4`` the classifier."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )  # fmt: skip
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def split_digits(seed: int, num_test: int, num_edit_pool: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / test / edit-pool split of the 1,797 digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    test, pool, train = order[:num_test], order[num_test : num_test + num_edit_pool], order[num_test + num_edit_pool :]
    return {"train": (x[train], y[train]), "test": (x[test], y[test]), "pool": (x[pool], y[pool])}


def train(data: tuple[torch.Tensor, torch.Tensor], seed: int, args: argparse.Namespace,
          callback: Optional[EditableTraining]) -> tuple[DigitsMLP, float]:  # fmt: skip
    """Same seed, same init, same data order for both models; only the callback differs."""
    L.seed_everything(seed, verbose=False)
    model = DigitsMLP(hidden=args.hidden, lr=args.lr)
    loader = DataLoader(TensorDataset(*data), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback] if callback else [])  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, loader)
    return model.eval(), time.perf_counter() - started


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train both models on one seed's split and evaluate the same edits on each."""
    data = split_digits(seed, args.num_test, args.num_edit_pool)
    edits = random_label_edits(*data["pool"], args.edits, num_classes=10, seed=seed + 1)
    test_loader = DataLoader(TensorDataset(*data["test"]), batch_size=len(data["test"][0]))
    editor = {"editable": args.editable, "editor": args.editor, "lr": args.editor_lr, "max_steps": args.max_steps}
    gentle = {**editor, "editor": "gd", "lr": args.gentle_lr, "max_steps": args.gentle_max_steps}
    rows = {}
    for name in ("baseline", "editable_training"):
        callback = None
        if name == "editable_training":
            callback = EditableTraining(**editor, c_edit=args.c_edit, c_loc=args.c_loc, seed=seed)
        model, train_seconds = train(data["train"], seed, args, callback)
        evaluations = {name: editor}
        if name == "baseline":  # is the baseline's drawdown just a too-large editor step? Try a gentler editor too.
            evaluations["baseline_gentle_editor"] = gentle
        for row, settings in evaluations.items():
            started = time.perf_counter()
            result = evaluate_edits(model, test_loader, edits, **settings)
            rows[row] = {**result.as_dict(), "train_seconds": train_seconds,
                         "eval_seconds": time.perf_counter() - started}  # fmt: skip
            print(f"seed {seed} {row}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[row].items()), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run (split, init) per seed")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for both models")
    parser.add_argument("--editable", default="net.2.*", help="which parameters edits change (the 2nd hidden layer)")
    parser.add_argument("--editor", default="gd", choices=["gd", "momentum", "rmsprop"])
    parser.add_argument("--editor-lr", type=float, default=0.1)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--gentle-lr", type=float, default=0.01, help="the baseline's extra, gentler editor: gd lr")
    parser.add_argument("--gentle-max-steps", type=int, default=50)
    parser.add_argument("--c-edit", type=float, default=0.01)
    parser.add_argument("--c-loc", type=float, default=0.1)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--num-edit-pool", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/editable.json"))
    parser.add_argument("--doc", type=Path, default=Path("docs/editable.md"), help="page whose table is replaced")
    parser.add_argument("--no-write", action="store_true", help="print only (for tuning runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    per_seed = {seed: run_seed(seed, args) for seed in args.seeds}
    names = list(per_seed[args.seeds[0]])
    mean = {name: {key: sum(per_seed[s][name][key] for s in args.seeds) / len(args.seeds)
                   for key in per_seed[args.seeds[0]][name]} for name in names}  # fmt: skip
    ratios = [per_seed[s]["baseline"]["drawdown"] / max(per_seed[s]["editable_training"]["drawdown"], 1e-12)
              for s in args.seeds]  # fmt: skip
    total_seconds = time.perf_counter() - started
    print(f"drawdown ratio baseline / editable training per seed: {[round(r, 2) for r in ratios]}")
    print(f"total {total_seconds:.0f} s")
    report = {
        "command": "python benchmarks/editable.py",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "no_write"},
        "mean_over_seeds": mean,
        "per_seed": per_seed,
        "drawdown_ratio_per_seed": ratios,
        "total_seconds": total_seconds,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
    }
    if args.no_write:
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.doc.exists():
        page = args.doc.read_text()
        table = markdown_table(args, mean, per_seed, ratios)
        pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
        args.doc.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{table}{TABLE_END}", page))
    print(f"wrote {args.out} and the table in {args.doc}")


def markdown_table(args: argparse.Namespace, mean: dict[str, dict[str, float]],
                   per_seed: dict[int, dict[str, dict[str, float]]], ratios: list[float]) -> str:  # fmt: skip
    editor = f"{args.editor}, lr {args.editor_lr}, ≤ {args.max_steps} steps"
    labels = {
        "baseline": ("Baseline", editor),
        "baseline_gentle_editor": ("Baseline", f"gd, lr {args.gentle_lr}, ≤ {args.gentle_max_steps} steps"),
        "editable_training": (f"Editable Training (c_edit {args.c_edit}, c_loc {args.c_loc})", editor),
    }
    seeds = list(per_seed)
    lines = [
        f"Mean over seeds {seeds}; {args.edits} edits per seed and model; edits change `{args.editable}` only.",
        "",
        "| Training | Editor | Base test error | Edit success rate | Mean editor steps | Drawdown | "
        "Drawdown per seed | Train time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("baseline", "baseline_gentle_editor", "editable_training"):
        row, (training, used) = mean[name], labels[name]
        drawdowns = ", ".join(f"{100 * per_seed[s][name]['drawdown']:.2f}%" for s in seeds)
        lines.append(
            f"| {training} | {used} | {100 * row['base_error']:.2f}% | {100 * row['success_rate']:.1f}% | "
            f"{row['mean_steps']:.2f} | {100 * row['drawdown']:.2f}% | {drawdowns} | {row['train_seconds']:.0f} s |"
        )
    lines += ["", "Drawdown ratio, baseline / Editable Training, same editor: "
              + ", ".join(f"{r:.1f}×" for r in ratios) + " (per seed)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
