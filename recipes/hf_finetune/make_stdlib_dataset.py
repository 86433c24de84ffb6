"""Write a small, real text-classification task built offline: which family of the Python standard library a
docstring comes from.

    python recipes/hf_finetune/make_stdlib_dataset.py --out stdlib_docstrings
    # -> stdlib_docstrings/train.csv, val.csv, test.csv (columns: text, label, source)

**How it is built.** For each of six module families below, the script imports the listed modules and takes the
docstring (``inspect.getdoc``) of every public module, class, function and method defined there, C-implemented ones
included. Each example is the docstring's first paragraph (its summary), whitespace collapsed, if it has at least 4
words; duplicates are dropped, and so are texts that appear in two families. The label is the family. A hash of the
object's qualified name splits the examples about 70 / 15 / 15 into train, val and test, so the split is the same
on every run and machine with the same Python version (the texts come from the running Python; 3.11.7 gives 1,515
examples: 1,074 / 208 / 233).

The split is by object, not by module: the test set holds unseen docstrings of modules the model also saw in
training. It measures "which part of the library is this text about" from wording, not generalisation to new
modules.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: family -> standard-library modules whose docstrings carry that label
FAMILIES: dict[str, tuple[str, ...]] = {
    "text": ("string", "textwrap", "re", "difflib", "unicodedata", "html", "html.parser", "gettext", "locale",
             "stringprep"),
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "filecmp", "stat", "fileinput",
              "io"),
    "network": ("socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar", "urllib.request",
                "urllib.parse", "smtplib", "ftplib", "imaplib", "poplib", "socketserver", "ipaddress"),
    "numbers": ("math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"),
    "concurrency": ("threading", "multiprocessing", "multiprocessing.pool", "concurrent.futures", "queue",
                    "subprocess", "sched", "asyncio.locks", "asyncio.tasks", "asyncio.queues", "asyncio.events",
                    "selectors"),
    "formats": ("json", "csv", "pickle", "configparser", "plistlib", "xml.dom.minidom", "xml.etree.ElementTree",
                "zipfile", "tarfile", "gzip", "bz2", "lzma", "base64", "binascii", "email.message", "mailbox"),
}  # fmt: skip
SPLITS = (("train", 0.70), ("val", 0.15), ("test", 0.15))


def documented_objects(module_name: str) -> Iterator[tuple[str, Any]]:
    """``(qualified name, object)`` for the module and its public classes, functions and methods defined there."""
    module = importlib.import_module(module_name)
    yield module_name, module
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue
        if inspect.isroutine(member) or inspect.isclass(member):
            yield f"{module_name}.{name}", member
        if inspect.isclass(member):
            for attr_name, attr in sorted(vars(member).items()):
                if not attr_name.startswith("_") and inspect.isroutine(attr):
                    yield f"{module_name}.{name}.{attr_name}", attr


def summary(obj: Any) -> str:
    """The first paragraph of the object's docstring, on one line ('' without a docstring)."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def build_examples() -> list[dict[str, str]]:
    """Every (text, family, qualified name) example, without texts that are duplicated or shared by families."""
    rows: dict[str, dict[str, str]] = {}
    ambiguous: set[str] = set()
    for family, modules in FAMILIES.items():
        for module_name in modules:
            for qualified_name, obj in documented_objects(module_name):
                text = summary(obj)
                if len(text.split()) < 4:
                    continue
                if text in rows and rows[text]["label"] != family:
                    ambiguous.add(text)
                rows.setdefault(text, {"text": text, "label": family, "source": qualified_name})
    return [row for text, row in rows.items() if text not in ambiguous]


def split_of(source: str) -> str:
    """A stable pseudo-random split from the object's name (the same on every machine)."""
    fraction = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) / 16**8
    total = 0.0
    for name, share in SPLITS:
        total += share
        if fraction < total:
            return name
    return SPLITS[-1][0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("stdlib_docstrings"), help="folder for the CSV files")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    examples = build_examples()
    for name, _ in SPLITS:
        rows = [row for row in examples if split_of(row["source"]) == name]
        with (args.out / f"{name}.csv").open("w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["text", "label", "source"])
            writer.writeheader()
            writer.writerows(rows)
        counts = {family: sum(row["label"] == family for row in rows) for family in FAMILIES}
        print(f"{args.out / (name + '.csv')}: {len(rows)} examples {counts}")
    print(f"(Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
