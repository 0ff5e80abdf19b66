"""`prepare`: indexed dataset round trip, held-out test files, manifest, and never a half-written output."""

import argparse
import json

import numpy
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tapa_megatron.data.dataset import build_datasets
from tapa_megatron.data.prepare import TRAIN_PREFIX, add_arguments, prepare, run
from tapa_megatron.data.tokenizer import load_tokenizer


def test_indexed_dataset_round_trips_every_training_document(prepared, corpus_files):
    out_dir, manifest = prepared
    _, documents = corpus_files
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    dataset = IndexedDataset(str(out_dir / TRAIN_PREFIX))
    train_names = [name for name in documents if name != "novel1"]
    assert [entry["name"] for entry in manifest["train"]["documents"]] == train_names
    assert len(dataset) == len(train_names)
    assert list(dataset.document_indices) == list(range(len(train_names) + 1))  # one sequence per document
    for i, name in enumerate(train_names):
        ids = dataset[i]
        assert ids.dtype == numpy.uint16 and ids[-1] == tokenizer.eod
        assert tokenizer.eod not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == documents[name]
        assert manifest["train"]["documents"][i]["tokens"] == len(ids)
    assert manifest["train"]["tokens"] == int(dataset.sequence_lengths.sum())


def test_held_out_documents_are_plain_text_files(prepared, corpus_files):
    out_dir, manifest = prepared
    _, documents = corpus_files
    assert sorted(path.name for path in (out_dir / "test").iterdir()) == ["novel1.txt"]
    assert (out_dir / "test" / "novel1.txt").read_bytes() == documents["novel1"].encode("utf-8")
    assert manifest["test"]["documents"] == [{"name": "novel1", "file": "test/novel1.txt",
                                              "chars": len(documents["novel1"]),
                                              "tokens": manifest["test"]["tokens"]}]
    on_disk = json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk == manifest
    assert manifest["tokenizer"]["vocab_size"] == load_tokenizer(out_dir / "tokenizer.json").vocab_size <= 400
    assert sorted(path.name for path in out_dir.iterdir()) == [
        "manifest.json", "special_tokens_map.json", "test", "tokenizer.json", "tokenizer_config.json",
        f"{TRAIN_PREFIX}.bin", f"{TRAIN_PREFIX}.idx"]


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, corpus_files, prepared):
    paths, _ = corpus_files
    out_dir = tmp_path / "data"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists and is not empty; pass --overwrite"):
        prepare(out_dir, inputs=paths[:2], tokenizer_path=prepared[0] / "tokenizer.json")
    assert (out_dir / "old.txt").read_text() == "keep me"

    manifest = prepare(out_dir, inputs=paths[:2], tokenizer_path=prepared[0] / "tokenizer.json", overwrite=True)
    assert not (out_dir / "old.txt").exists()
    assert manifest["tokenizer"]["trained_here"] is False
    assert (out_dir / "tokenizer.json").read_bytes() == (prepared[0] / "tokenizer.json").read_bytes()
    assert [entry["name"] for entry in manifest["test"]["documents"]] == ["novel1"]  # default: the last document
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data"]  # no staging or old dirs left


def test_failure_leaves_no_output_and_no_staging_dir(tmp_path, corpus_files, monkeypatch):
    paths, _ = corpus_files

    def broken_finalize(self, idx_path):
        raise OSError("disk full")

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", broken_finalize)
    with pytest.raises(OSError, match="disk full"):
        prepare(tmp_path / "data", inputs=paths[:2], vocab_size=300)
    assert list(tmp_path.iterdir()) == []


def test_bad_test_books_and_sources_are_refused(tmp_path, corpus_files):
    paths, _ = corpus_files
    with pytest.raises(ValueError, match=r"--test-books 'Emma' not found among the documents: 'novel0', 'novel1'"):
        prepare(tmp_path / "data", inputs=paths[:2], test_books=["Emma"])
    with pytest.raises(ValueError, match="none is left to train on"):
        prepare(tmp_path / "data", inputs=paths[:2], test_books=["NOVEL0", "novel1"])
    with pytest.raises(ValueError, match="Give exactly one source"):
        prepare(tmp_path / "data", corpus="gutenberg", inputs=paths)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist"):
        prepare(tmp_path / "data", inputs=[tmp_path / "missing.jsonl"])
    assert list(tmp_path.iterdir()) == []


def test_command_line_holds_out_nothing_when_test_books_is_empty(tmp_path, corpus_files, capsys):
    paths, _ = corpus_files
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--input", *map(str, paths[:3]), "--out", str(tmp_path / "data"),
                              "--vocab-size", "300", "--test-books"])
    manifest = run(args)
    assert [entry["name"] for entry in manifest["train"]["documents"]] == ["novel0", "novel1", "novel2"]
    assert manifest["test"]["documents"] == [] and not (tmp_path / "data" / "test").exists()
    printed = capsys.readouterr().out
    assert "3 documents" in printed and f"wrote {tmp_path / 'data'}/" in printed


def test_gutenberg_corpus_end_to_end(tmp_path, gutenberg_cache):
    """The default command, `tapa data prepare --corpus gutenberg`, then samples from it."""
    cache_dir, books = gutenberg_cache
    out_dir = tmp_path / "pg"
    manifest = prepare(out_dir, corpus="gutenberg", cache_dir=cache_dir)
    held_out = ["Persuasion", "The War of the Worlds"]
    assert [entry["name"] for entry in manifest["test"]["documents"]] == held_out
    assert [entry["name"] for entry in manifest["train"]["documents"]] == [t for t in books if t not in held_out]
    for entry in manifest["test"]["documents"]:
        assert (out_dir / entry["file"]).read_text(encoding="utf-8") == books[entry["name"]]
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    assert tokenizer.vocab_size == manifest["tokenizer"]["vocab_size"] == 8192
    dataset = IndexedDataset(str(out_dir / TRAIN_PREFIX))
    assert tokenizer.decode(dataset[0][:-1]) == books["Sense and Sensibility"]
    assert 1_500_000 < manifest["train"]["tokens"] < 1_900_000

    train, valid = build_datasets(out_dir, tokenizer, seq_length=1024, seed=0, num_train_samples=100,
                                  num_valid_samples=10, split="7,1,0")
    assert train[99]["tokens"].shape == valid[9]["tokens"].shape == (1024,)
