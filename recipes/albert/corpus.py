"""Text for ALBERT pretraining: a corpus, a tokenizer trained on it, and masked-LM + sentence-order examples.

ALBERT (Lan et al., 2020) pretrains on pairs of text segments ``[CLS] A [SEP] B [SEP]`` with two losses:

- **masked LM**: 15% of the tokens are chosen; of those 80% become ``[MASK]``, 10% a random token, 10% stay, and
  the model predicts the originals (transformers' ``DataCollatorForLanguageModeling`` does exactly this);
- **sentence-order prediction (SOP)**: A and B are two *consecutive* segments of one document, and half of the
  time they are swapped; the model predicts whether they were (``sentence_order_label`` 1) or not (0).

:func:`make_examples` builds those pairs as ALBERT's ``create_pretraining_data.py`` does, simplified: it packs
whole sentences of a document into chunks of about ``max_seq_length`` tokens and cuts each chunk at a sentence
boundary into A and B.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"}  # fmt: skip

#: Standard-library modules whose docstrings make the offline corpus of the ``--tiny`` preset: real English prose,
#: present on every Python installation, so nothing is downloaded. (Python 3.11 gives about 3,000 docstrings.)
STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib",
    "functools", "gzip", "hashlib", "heapq", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "pydoc", "queue",
    "random", "re", "shutil", "smtplib", "socket", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "xml.dom.minidom",
    "zipfile",
)  # fmt: skip

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'`])")


# ------------------------------------------------------------------------------------------------ corpora
def stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """Docstrings of the given standard-library modules and of their public classes, functions and methods.

    Each docstring is one document. The order is fixed (modules as given, members sorted by name), so every peer
    builds the same corpus and, from it, the same tokenizer.
    """
    documents: list[str] = []
    seen: set[str] = set()
    for name in modules:
        module = importlib.import_module(name)
        for obj in _public_objects(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                documents.append(doc)
    return documents


def _public_objects(module: Any) -> Iterator[Any]:
    yield module
    for member_name, member in sorted(vars(module).items()):
        if member_name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(member) or inspect.isclass(member):
            yield member
        if inspect.isclass(member):
            for attr_name, attr in sorted(vars(member).items()):
                if not attr_name.startswith("_") and inspect.isfunction(attr):
                    yield attr


def text_file_documents(paths: Sequence[str]) -> list[str]:
    """Documents from plain-text files: paragraphs separated by blank lines (one document per paragraph)."""
    documents: list[str] = []
    for path in paths:
        file = Path(path).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"`text_files` names {str(path)!r}, which is not a readable file")
        text = file.read_text(encoding="utf-8", errors="replace")
        documents.extend(paragraph.strip() for paragraph in re.split(r"\n\s*\n", text) if paragraph.strip())
    return documents


def hub_dataset_documents(name: str, config: Optional[str], split: str, column: str) -> list[str]:
    """Documents from a Hugging Face dataset (needs the ``datasets`` package and, the first time, the internet).

    Rows whose text is empty are skipped; wikitext-style heading rows (`` = Title = ``) start a new document.
    """
    try:
        import datasets
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"`dataset_name` needs the `datasets` package: pip install -e '.[hub]' or pip install datasets ({error})") from None
    rows = datasets.load_dataset(name, config, split=split)
    if column not in rows.column_names:
        raise ValueError(f"`text_column` is {column!r}, but dataset {name!r} has the columns {rows.column_names}")
    documents, current = [], []
    for text in rows[column]:
        text = (text or "").strip()
        if re.fullmatch(r"=+ .* =+", text):  # a heading: the previous article ends
            if current:
                documents.append("\n".join(current))
            current = []
        elif text:
            current.append(text)
    if current:
        documents.append("\n".join(current))
    return documents


def split_sentences(document: str) -> list[str]:
    """A simple sentence splitter: whitespace is collapsed and a sentence ends at ``. ! ?`` before a capital."""
    return [s for s in _SENTENCE_END.split(" ".join(document.split())) if s]


# ------------------------------------------------------------------------------------------------ tokenizer
def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """A SentencePiece-style BPE tokenizer (a ``tokenizers.Tokenizer``) trained on ``documents``.

    NFKC normalisation, lower case (as ALBERT's uncased models), ``▁`` marking word starts (SentencePiece's
    Metaspace), and the special tokens ALBERT's collators expect. ALBERT itself used a SentencePiece *Unigram*
    model; ``tokenizers``' Unigram trainer gave a different vocabulary on every run here (even single-threaded),
    while its BPE trainer is deterministic, which peers that train their own tokenizer need.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()))
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def as_transformers_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer, so the data collators work with it."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def load_or_train_tokenizer(
    name: Optional[str], documents: Sequence[str], vocab_size: int, cache_dir: Path
) -> PreTrainedTokenizerFast:
    """The tokenizer ``name`` (a hub name, a directory or a ``tokenizer.json``), else one trained on ``documents``.

    A trained tokenizer is cached under ``cache_dir`` by a hash of the corpus and ``vocab_size``, so a restarted
    peer reuses it. Training is deterministic, so peers that train on the same corpus get the same tokenizer; for
    a real run, train it once and hand everybody the file (``--data.tokenizer path/tokenizer.json``).
    """
    from transformers import AutoTokenizer

    if name:
        path = Path(name).expanduser()
        if path.is_file():
            return as_transformers_tokenizer(Tokenizer.from_file(str(path)))
        return AutoTokenizer.from_pretrained(name)
    digest = hashlib.sha256(f"{vocab_size}\0".encode() + "\0".join(documents).encode()).hexdigest()[:16]
    cached = cache_dir / f"bpe-{vocab_size}-{digest}" / "tokenizer.json"
    if cached.is_file():
        return as_transformers_tokenizer(Tokenizer.from_file(str(cached)))
    tokenizer = train_tokenizer(documents, vocab_size)
    cached.parent.mkdir(parents=True, exist_ok=True)
    temporary = cached.with_name(f"tokenizer.{os.getpid()}.json")
    tokenizer.save(str(temporary))
    os.replace(temporary, cached)  # atomic: a peer starting at the same moment reads a whole file or none
    return as_transformers_tokenizer(tokenizer)


