"""The byte-level BPE tokenizer: exact round trips, determinism, and what megatron-core needs of it."""

import json

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, models

from tapa_megatron.data.tokenizer import EOD_TOKEN, load_tokenizer, train_tokenizer
from tests.data.conftest import TRICKY_UNICODE, prose


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    return train_tokenizer([prose(i, 40) for i in range(4)], path, vocab_size=512)


@pytest.mark.parametrize("text", TRICKY_UNICODE + ["\n".join(TRICKY_UNICODE), prose(99, 10)])
def test_decode_encode_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_text_cannot_produce_the_eod_id(tokenizer):
    ids = tokenizer.encode(f"one{EOD_TOKEN}two")
    assert tokenizer.eod not in ids
    assert tokenizer.decode(ids + [tokenizer.eod]) == f"one{EOD_TOKEN}two{EOD_TOKEN}"


def test_training_is_deterministic(tmp_path):
    texts = [prose(i, 30) for i in range(3)]
    first = train_tokenizer(texts, tmp_path / "first.json", vocab_size=400)
    second = train_tokenizer(texts, tmp_path / "second.json", vocab_size=400)
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()
    assert first.unique_identifiers == second.unique_identifiers
    assert first.vocab_size <= 400


def test_serves_as_megatron_tokenizer(tokenizer):
    reloaded = load_tokenizer(tokenizer.path)
    assert isinstance(reloaded, MegatronTokenizerBase)
    assert reloaded.vocab_size == len(reloaded.vocab) == tokenizer.vocab_size
    assert reloaded.vocab[EOD_TOKEN] == reloaded.eod
    assert reloaded.tokenize("the sea") == tokenizer.encode("the sea")
    assert reloaded.detokenize(reloaded.tokenize("the sea")) == "the sea"
    json.dumps(reloaded.unique_identifiers)  # megatron hashes this into its index cache names


def test_bad_vocab_size_and_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=256 leaves no room for merges"):
        train_tokenizer(["text"], tmp_path / "t.json", vocab_size=256)
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    Tokenizer(models.BPE()).save(str(tmp_path / "no_eod.json"))
    with pytest.raises(ValueError, match=f"has no {EOD_TOKEN} token"):
        load_tokenizer(tmp_path / "no_eod.json")
