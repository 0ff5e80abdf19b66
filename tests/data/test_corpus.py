"""Reading documents: the user's .txt/.jsonl files, and the Gutenberg novels from Debian packages."""

import json

import pytest

from tapa_megatron.data import corpus
from tapa_megatron.data.corpus import (
    GUTENBERG_TITLES,
    load_gutenberg_books,
    read_documents,
    strip_gutenberg_boilerplate,
)


def test_txt_and_jsonl_documents_are_read_exactly_in_order(corpus_files):
    paths, documents = corpus_files
    read = read_documents(paths)
    assert list(read) == list(documents)
    assert read == documents  # \r\n, BOM, NUL and the rest unchanged


def test_jsonl_text_field_is_configurable(tmp_path):
    path = tmp_path / "books.jsonl"
    path.write_text('{"body": "first"}\n{"body": "second", "text": "ignored"}\n', encoding="utf-8")
    assert read_documents([path], text_field="body") == {"books:1": "first", "books:2": "second"}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.txt does not exist"):
        read_documents([tmp_path / "nowhere.txt"])


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated}', r"bad\.jsonl line 2: not valid JSON"),
    ('{"body": "x", "id": 3}', r"bad\.jsonl line 2: no field 'text' \(fields: body, id\); name the field"),
    ('{"text": 42}', r"bad\.jsonl line 2: field 'text' is a int, not a string"),
    ('["text"]', r"bad\.jsonl line 2: expected a JSON object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        read_documents([path])


def test_unsupported_type_duplicate_names_and_non_utf8_are_refused(tmp_path):
    (tmp_path / "table.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"table\.csv has an unsupported type '\.csv'"):
        read_documents([tmp_path / "table.csv"])

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        (tmp_path / folder / "book.txt").write_text("text")
    with pytest.raises(ValueError, match="Two inputs give the document name 'book'"):
        read_documents([tmp_path / "a" / "book.txt", tmp_path / "b" / "book.txt"])

    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        read_documents([tmp_path / "latin1.txt"])


def test_gutenberg_boilerplate_is_stripped():
    text = ("\ufeffThe Project Gutenberg EBook of A Book\n\nLicence words.\n\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\n\n\n"
            "Produced by Some Volunteers\nand others\n\n\n"
            "A BOOK\n\nChapter 1\n\nIt begins.\n\n"
            "End of Project Gutenberg's A Book\n\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK A BOOK ***\n\nThe full licence.\n")
    assert strip_gutenberg_boilerplate(text) == "A BOOK\n\nChapter 1\n\nIt begins.\n"
    assert strip_gutenberg_boilerplate("  plain text\n\n") == "plain text\n"


def test_gutenberg_books_come_from_debian_packages(gutenberg_cache):
    _, books = gutenberg_cache
    assert tuple(books) == GUTENBERG_TITLES
    sizes = {title: len(text) for title, text in books.items()}
    assert 330_000 < min(sizes.values()) and max(sizes.values()) < 1_300_000, sizes
    assert 7_000_000 < sum(sizes.values()) < 7_400_000, sizes
    assert books["Persuasion"].startswith("Persuasion\n\n\nby\n\nJane Austen")
    assert books["Emma"].endswith("FINIS\n")
    moby_dick = books["Moby Dick"]
    assert moby_dick.startswith("MOBY DICK; OR THE WHALE\n\nBy Herman Melville")
    assert "\r" not in moby_dick and "GUTENBERG" not in moby_dick and "Gutenberg-tm" not in moby_dick
    assert books["The War of the Worlds"].startswith("The War of the Worlds\n\nby H. G. Wells")


def test_gutenberg_second_call_reads_the_cache_without_apt(gutenberg_cache, monkeypatch):
    cache_dir, books = gutenberg_cache

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a cached load ran {args}")

    monkeypatch.setattr(corpus.subprocess, "run", no_subprocess)
    assert load_gutenberg_books(cache_dir) == books


def test_parquet_and_datasets_directory(tmp_path):
    import datasets
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.table({"body": ["first", "second"], "id": [1, 2]}), tmp_path / "rows.parquet")
    datasets.Dataset.from_dict({"body": ["third"]}).save_to_disk(str(tmp_path / "hub"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["fourth"]})}).save_to_disk(str(tmp_path / "dd"))
    found = read_documents([tmp_path / "rows.parquet", tmp_path / "hub", tmp_path / "dd"], text_field="body")
    assert found == {"rows:1": "first", "rows:2": "second", "hub:1": "third", "dd:train:1": "fourth"}
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: body, id\); name the column .* --text-field"):
        read_documents([tmp_path / "rows.parquet"])
    with pytest.raises(ValueError, match="no column 'text'"):
        read_documents([tmp_path / "hub"])
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="is a directory but not a Hugging Face `datasets` one"):
        read_documents([tmp_path / "plain"])
