"""Prepare a corpus for training and evaluation, the way PG19 is laid out: whole books per split.

Reads the documents (the built-in Gutenberg novels, or .txt/.jsonl/.parquet files and Hugging Face
`datasets` directories), holds out whole books for the test set, trains a byte-level BPE tokenizer on the
training books only (or takes --tokenizer), and writes OUT/:

    tokenizer.json                  the tokenizer (trained, or --tokenizer's as Hugging Face files: a copy of its
    tokenizer_config.json           tokenizer.json, or its SentencePiece model converted), with the end-of-document,
    special_tokens_map.json         start and padding tokens named; `tapa convert megatron-to-hf` exports these
    train_text_document.bin/.idx    Megatron indexed dataset: one document per book, the EOD token appended
    test/*.txt                      the held-out books as plain text (evaluation runs sliding-window perplexity
                                    over raw text)
    manifest.json                   which book went where, token counts (a training document's count
                                    includes its <|endoftext|>), vocabulary size

The training books are later split into train/valid by document (see dataset.build_datasets). OUT/ is
written beside itself under a temporary name and renamed into place when complete.
"""

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from tapa_megatron.data.corpus import load_gutenberg_books, read_documents, refuse_binary

TRAIN_PREFIX = "train_text_document"
# PG19 holds out whole books; one Austen and one non-Austen keep both styles in the test set.
DEFAULT_GUTENBERG_TEST_BOOKS = ("Persuasion", "The War of the Worlds")
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tapa-megatron"


