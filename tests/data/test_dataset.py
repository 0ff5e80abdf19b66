"""GPTDataset samples from a prepared corpus: shapes, shift-by-one labels, and the empty-split guard."""

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tapa_megatron.data.dataset import build_datasets
from tapa_megatron.data.prepare import TRAIN_PREFIX
from tapa_megatron.data.tokenizer import load_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def datasets(prepared, tmp_path_factory):
    out_dir, _ = prepared
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    cache_dir = tmp_path_factory.mktemp("index-cache")
    train, valid = build_datasets(out_dir, tokenizer, seq_length=SEQ, seed=1234, num_train_samples=200,
                                  num_valid_samples=20, split="5,1,0", cache_dir=cache_dir)
    return train, valid, tokenizer, cache_dir


def _contains(sequence, window):
    return any(sequence[i:i + len(window)] == window for i in range(len(sequence) - len(window) + 1))


def _split_at(ids, separator):
    pieces = [[]]
    for i in ids:
        if i == separator:
            pieces.append([])
        else:
            pieces[-1].append(i)
    return pieces


def test_samples_are_shifted_windows_of_the_documents(datasets, prepared):
    train, valid, tokenizer, _ = datasets
    assert not torch.distributed.is_initialized()
    assert len(train) >= 200 and len(valid) >= 20
    documents = IndexedDataset(str(prepared[0] / TRAIN_PREFIX))
    token_lists = [documents[i].tolist() for i in range(len(documents))]
    for dataset in (train, valid):
        for index in (0, 7, 19):
            sample = dataset[index]
            assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
            assert all(value.shape == (SEQ,) for value in sample.values())
            assert sample["tokens"].dtype == sample["labels"].dtype == sample["position_ids"].dtype == torch.int64
            assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
            # The SEQ + 1 tokens are consecutive tokens of the EOD-joined documents.
            window = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
            for piece in _split_at(window, tokenizer.eod):
                assert any(_contains(doc, piece) for doc in token_lists)


def test_train_and_valid_use_different_documents(datasets):
    train, valid, _, _ = datasets
    # Megatron splits by position: "5,1,0" of 6 documents gives the last one to valid.
    assert set(train.indices.tolist()) == {0, 1, 2, 3, 4}
    assert set(valid.indices.tolist()) == {5}


def test_same_seed_gives_the_same_samples_from_the_cache(datasets, prepared):
    train, _, tokenizer, cache_dir = datasets
    assert any(cache_dir.iterdir())
    again, _ = build_datasets(prepared[0], tokenizer, seq_length=SEQ, seed=1234, num_train_samples=200,
                              num_valid_samples=20, split="5,1,0", cache_dir=cache_dir)
    for index in (0, 50, 199):
        assert torch.equal(again[index]["tokens"], train[index]["tokens"])


def test_a_split_with_no_documents_is_refused_up_front(prepared):
    out_dir, _ = prepared
    tokenizer = load_tokenizer(out_dir / "tokenizer.json")
    build = dict(tokenizer=tokenizer, seq_length=SEQ, seed=0, num_train_samples=10, num_valid_samples=10)
    with pytest.raises(ValueError, match=r"valid split 2% of 6 documents is 0 documents; .* split='5,1,0'"):
        build_datasets(out_dir, split="98,2,0", **build)
    with pytest.raises(ValueError, match="must be up to three comma-separated weights"):
        build_datasets(out_dir, split="1,1,1,1", **build)
    with pytest.raises(ValueError, match="gives a test share"):
        build_datasets(out_dir, split="80,10,10", **build)
    with pytest.raises(FileNotFoundError, match="No indexed dataset at"):
        build_datasets(out_dir / "test", split="5,1,0", **build)
