"""A byte-level BPE tokenizer (GPT-2 style) trained on the training texts, saved as one tokenizer.json.

Byte-level means every string maps onto the 256 byte symbols before any merge, so there is no unknown
token and decode(encode(text)) == text for any Unicode text. The one special token, <|endoftext|>, marks
the end of a document; text that happens to contain the string "<|endoftext|>" is encoded as ordinary
bytes, so only the data pipeline can emit the EOD id.

`BPETokenizer` is also the tokenizer megatron-core's GPTDataset takes (GPTDatasetConfig.tokenizer is a
`megatron.core.tokenizers.MegatronTokenizerBase`): it reads `eod`, `vocab_size` and `unique_identifiers`.
"""

import hashlib
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256


class BPETokenizer(MegatronTokenizerBase):
    """A trained tokenizer.json: encode/decode for our code, tokenize/detokenize for megatron-core's."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer file {path} does not exist; `tapa data prepare` writes one to "
                                    "OUT/tokenizer.json.")
        super().__init__(str(path), config={})
        self._tokenizer = Tokenizer.from_file(str(path))
        self._tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not the EOD id
        eod = self._tokenizer.token_to_id(EOD_TOKEN)
        if eod is None:
            raise ValueError(f"Tokenizer {path} has no {EOD_TOKEN} token to end documents with; train one with "
                             "`tapa data prepare` (tapa_megatron.data.tokenizer.train_tokenizer).")
        self.eod = eod
        # Megatron keys its dataset index caches on this; the file's hash changes when the vocabulary does.
        self._sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    # megatron-core's names for the same two operations.
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    @property
    def vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> dict[str, str]:
        return {"class": f"{type(self).__module__}.{type(self).__qualname__}", "tokenizer_sha256": self._sha256}

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("BPETokenizer is a plain-text language-model tokenizer and has no chat template.")


def train_tokenizer(texts, path, vocab_size: int = 8192) -> BPETokenizer:
    """Train a byte-level BPE on `texts` (a list of strings), save it to `path` and load it.

    Training is deterministic: the same texts and vocab_size give a byte-identical tokenizer.json. The
    vocabulary can come out smaller than vocab_size when the texts run out of pairs to merge.
    """
    if vocab_size <= BYTE_ALPHABET_SIZE:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for merges: a byte-level BPE starts from "
                         f"{BYTE_ALPHABET_SIZE} byte symbols plus {EOD_TOKEN}; use e.g. 8192.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        # All 256 bytes, even those the texts never use, so any future text still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.save(str(path))
    return BPETokenizer(path)


def load_tokenizer(path) -> BPETokenizer:
    return BPETokenizer(path)
