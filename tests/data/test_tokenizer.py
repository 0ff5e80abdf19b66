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
    with pytest.raises(ValueError, match="has no end-of-document token .* name the one it has with --eod-token"):
        load_tokenizer(tmp_path / "no_eod.json")
    with pytest.raises(ValueError, match="has no token '<nope>'"):
        load_tokenizer(tmp_path / "no_eod.json", eod_token="<nope>")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="is not a SentencePiece model"):
        load_tokenizer(tmp_path / "bad.model")


def llama3_style(directory):
    """A Llama-3-style tokenizer directory built here: byte-level BPE, <|begin_of_text|> added in front by its
    post-processor, <|end_of_text|> its end of text, tokenizer_config.json naming both."""
    from tokenizers import decoders, pre_tokenizers, processors, trainers

    directory.mkdir()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([prose(i, 30) for i in range(3)], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                             special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}))
    return directory


def test_llama3_style_directory(tmp_path):
    tokenizer = load_tokenizer(llama3_style(tmp_path / "llama3"))
    assert (tokenizer.eod_token, tokenizer.bos_token, tokenizer.pad_token) == (
        "<|end_of_text|>", "<|begin_of_text|>", "<|end_of_text|>")
    assert tokenizer.eod == tokenizer.vocab["<|end_of_text|>"] == 1
    text = "the sea <|end_of_text|> the ship"
    ids = tokenizer.encode(text)
    assert tokenizer.eod not in ids and 0 not in ids  # no BOS from the post-processor, the EOD string is text
    assert tokenizer.decode(ids) == text
    # Without tokenizer_config.json the EOD is found by name; --eod-token overrides both.
    (tmp_path / "llama3" / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path / "llama3" / "tokenizer.json").eod_token == "<|end_of_text|>"
    assert load_tokenizer(tmp_path / "llama3", eod_token="<|begin_of_text|>").eod == 0


def test_sentencepiece_model_from_mistral_common(tmp_path):
    """Mistral 7B's SentencePiece model (mistral-common's data/tokenizer.model.v1, Apache-2.0) encodes exactly as
    the sentencepiece library encodes it (the oracle) and decodes back to the text."""
    import shutil
    from importlib.resources import files

    import sentencepiece

    shutil.copyfile(files("mistral_common") / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path)  # a directory holding tokenizer.model
    assert (tokenizer.eod_token, tokenizer.eod, tokenizer.bos_token, tokenizer.vocab_size) == ("</s>", 2, "<s>", 32000)
    oracle = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    for text in [prose(3, 10), *TRICKY_UNICODE[:6], "a </s> b <s> c", "  leading  spaces"]:
        assert tokenizer.encode(text) == oracle.encode(text), text
        if "\x00" not in text and "\r" not in text:
            assert tokenizer.decode(tokenizer.encode(text)) == oracle.decode(oracle.encode(text))