# ------------------------------------------------------------------------------------------------ examples
def make_examples(
    documents: Sequence[str],
    tokenizer: PreTrainedTokenizerFast,
    max_seq_length: int,
    short_seq_probability: float = 0.1,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """ALBERT pretraining pairs: ``input_ids``, ``token_type_ids`` and ``sentence_order_label`` per example.

    For each document, whole sentences are packed into chunks of up to ``max_seq_length - 3`` tokens (sometimes
    shorter, with ``short_seq_probability``, so the model also sees short inputs). A chunk is cut at a random
    sentence boundary into A and B (a one-sentence chunk is cut inside the sentence), and half the pairs are swapped.
    Masking happens later, per batch, so every epoch masks differently.
    """
    rng = random.Random(seed)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    budget = max_seq_length - 3
    examples: list[dict[str, Any]] = []
    for document in documents:
        sentences = [ids for ids in tokenizer(split_sentences(document), add_special_tokens=False)["input_ids"] if ids]
        for chunk in _chunks(sentences, budget, short_seq_probability, rng):
            pair = _cut(chunk, rng)
            if pair is None:
                continue
            first, second = pair
            swapped = rng.random() < 0.5
            if swapped:
                first, second = second, first
            _truncate_pair(first, second, budget, rng)
            examples.append({
                "input_ids": [cls_id, *first, sep_id, *second, sep_id],
                "token_type_ids": [0] * (len(first) + 2) + [1] * (len(second) + 1),
                "sentence_order_label": int(swapped),
            })  # fmt: skip
    return examples


def _chunks(sentences: list[list[int]], budget: int, short_p: float, rng: random.Random) -> Iterator[list[list[int]]]:
    target = rng.randint(2, budget) if rng.random() < short_p else budget
    chunk: list[list[int]] = []
    length = 0
    for sentence in sentences:
        chunk.append(sentence)
        length += len(sentence)
        if length >= target:
            yield chunk
            chunk, length = [], 0
            target = rng.randint(2, budget) if rng.random() < short_p else budget
    if chunk:
        yield chunk


def _cut(chunk: list[list[int]], rng: random.Random) -> Optional[tuple[list[int], list[int]]]:
    """Split a chunk of sentences into two consecutive segments, or None if it has fewer than two tokens."""
    if len(chunk) >= 2:
        boundary = rng.randint(1, len(chunk) - 1)
        return [t for s in chunk[:boundary] for t in s], [t for s in chunk[boundary:] for t in s]
    tokens = chunk[0]
    if len(tokens) < 2:
        return None
    cut = rng.randint(1, len(tokens) - 1)
    return tokens[:cut], tokens[cut:]


def _truncate_pair(first: list[int], second: list[int], budget: int, rng: random.Random) -> None:
    """Trim the longer segment, from a random end, until the pair fits (BERT's ``truncate_seq_pair``)."""
    while len(first) + len(second) > budget:
        longer = first if len(first) > len(second) else second
        del longer[0 if rng.random() < 0.5 else -1]
