"""The Hugging Face fine-tuning recipe: the stdlib-docstring task's splits, and two local peers fine-tuning a tiny
random-init BERT saved to a temp dir, with and without ``--editable``.

The real pretrained MiniLM run (about 7 minutes on 2 cores) is not part of the suite; it is timed, with its accuracy,
in docs/recipes.md."""

from __future__ import annotations

import csv
import json
import random
import statistics
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the recipes need the `recipes` extra: pip install -e '.[recipes]'")

from cli_helpers import run_cli  # noqa: E402
from swarm_history import averaged_both_peers_in_most_rounds, losses, read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "hf_finetune"
sys.path.insert(0, str(RECIPE))
import make_stdlib_dataset  # noqa: E402  (recipes/hf_finetune/make_stdlib_dataset.py)

#: Two topics with disjoint vocabularies: a task a 2-layer random-init BERT learns in a few global steps.
TOPICS = {
    "weather": "rain sun cloud wind storm snow warm cold fog humid".split(),
    "cooking": "bake boil salt pepper oven pan knife fry sugar flour".split(),
}
FILLER = "the a of and it is was very today then".split()
#: Global steps of 64 texts in the two-peer tests (matchmaking 0.5 s on loopback), and the AdamW learning rate. The
#: random-init BERT sits on a plateau at ln 2 before it learns, for a number of updates that varies with the batches
#: drawn and the dropout masks, and at lr 0.01 its loss also spikes now and then. Measured without a swarm by
#: ``benchmarks/tiny_bert_plateau.py`` (this model, data, schedule and 64-text batches in one process, one run per
#: data order; "fell" is the test's measure below):
#:
#: - lr 0.01, 20 steps (the setting until stop 23): 2 of 100 orders fell by less than FALL (and 13 of 150 with dropout
#:   off), so the test failed now and then: 2 of about 15 clean-clone runs of stop 23 (loss 0.692 -> 0.681; accuracy
#:   0.80). Longer does not cure it: at 40 steps, 5 of 150 (one never left the plateau, four spiked at the end).
#: - lr 0.005, 30 steps: 0 of 250 orders (two runs, 100 + 150); the loss went below 0.6 after 10 to 23 updates, and
#:   the least fall was 0.47 (``--orders 150 --steps 30 --lr 0.005``: 0 of 150, least 0.472, median 0.667).
STEPS = 30
LR = 0.005
#: Least fall of the loss (median of the first 3 steps minus median of the last 3) in the two-peer tests: from ln 2 = 0.69
#: to below 0.39. Measured two-peer runs ended at 0.07 to 0.25 (issue 16's notes).
FALL = 0.3
#: Least share of the 20 edits (after fit, on held-out texts) that must succeed under ``--editable``. Measured: 20 of 20
#: in each run, but with 8.5 to 9.5 editor steps on average of the 10 allowed, so close to the limit: 0.75 leaves room.
EDIT_SUCCESS = 0.75


def write_texts(path: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for _ in range(count):
            label = rng.choice(sorted(TOPICS))
            words = [rng.choice(TOPICS[label] if rng.random() < 0.4 else FILLER) for _ in range(rng.randint(6, 12))]
            writer.writerow([" ".join(words), label])


def save_tiny_bert(folder: Path) -> None:
    """A random-init 2-layer BERT with a word-level vocabulary, saved like any hub checkpoint (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + sorted({w for topic in TOPICS.values() for w in topic} | set(FILLER))
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")  # fmt: skip
    tokenizer.save_pretrained(folder)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(folder)


def test_stdlib_dataset_has_six_families_in_disjoint_stable_splits(tmp_path: Path) -> None:
    make_stdlib_dataset.main(["--out", str(tmp_path)])
    splits = {}
    for name in ("train", "val", "test"):
        with (tmp_path / f"{name}.csv").open() as file:
            splits[name] = list(csv.DictReader(file))
    assert {row["label"] for row in splits["train"]} == set(make_stdlib_dataset.FAMILIES)
    assert len(splits["train"]) > 3 * len(splits["test"]) > 0
    texts = [{row["text"] for row in rows} for rows in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert all(make_stdlib_dataset.split_of(row["source"]) == "test" for row in splits["test"])


def run_two_peers(tmp_path: Path, *extra: str, steps: int = STEPS) -> list[dict]:
    save_tiny_bert(tmp_path / "bert")
    write_texts(tmp_path / "train.csv", 400, seed=0)
    write_texts(tmp_path / "test.csv", 100, seed=1)
    result = run_cli(
        ["local", "2", "--run-id", f"hf_{tmp_path.name[-8:]}", "--", sys.executable, str(RECIPE / "train.py"), "fit",
         "--trainer.accelerator=cpu", "--trainer.precision=32-true", f"--model.model_name_or_path={tmp_path / 'bert'}",
         f"--model.lr={LR}", "--model.warmup_steps=2", "--model.total_steps=100",
         f"--data.train_file={tmp_path / 'train.csv'}", f"--data.val_file={tmp_path / 'test.csv'}",
         "--data.batch_size=16", "--data.max_length=16", "--trainer.strategy.init_args.target_batch_size=64",
         "--trainer.strategy.init_args.matchmaking_time=0.5", "--trainer.strategy.init_args.averaging_timeout=5.0",
         f"--progress.max_global_steps={steps}", f"--progress.history_path={tmp_path / 'history{peer}.jsonl'}",
         f"--report={tmp_path / 'report{peer}.json'}", *extra],
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    # the peers' whole output stays beside the histories, for a failure that shows only in the reports
    (tmp_path / "peers.log").write_text(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "held-out accuracy before fine-tuning" in result.stdout
    reports = []
    for peer in (0, 1):
        rows = read_history(tmp_path / f"history{peer}.jsonl", steps)
        assert averaged_both_peers_in_most_rounds(rows), rows
        peer_losses = losses(rows)
        # medians: under --editable a step's loss includes the edit term, which jumps (0.07 -> 2.9 at the last step of
        # both peers, measured) when the simulated edit of a confident head fails; the accuracy shows the task learned
        first, last = statistics.median(peer_losses[:3]), statistics.median(peer_losses[-3:])
        print(f"peer {peer}: loss {first:.3f} -> {last:.3f}; {sum(r['group_size'] == 2 for r in rows)}/{len(rows)} "
              f"steps averaged both peers; {rows[-1]['seconds']:.0f} s of training")  # fmt: skip
        assert last < first - FALL, f"peer {peer}: loss did not fall: {peer_losses}"
        reports.append(json.loads((tmp_path / f"report{peer}.json").read_text()))
        print(f"peer {peer}: report {reports[-1]}")
    return reports


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_local_peers_fine_tune_a_tiny_random_bert(tmp_path: Path) -> None:
    reports = run_two_peers(tmp_path)
    for report in reports:
        assert report["global_step"] >= STEPS
        assert report["accuracy_after"] >= 0.9 > report["accuracy_before"] + 0.2, report


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_editable_flag_adds_editable_training_on_the_classifier_head(tmp_path: Path) -> None:
    """``--editable``: the model still learns the task, and after fit the recipe's 20 wrong-label edits of held-out
    texts (each on the unedited model, with the callback's editor and step limit) succeed."""
    reports = run_two_peers(tmp_path, "--editable")
    for report in reports:
        assert report["accuracy_after"] >= 0.9, report
        edits = report["edits"]
        assert edits["num_edits"] == 20, report
        assert edits["success_rate"] >= EDIT_SUCCESS, report
