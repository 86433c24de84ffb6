"""Pretrain ALBERT (masked LM + sentence-order prediction) with whoever joins the swarm: the DeDLOC/sahajBERT recipe.

    python recipes/albert/train.py fit --tiny                 # a few-layer ALBERT on CPU, on stdlib docstrings
    python recipes/albert/train.py fit --data.text_files '[corpus.txt]'            # the full-size DeDLOC preset
    lightning-moshpit local 2 -- python recipes/albert/train.py fit --tiny          # two peers on this machine

The first peer starts a swarm and prints the command that joins it. Every hyperparameter is a LightningCLI argument
(``--help`` lists them); ``configs/full.yaml`` holds the DeDLOC defaults and is always read first, ``--tiny`` is
``--config recipes/albert/configs/tiny.yaml`` on top of it. See README.md beside this file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from corpus import (
    hub_dataset_documents,
    load_or_train_tokenizer,
    make_examples,
    stdlib_docstrings,
    text_file_documents,
)
from timm.optim import Lamb
from torch.utils.data import DataLoader
from transformers import AlbertConfig, AlbertForPreTraining, DataCollatorForLanguageModeling, PreTrainedTokenizerFast
from transformers.optimization import get_linear_schedule_with_warmup

import lightning_moshpit  # noqa: F401  (registers the "moshpit" strategy names)
from lightning_moshpit.lightning_cli import SwarmCLI

HERE = Path(__file__).resolve().parent


class PretrainingData(L.LightningDataModule):
    """ALBERT pretraining batches from text files, a Hugging Face dataset, or the docstrings of Python's stdlib.

    Exactly one source is used: ``text_files``, else ``dataset_name``, else (``stdlib_docstrings=True``) the
    built-in offline corpus. Without ``tokenizer`` a BPE tokenizer is trained on the corpus with the
    ``tokenizers`` library (see ``corpus.py``); the model's vocabulary size follows it.

    Args:
        text_files: Plain-text files; paragraphs separated by blank lines are documents.
        dataset_name: A Hugging Face dataset (e.g. ``wikitext``); needs ``pip install datasets`` and the internet.
        dataset_config: Its configuration (e.g. ``wikitext-103-raw-v1``).
        dataset_split: Its split.
        text_column: Its text column.
        stdlib_docstrings: Use the docstrings of about 60 standard-library modules (offline; the tiny preset).
        tokenizer: A hub name, a directory or a ``tokenizer.json``; ``None`` trains one on the corpus.
        vocab_size: Vocabulary size of a trained tokenizer.
        max_seq_length: Tokens per example, ``[CLS] A [SEP] B [SEP]`` included (DeDLOC: 512).
        short_seq_probability: Share of examples made shorter on purpose (ALBERT: 0.1).
        mlm_probability: Share of tokens to mask (BERT/ALBERT: 0.15).
        batch_size: Examples per local batch. The *global* batch is the strategy's ``target_batch_size``.
        num_workers: DataLoader worker processes.
        max_documents: Use at most this many documents (quick experiments); ``None`` uses all.
        cache_dir: Where trained tokenizers are cached.
    """

    def __init__(
        self,
        text_files: Optional[list[str]] = None,
        dataset_name: Optional[str] = None,
        dataset_config: Optional[str] = None,
        dataset_split: str = "train",
        text_column: str = "text",
        stdlib_docstrings: bool = False,
        tokenizer: Optional[str] = None,
        vocab_size: int = 32000,
        max_seq_length: int = 512,
        short_seq_probability: float = 0.1,
        mlm_probability: float = 0.15,
        batch_size: int = 4,
        num_workers: int = 0,
        max_documents: Optional[int] = None,
        cache_dir: str = "~/.cache/lightning_moshpit/albert",
    ) -> None:
        super().__init__()
        if not (text_files or dataset_name or stdlib_docstrings):
            raise ValueError(
                "no training text: pass `--data.text_files '[a.txt, b.txt]'`, `--data.dataset_name NAME` "
                "(with `datasets` installed) or `--data.stdlib_docstrings true` (offline; what --tiny uses)"
            )
        if max_seq_length < 8:
            raise ValueError(f"`max_seq_length` must be at least 8, got {max_seq_length}")
        self.save_hyperparameters()
        self._tokenizer: Optional[PreTrainedTokenizerFast] = None
        self._documents: Optional[list[str]] = None
        self.train_examples: list[dict[str, Any]] = []

    @property
    def documents(self) -> list[str]:
        if self._documents is None:
            h = self.hparams
            if h.text_files:
                documents = text_file_documents(h.text_files)
            elif h.dataset_name:
                documents = hub_dataset_documents(h.dataset_name, h.dataset_config, h.dataset_split, h.text_column)
            else:
                documents = stdlib_docstrings()
            self._documents = documents[: h.max_documents] if h.max_documents else documents
            if not self._documents:
                raise ValueError("the training text has no documents (are the files empty?)")
        return self._documents

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        if self._tokenizer is None:
            cache_dir = Path(self.hparams.cache_dir).expanduser()
            self._tokenizer = load_or_train_tokenizer(
                self.hparams.tokenizer, self.documents, self.hparams.vocab_size, cache_dir
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (linked to ``model.vocab_size`` by the CLI)."""
        return len(self.tokenizer)

    def setup(self, stage: str) -> None:
        if not self.train_examples:
            self.train_examples = make_examples(
                self.documents, self.tokenizer, self.hparams.max_seq_length, self.hparams.short_seq_probability
            )

    def train_dataloader(self) -> DataLoader:
        # Each peer shuffles (and masks) differently, so peers contribute different samples to each global batch.
        shuffle = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        collator = DataCollatorForLanguageModeling(self.tokenizer, mlm_probability=self.hparams.mlm_probability)
        return DataLoader(self.train_examples, batch_size=self.hparams.batch_size, shuffle=True, drop_last=True,
                          collate_fn=collator, generator=shuffle, num_workers=self.hparams.num_workers)  # fmt: skip


