"""Where documents come from: a miniature PG19 of Gutenberg novels, or the user's own files (.txt, .jsonl,
.parquet, Hugging Face `datasets` directories).

PG19 itself (28k books, 11 GB) needs the Hugging Face hub. Offline, Debian's archive still carries ten
public-domain novels inside three R data packages, which `apt-get download` fetches without installing R:

    r-cran-janeaustenr  data/Rdata.rdb      Austen's six novels, one character vector (line per element) each
    r-cran-tokenizers   data/Rdata.rdb      `mobydick`, the whole Gutenberg file as one string, licence included
    r-cran-tidytext     extdata/books.rda   a data frame (gutenberg_id, text, title) of four novels, one of
                                            which (Pride and Prejudice) repeats janeaustenr's

`data/Rdata.rdb/.rdx` is an R lazy-load database: the .rdx (an RDS file) maps each object's name to
(offset, length) in the .rdb, where the object is stored as a 4-byte big-endian size followed by the
zlib-compressed serialization. The `rdata` package parses serialized R objects; this module finds them.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy

GUTENBERG_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "r-cran-tidytext")

# janeaustenr's object names, in order of publication.
AUSTEN_NOVELS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
TIDYTEXT_NOVELS = ("Great Expectations", "Twenty Thousand Leagues under the Sea", "The War of the Worlds")
GUTENBERG_TITLES = (*AUSTEN_NOVELS.values(), "Moby Dick", *TIDYTEXT_NOVELS)

_GUTENBERG_START = re.compile(
    r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.MULTILINE | re.IGNORECASE
)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG E-?BOOK|End of (the )?Project Gutenberg).*$",
    re.MULTILINE | re.IGNORECASE,
)
# The transcribers' credit paragraph that follows the start marker.
_PRODUCED_BY = re.compile(r"\A\s*Produced by .*?\n\s*\n", re.DOTALL)


def load_gutenberg_books(cache_dir) -> dict[str, str]:
    """Title -> text of the ten Gutenberg novels, in a fixed order (Austen's six first).

    The first call downloads the three Debian packages (~5 MB) and writes the texts to
    `cache_dir/gutenberg/books.json`; later calls only read that file.
    """
    cache_file = Path(cache_dir) / "gutenberg" / "books.json"
    if cache_file.is_file():
        return json.loads(cache_file.read_text(encoding="utf-8"))

    print(f"fetching the Gutenberg novels from Debian packages {', '.join(GUTENBERG_PACKAGES)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tapa-gutenberg-") as workdir:
        library = _download_and_unpack(GUTENBERG_PACKAGES, Path(workdir))
        books = _read_books(library)

    # Write then rename, so an interrupted first call never leaves a truncated cache behind.
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    partial = cache_file.with_suffix(".json.partial")
    partial.write_text(json.dumps(books, ensure_ascii=False), encoding="utf-8")
    os.replace(partial, cache_file)
    return books


def strip_gutenberg_boilerplate(text: str) -> str:
    """The book between Project Gutenberg's start and end markers, without the licence and credits."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return _PRODUCED_BY.sub("", text, count=1).strip() + "\n"


def _download_and_unpack(packages, workdir: Path) -> Path:
    """`apt-get download` (never install: that would pull in all of R) + `dpkg-deb -x`; returns R's library."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(
                f"The Gutenberg corpus is read from Debian packages and needs `{tool}`, which is not on PATH. "
                "On a system without apt, prepare your own text instead: --input FILE.txt|FILE.jsonl ..."
            )
    download = _run(["apt-get", "download", *packages], cwd=workdir)
    if download.returncode != 0:
        # A fresh container has no package lists, and old lists name versions the mirror has dropped.
        print("apt-get download failed (missing or stale package lists?); running apt-get update and retrying",
              flush=True)
        update = _run(["apt-get", "update"], cwd=workdir)
        if update.returncode != 0:
            raise RuntimeError(f"`apt-get update` failed (it needs root and network access to the Debian "
                               f"archive):\n{update.stderr.strip()}")
        download = _run(["apt-get", "download", *packages], cwd=workdir)
        if download.returncode != 0:
            raise RuntimeError(f"`apt-get download {' '.join(packages)}` failed:\n{download.stderr.strip()}")

    root = workdir / "root"
    for deb in sorted(workdir.glob("*.deb")):
        unpack = _run(["dpkg-deb", "-x", str(deb), str(root)], cwd=workdir)
        if unpack.returncode != 0:
            raise RuntimeError(f"`dpkg-deb -x {deb.name}` failed:\n{unpack.stderr.strip()}")
    return root / "usr" / "lib" / "R" / "site-library"


def _run(command, cwd):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def _read_books(library: Path) -> dict[str, str]:
    import rdata  # imported here: it loads pandas and xarray, and only the first, uncached call needs it

    austen = _read_lazyload_database(library / "janeaustenr" / "data" / "Rdata")
    books = {title: _join_lines(austen[name]) for name, title in AUSTEN_NOVELS.items()}

    # One string: the Gutenberg file as distributed, with Windows line ends and the licence.
    (mobydick,) = _read_lazyload_database(library / "tokenizers" / "data" / "Rdata")["mobydick"]
    books["Moby Dick"] = strip_gutenberg_boilerplate(str(mobydick).replace("\r\n", "\n"))

    with warnings.catch_warnings():
        # tidytext stores a tibble; rdata warns that it reads it as the data.frame it also is.
        warnings.filterwarnings("ignore", message="Missing constructor for R class")
        frame = rdata.read_rda(library / "tidytext" / "extdata" / "books.rda")["books"]
    for title in TIDYTEXT_NOVELS:
        lines = frame["text"][frame["title"] == title]
        if lines.empty:
            raise RuntimeError(f"r-cran-tidytext's books.rda has no {title!r} (titles: "
                               f"{sorted(set(frame['title']))}); this package version differs from Debian 12's.")
        books[title] = _join_lines(lines)
    return books


def _read_lazyload_database(prefix: Path) -> dict:
    """Name -> Python object for every object in an R lazy-load database (`prefix`.rdx + `prefix`.rdb)."""
    import rdata

    index = rdata.read_rds(prefix.with_suffix(".rdx"))
    compression = index["compressed"][0]
    if not (isinstance(compression, numpy.bool_) and compression):
        raise RuntimeError(f"{prefix}.rdb is compressed with R's method {compression!r}; only zlib "
                           "(compress = TRUE) is supported.")
    database = prefix.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        record = database[offset:offset + length]
        (size,) = struct.unpack(">I", record[:4])
        serialized = zlib.decompress(record[4:])
        if len(serialized) != size:
            raise RuntimeError(f"{prefix}.rdb: object {name!r} inflates to {len(serialized)} bytes, expected {size}.")
        objects[str(name)] = rdata.conversion.convert(rdata.parser.parse_data(serialized, extension=".rds"))
    return objects


def _join_lines(lines) -> str:
    return "\n".join(str(line) for line in lines).strip() + "\n"


def read_documents(paths, text_field: str = "text") -> dict[str, str]:
    """Name -> text for the user's inputs, in the order given.

    A `.txt` file is one document named after the file (`novel.txt` -> "novel"), read exactly as stored.
    A `.jsonl` file holds one JSON object per line whose `text_field` is a document, named "file:line";
    blank lines are skipped. A `.parquet` file, and a Hugging Face `datasets` directory (written by
    Dataset.save_to_disk), hold one document per row in column `text_field`, named "name:row" (rows count
    from 1; a DatasetDict's rows are "name:split:row").
    """
    documents, sources = {}, {}
    for path in map(Path, paths):
        if path.is_dir() and _is_datasets_dir(path):
            items = _read_datasets_dir(path, text_field)
        elif path.is_dir():
            raise ValueError(f"Input {path} is a directory but not a Hugging Face `datasets` one (no "
                             f"{' or '.join(DATASETS_MARKERS)}); give its files (.txt, .jsonl, .parquet) instead.")
        elif not path.is_file():
            raise FileNotFoundError(f"Input {path} does not exist or is not a file.")
        elif path.suffix == ".txt":
            items = [(path.stem, _read_utf8(path))]
        elif path.suffix == ".jsonl":
            items = _read_jsonl(path, text_field)
        elif path.suffix == ".parquet":
            items = _read_parquet(path, text_field)
        else:
            raise ValueError(f"Input {path} has an unsupported type {path.suffix!r}: give .txt files (one document "
                             "each), .jsonl files (one JSON object per line), .parquet files or Hugging Face "
                             "`datasets` directories (one document per row).")
        for name, text in items:
            if name in documents:
                raise ValueError(f"Two inputs give the document name {name!r} ({sources[name]} and {path}): names "
                                 "come from file names, so rename one of the files.")
            documents[name], sources[name] = text, path
    return documents


# What Dataset.save_to_disk / DatasetDict.save_to_disk write at the top of the directory.
DATASETS_MARKERS = ("state.json", "dataset_dict.json")


def _is_datasets_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in DATASETS_MARKERS)


def _column(where, names, text_field):
    if text_field not in names:
        raise ValueError(f"{where}: no column {text_field!r} (columns: {', '.join(names) or 'none'}); name the column "
                         "that holds the text with --text-field.")


def _rows(where, name, texts):
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise ValueError(f"{where} row {row}: {type(text).__name__}, not a string.")
        yield f"{name}:{row}", text


def _read_parquet(path: Path, text_field: str):
    import pyarrow.parquet  # imported here: only .parquet inputs need it

    try:
        schema = pyarrow.parquet.read_schema(path)
    except pyarrow.ArrowException as error:
        raise ValueError(f"{path} is not a readable Parquet file ({error}).") from None
    _column(path, schema.names, text_field)
    texts = pyarrow.parquet.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    return list(_rows(f"{path} column {text_field!r}", path.stem, texts))


def _read_datasets_dir(path: Path, text_field: str):
    import datasets  # imported here: only `datasets` inputs need it (pip install tapa-megatron[datasets])

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    items = []
    for split, dataset in splits:
        where = path if split is None else f"{path} split {split!r}"
        _column(where, dataset.column_names, text_field)
        name = path.name if split is None else f"{path.name}:{split}"
        items += _rows(f"{where} column {text_field!r}", name, dataset[text_field])
    return items


BINARY_SHARE = 0.1  # a document with more control characters than this is not text


def refuse_binary(documents):
    """Raise ValueError for a document that is mostly control characters (NUL bytes, UTF-16): valid UTF-8,
    but not text. Tabs, line and page breaks are text; a stray NUL in real text is kept."""
    for name, text in documents.items():
        controls = sum(1 for char in text if char < " " and char not in "\t\n\r\f\v")
        if text and controls > BINARY_SHARE * len(text):
            raise ValueError(f"document {name!r} looks binary, not text: {controls:,} of its {len(text):,} characters "
                             "are control characters such as NUL (a UTF-16 file? an archive?); convert it to UTF-8 "
                             "text (e.g. iconv -f UTF-16 -t UTF-8) or leave it out.")


def _read_utf8(path: Path) -> str:
    try:
        # newline="" keeps the text exactly as stored (no \r\n -> \n translation).
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); convert it first, e.g. with iconv.") from None


def _read_jsonl(path: Path, text_field: str):
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and friends, which splitlines() breaks on.
    for line_number, line in enumerate(_read_utf8(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path} line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg} at column {error.colno}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with a {text_field!r} field, got "
                             f"{type(record).__name__}.")
        if text_field not in record:
            raise ValueError(f"{where}: no field {text_field!r} (fields: {', '.join(record) or 'none'}); "
                             "name the field that holds the text with --text-field.")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{where}: field {text_field!r} is a {type(text).__name__}, not a string.")
        yield f"{path.stem}:{line_number}", text
