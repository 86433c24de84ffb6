"""The ALBERT recipe's tiny preset: data and tokenizer pieces, and a real two-peer run through ``lightning-moshpit local``."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the recipes need the `recipes` extra: pip install -e '.[recipes]'")
pytest.importorskip("timm", reason="the recipes need the `recipes` extra: pip install -e '.[recipes]'")

from cli_helpers import run_cli  # noqa: E402
from swarm_history import averaged_both_peers_in_most_rounds, losses, read_history  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "albert"
sys.path.insert(0, str(RECIPE))
import corpus  # noqa: E402  (recipes/albert/corpus.py)


def test_sentence_order_examples_are_two_consecutive_segments_swapped_half_the_time() -> None:
    documents = corpus.stdlib_docstrings(("textwrap", "json"))
    tokenizer = corpus.as_transformers_tokenizer(corpus.train_tokenizer(documents, vocab_size=300))
    examples = corpus.make_examples(documents, tokenizer, max_seq_length=32, seed=1)
    assert len(examples) > 20
    for example in examples:
        ids = example["input_ids"]
        assert len(ids) <= 32 and ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert ids.count(tokenizer.sep_token_id) == 2
        first_length = ids.index(tokenizer.sep_token_id) + 1
        assert example["token_type_ids"] == [0] * first_length + [1] * (len(ids) - first_length)
    swapped = sum(example["sentence_order_label"] for example in examples) / len(examples)
    assert 0.3 < swapped < 0.7


def test_trained_tokenizer_is_the_same_in_two_processes(tmp_path: Path) -> None:
    """Peers that train their own tokenizer on the same corpus must agree on every token id."""
    program = (
        f"import sys; sys.path.insert(0, {str(RECIPE)!r}); import corpus\n"
        "documents = corpus.stdlib_docstrings()\n"
        "print(corpus.train_tokenizer(documents, vocab_size=2000).to_str())\n"
    )
    outputs = [subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
               for _ in range(2)]  # fmt: skip
    assert json.loads(outputs[0].stdout)["model"]["vocab"] == json.loads(outputs[1].stdout)["model"]["vocab"]
    assert outputs[0].stdout == outputs[1].stdout


def test_missing_training_text_is_a_clear_error() -> None:
    spec = importlib.util.spec_from_file_location("albert_train", RECIPE / "train.py")
    assert spec is not None and spec.loader is not None
    albert_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(albert_train)
    with pytest.raises(ValueError, match="no training text: pass `--data.text_files"):
        albert_train.PretrainingData()
    with pytest.raises(ValueError, match="`max_seq_length` must be at least 8, got 4"):
        albert_train.PretrainingData(stdlib_docstrings=True, max_seq_length=4)


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_local_peers_pretrain_tiny_albert_and_the_loss_falls(tmp_path: Path) -> None:
    """The README's ``lightning-moshpit local 2 -- python recipes/albert/train.py fit --tiny`` for 10 global steps of 32
    sequences (matchmaking 0.5 s instead of 1 s: loopback). Masked-LM + sentence-order loss is finite and falls, the
    peers averaged gradients with each other in most global steps, and each peer's history has one record per global
    step up to the last (issue 16: a peer that fell two steps behind loaded the swarm's state, jumped from step 8 onto
    the stop at 10, and its history ended at 8; SwarmProgress now writes a ``caught_up`` record for a skipped step)."""
    steps = 10
    history = tmp_path / "history{peer}.jsonl"
    result = run_cli(
        ["local", "2", "--run-id", f"albert_{tmp_path.name[-8:]}", "--", sys.executable, str(RECIPE / "train.py"),
         "fit", "--tiny", f"--progress.max_global_steps={steps}", f"--progress.history_path={history}",
         f"--data.cache_dir={tmp_path / 'cache'}", "--data.max_documents=600",
         "--trainer.strategy.init_args.matchmaking_time=0.5", "--trainer.strategy.init_args.averaging_timeout=5.0"],
        timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:]
    for peer in (0, 1):
        rows = read_history(tmp_path / f"history{peer}.jsonl", steps)
        assert averaged_both_peers_in_most_rounds(rows), rows
        peer_losses = losses(rows)
        first, last = sum(peer_losses[:3]) / 3, sum(peer_losses[-3:]) / 3
        print(f"peer {peer}: loss {first:.3f} -> {last:.3f}; {sum(r['group_size'] == 2 for r in rows)}/{len(rows)} "
              f"steps averaged both peers; {sum(r['caught_up'] for r in rows)} skipped; {rows[-1]['seconds']:.0f} s")  # fmt: skip
        # 0.1 is about 3x the noise of a 3-step mean here (each peer contributes 1-4 batches of 8 sequences a step)
        assert last < first - 0.1, f"peer {peer}: loss did not fall: {peer_losses}"