class AlbertPretraining(L.LightningModule):
    """``transformers.AlbertForPreTraining`` from a config, trained with LAMB and linear warmup/decay (DeDLOC).

    The loss is the sum of the masked-LM and sentence-order cross-entropies (``AlbertForPreTraining`` computes it).
    Learning-rate schedule and optimizer steps count *global* steps: the strategy steps the scheduler once per
    swarm step of ``target_batch_size`` samples.

    Args:
        vocab_size: Set from the tokenizer by the CLI.
        embedding_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: ALBERT's shape
            (full preset: ALBERT-large, 128 / 1024 / 24 / 16 / 4096).
        max_position_embeddings: Longest input the model accepts (at least ``data.max_seq_length``).
        lr: LAMB learning rate for the global batch (DeDLOC: 0.00176 for 4096 sequences).
        warmup_steps: Global steps of linear warmup (DeDLOC: 5000).
        total_steps: Global steps after which the linear decay reaches 0 (hivemind's ALBERT example: 125000).
        weight_decay: LAMB weight decay, not applied to biases and LayerNorm (DeDLOC: 0.01).
        eps: LAMB epsilon (DeDLOC: 1e-6).
        max_grad_norm: LAMB's global gradient-norm clipping (hivemind's ALBERT example: 4.0).
        init_seed: Seed of the initial weights; the same on every peer, so all peers start from one model.
    """

    def __init__(
        self,
        vocab_size: int = 32000,
        embedding_size: int = 128,
        hidden_size: int = 1024,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int = 4096,
        max_position_embeddings: int = 512,
        lr: float = 0.00176,
        warmup_steps: int = 5000,
        total_steps: int = 125000,
        weight_decay: float = 0.01,
        eps: float = 1e-6,
        max_grad_norm: float = 4.0,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = AlbertConfig(
            vocab_size=vocab_size, embedding_size=embedding_size, hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
        )  # fmt: skip
        with torch.random.fork_rng():  # same initial weights on every peer, whatever the global seed
            torch.manual_seed(init_seed)
            self.model = AlbertForPreTraining(config)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        output = self.model(**batch)
        self.log("train_loss", output.loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return output.loss

    def configure_optimizers(self) -> dict[str, Any]:
        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        decay = [p for n, p in self.named_parameters() if not n.endswith(no_decay)]
        rest = [p for n, p in self.named_parameters() if n.endswith(no_decay)]
        h = self.hparams
        # timm's Lamb (You et al., 2020), the optimizer DeDLOC used; max_grad_norm clips the global gradient norm.
        optimizer = Lamb([{"params": decay, "weight_decay": h.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                         lr=h.lr, eps=h.eps, max_grad_norm=h.max_grad_norm)  # fmt: skip
        scheduler = get_linear_schedule_with_warmup(optimizer, h.warmup_steps, h.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class AlbertCLI(SwarmCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main() -> None:
    torch.set_num_threads(int(os.environ.get("RECIPE_NUM_THREADS", "1")))  # peers often share a machine's cores
    AlbertCLI(AlbertPretraining, PretrainingData, shorthands={"--tiny": HERE / "configs" / "tiny.yaml"},
              default_config=HERE / "configs" / "full.yaml", save_config_callback=None)  # fmt: skip


if __name__ == "__main__":
    main()