def prepare(out_dir, *, corpus=None, inputs=None, test_books=None, tokenizer_path=None, vocab_size=8192,
            eod_token=None, text_field="text", cache_dir=DEFAULT_CACHE_DIR, overwrite=False) -> dict:
    """Write the prepared corpus to out_dir (see the module docstring) and return its manifest.

    Give either corpus="gutenberg" or inputs=[paths] (see corpus.read_documents). test_books names the documents
    to hold out; None holds out DEFAULT_GUTENBERG_TEST_BOOKS for Gutenberg and the last document for
    inputs (unless it is the only one), and [] holds out nothing. tokenizer_path names an existing
    tokenizer (a tokenizer.json, a Hugging Face tokenizer directory or a SentencePiece .model) to use instead
    of training one; eod_token names its end-of-document token when it is not found by name.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out_dir} already exists and is not empty; pass --overwrite to replace it, "
                              "or choose another --out.")
    if (corpus is None) == (inputs is None):
        raise ValueError("Give exactly one source: corpus='gutenberg' (--corpus) or inputs=[paths] (--input).")
    if corpus is not None and corpus != "gutenberg":
        raise ValueError(f"Unknown corpus {corpus!r}; the built-in corpus is 'gutenberg'.")
    from tapa_megatron.data.tokenizer import load_tokenizer  # imports megatron-core: see _write

    given_tokenizer = None if tokenizer_path is None else load_tokenizer(tokenizer_path, eod_token)  # fail early
    if eod_token is not None and given_tokenizer is None:
        raise ValueError("--eod-token names a token of --tokenizer; the tokenizer trained here ends documents with "
                         "<|endoftext|>, so drop --eod-token or give --tokenizer.")

    documents = load_gutenberg_books(cache_dir) if corpus else read_documents(inputs, text_field=text_field)
    refuse_binary(documents)
    empty = [name for name, text in documents.items() if not text]
    documents = {name: text for name, text in documents.items() if text}
    if not documents:
        raise ValueError(f"The inputs hold no text ({len(empty)} empty documents).")
    if test_books is None and corpus:
        test_books = DEFAULT_GUTENBERG_TEST_BOOKS
    elif test_books is None:
        test_books = list(documents)[-1:] if len(documents) > 1 else []  # a lone document is kept for training
    train, test = _split_documents(documents, test_books)
    print(f"{len(documents)} documents ({_size(documents.values())}): {len(train)} for training, "
          f"{len(test)} held out for test" + (f"; skipped {len(empty)} empty" if empty else ""), flush=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = _write(staging, train, test, given_tokenizer, vocab_size,
                          source="gutenberg" if corpus else [str(p) for p in inputs])
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _print_summary(manifest, out_dir)
    return manifest


def _split_documents(documents, test_names):
    """(train, test) dicts; test names match document names case-insensitively."""
    by_folded_name = {name.casefold(): name for name in documents}
    unknown = [name for name in test_names if name.casefold() not in by_folded_name]
    if unknown:
        listing = ", ".join(repr(name) for name in list(documents)[:20]) + (", ..." if len(documents) > 20 else "")
        raise ValueError(f"--test-books {', '.join(map(repr, unknown))} not found among the documents: {listing}.")
    test_keys = {by_folded_name[name.casefold()] for name in test_names}
    train = {name: text for name, text in documents.items() if name not in test_keys}
    test = {name: text for name, text in documents.items() if name in test_keys}
    if not train:
        raise ValueError(f"All {len(documents)} documents are held out for test, none is left to train on; "
                         "hold out fewer with --test-books.")
    return train, test


def _write(staging: Path, train, test, given_tokenizer, vocab_size, source) -> dict:
    # Imported here, not at the top: megatron-core takes seconds to import, and the `tapa` command reads
    # this module's arguments for every subcommand (`tapa --help`, `tapa status`).
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from tapa_megatron.data.tokenizer import load_tokenizer, train_tokenizer

    tokenizer_file = staging / "tokenizer.json"
    if given_tokenizer is None:
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the {len(train)} training documents",
              flush=True)
        train_tokenizer(list(train.values()), tokenizer_file, vocab_size=vocab_size).save(staging)
    else:
        given_tokenizer.save(staging)  # the output directory stays self-contained
    tokenizer = load_tokenizer(tokenizer_file)

    print(f"tokenizing into {TRAIN_PREFIX}.bin/.idx", flush=True)
    builder = IndexedDatasetBuilder(str(staging / f"{TRAIN_PREFIX}.bin"),
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    train_entries = []
    for name, text in train.items():
        ids = tokenizer.encode(text) + [tokenizer.eod]
        # One sequence per document: megatron splits train/valid by sequence, so by whole book.
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        train_entries.append({"name": name, "chars": len(text), "tokens": len(ids)})
        print(f"  {name}: {len(text):,} chars -> {len(ids):,} tokens", flush=True)
    builder.finalize(str(staging / f"{TRAIN_PREFIX}.idx"))

    test_entries = []
    if test:
        (staging / "test").mkdir()
    for name, file_name in zip(test, _file_names(test)):
        text = test[name]
        with open(staging / "test" / file_name, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        test_entries.append({"name": name, "file": f"test/{file_name}", "chars": len(text),
                             "tokens": len(tokenizer.encode(text))})

    manifest = {
        "source": source,
        "tokenizer": {"file": "tokenizer.json", "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
                      "eod_token": tokenizer.eod_token, "trained_here": given_tokenizer is None,
                      "from": None if given_tokenizer is None else str(given_tokenizer.source_file)},
        "train": {"prefix": TRAIN_PREFIX, "documents": train_entries,
                  "tokens": sum(entry["tokens"] for entry in train_entries)},
        "test": {"documents": test_entries, "tokens": sum(entry["tokens"] for entry in test_entries)},
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    return manifest


def _file_names(names):
    """A distinct, filesystem-safe .txt name per document ("The War of the Worlds" -> the-war-of-the-worlds.txt)."""
    taken = set()
    for name in names:
        stem = re.sub(r"[^a-z0-9]+", "-", name.casefold()).strip("-") or "document"
        candidate, counter = stem, 1
        while candidate in taken:
            counter += 1
            candidate = f"{stem}-{counter}"
        taken.add(candidate)
        yield f"{candidate}.txt"


def _move_into_place(staging: Path, out_dir: Path):
    """Rename the finished staging dir to out_dir; an old out_dir is moved aside first, then deleted."""
    if not out_dir.exists():
        os.rename(staging, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    os.rename(staging, out_dir)
    shutil.rmtree(old)


def _size(texts):
    size = sum(len(text.encode("utf-8")) for text in texts)
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"


def _print_summary(manifest, out_dir):
    tokenizer = manifest["tokenizer"]
    print(f"\nwrote {out_dir}/  (tokenizer vocab {tokenizer['vocab_size']}, EOD id {tokenizer['eod']})")
    for split in ("train", "test"):
        entries = manifest[split]["documents"]
        print(f"  {split:<5} {len(entries):>4} documents {manifest[split]['tokens']:>12,} tokens")
        for entry in entries:
            print(f"        {entry['name'][:48]:<48} {entry['tokens']:>12,}")


def add_arguments(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--corpus", choices=("gutenberg",),
                        help="built-in corpus: ten public-domain Gutenberg novels from Debian packages (needs apt)")
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help=".txt files (one document each), .jsonl files (one document per line), .parquet files "
                             "(one per row) and/or Hugging Face `datasets` directories (save_to_disk; one per row)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--test-books", nargs="*", default=None, metavar="NAME",
                        help="documents to hold out for test (case-insensitive names: book titles, .txt file stems, "
                             "or FILE:LINE for .jsonl); default: " + " and ".join(DEFAULT_GUTENBERG_TEST_BOOKS)
                             + " for gutenberg, the last document for --input (none if there is only one); "
                             "give the flag alone to hold out none")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="use this tokenizer instead of training one: a tokenizer.json, a Hugging Face tokenizer "
                             "directory, or a SentencePiece .model")
    parser.add_argument("--eod-token", default=None, metavar="TOKEN",
                        help="the --tokenizer's end-of-document token; default: its tokenizer_config.json eos_token, "
                             "else the first it has of <|endoftext|>, <|end_of_text|>, </s>, <eos>")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of the trained tokenizer")
    parser.add_argument("--text-field", default="text", help="the field of each .jsonl object (the column of a .parquet "
                        "file or `datasets` directory) that holds the text")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where the downloaded Gutenberg texts are kept")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")


def run(args):
    return prepare(args.out, corpus=args.corpus, inputs=args.input, test_books=args.test_books,
                   tokenizer_path=args.tokenizer, vocab_size=args.vocab_size, eod_token=args.eod_token,
                   text_field=args.text_field,
                   cache_dir=args.cache_dir, overwrite=args.overwrite)
