"""Shared corpora: a small one of .txt and .jsonl files, prepared once per session, and the Gutenberg novels."""

import json
import random
import shutil

import pytest

from tapa_megatron.data.corpus import load_gutenberg_books
from tapa_megatron.data.prepare import prepare

WORDS = ("the sea whale ship captain letter sister morning house fortune marriage walk rain evening "
         "harpoon deck storm garden ball dance carriage officer mother silence reason heart").split()


def prose(seed, sentences):
    """Deterministic English-like filler text, a few hundred tokens per 20 sentences."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 14))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ";", ","]))
    return "\n".join(lines) + "\n"


# Not ASCII, and nothing the tokenizer was trained on, so byte-level fallback does the work.
TRICKY_UNICODE = [
    "naïve café, Æsir, Œuvre, straße",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 👩‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 👍🏽 and the math alphabet 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "مرحبا بالعالم — שלום עולם (right to left)",
    "combining: e\u0301 a\u0308 n\u0303, zero width: a\u200bb\u200dc, BOM \ufeff, NUL \x00 end",
    "line ends \r\n and \r and \u2028 and \u2029, tabs\t\tand  double  spaces   ",
    "a literal <|endoftext|> inside a document stays text",
    "",
    " ",
    "\n\n\n",
]


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    """(paths, documents): the files, and name -> text as read_documents must return them."""
    root = tmp_path_factory.mktemp("corpus")
    documents = {}
    paths = []
    for i in range(3):
        name = f"novel{i}"
        documents[name] = prose(i, 60)
        (root / f"{name}.txt").write_bytes(documents[name].encode("utf-8"))
        paths.append(root / f"{name}.txt")
    # \r\n line ends and Unicode must survive exactly.
    documents["unicode"] = prose(10, 20).replace("\n", "\r\n") + "\r\n".join(TRICKY_UNICODE)
    (root / "unicode.txt").write_bytes(documents["unicode"].encode("utf-8"))
    paths.append(root / "unicode.txt")
    records = [prose(20 + i, 15) for i in range(3)]
    lines = [json.dumps({"id": i, "text": text}) for i, text in enumerate(records)]
    lines.insert(1, "")  # blank lines are skipped but still count for line numbers
    (root / "notes.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths.append(root / "notes.jsonl")
    documents.update({"notes:1": records[0], "notes:3": records[1], "notes:4": records[2]})
    return paths, documents


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_files):
    """(out_dir, manifest) of the corpus prepared with 'novel1' held out: 6 training documents."""
    paths, _ = corpus_files
    out_dir = tmp_path_factory.mktemp("prepared") / "data"
    manifest = prepare(out_dir, inputs=paths, test_books=["novel1"], vocab_size=400)
    return out_dir, manifest


@pytest.fixture(scope="session")
def gutenberg_cache(tmp_path_factory):
    """(cache_dir, books): the novels downloaded once per session into a fresh cache."""
    if shutil.which("apt-get") is None:
        pytest.skip("the Gutenberg novels come from Debian packages via `apt-get download`; apt-get is not on PATH")
    cache_dir = tmp_path_factory.mktemp("gutenberg-cache")
    return cache_dir, load_gutenberg_books(cache_dir)
