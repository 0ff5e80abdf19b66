"""The run's tokenizer: one we train (a byte-level BPE, GPT-2 style), or any Hugging Face tokenizer or
SentencePiece model the user brings. A prepared data directory always holds it as Hugging Face files:

    tokenizer.json            the tokenizer itself (a SentencePiece model is converted to this format)
    tokenizer_config.json     which tokens end a document (eos), start one (bos) and pad a batch
    special_tokens_map.json   the same three, the way older transformers versions read them

The end-of-document (EOD) token is the one named (`--eod-token`), else tokenizer_config.json's eos_token,
else the first of KNOWN_EOD_TOKENS the vocabulary has. Text that happens to contain a special token's
string is encoded as ordinary text, so only the data pipeline can emit the EOD id.

Our trained tokenizer is byte-level: every string maps onto the 256 byte symbols before any merge, so
there is no unknown token and decode(encode(text)) == text for any Unicode text.

`HFTokenizer` is also the tokenizer megatron-core's GPTDataset takes (GPTDatasetConfig.tokenizer is a
`megatron.core.tokenizers.MegatronTokenizerBase`): it reads `eod`, `vocab_size` and `unique_identifiers`.
"""

import hashlib
import json
from pathlib import Path

from megatron.core.tokenizers import MegatronTokenizerBase
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"  # the special token of the tokenizer we train
BYTE_ALPHABET_SIZE = 256
# Names families of tokenizers give their end-of-text / start-of-text / padding tokens, most specific first.
KNOWN_EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>", "[EOS]")
KNOWN_BOS_TOKENS = ("<|begin_of_text|>", "<|startoftext|>", "<s>", "<bos>", "[BOS]")
KNOWN_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
CONFIG_FILE, SPECIAL_TOKENS_FILE = "tokenizer_config.json", "special_tokens_map.json"
SENTENCEPIECE_FILE = "tokenizer.model"


class HFTokenizer(MegatronTokenizerBase):
    """encode/decode for our code, tokenize/detokenize for megatron-core's, and the special tokens."""

    def __init__(self, path, eod_token=None):
        path = Path(path)
        tokenizer, source_file, config = _read(path)
        super().__init__(str(source_file), config={})
        self._tokenizer = tokenizer
        self._tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a text is text, not the EOD id
        self.source_file = source_file
        self.eod_token = eod_token or _config_token(config, "eos_token") or self._first_known(KNOWN_EOD_TOKENS)
        if self.eod_token is None:
            raise ValueError(f"Tokenizer {path} has no end-of-document token (none of {', '.join(KNOWN_EOD_TOKENS)}, "
                             "and no eos_token in a tokenizer_config.json beside it); name the one it has with "
                             "--eod-token TOKEN.")
        eod = self._tokenizer.token_to_id(self.eod_token)
        if eod is None:
            raise ValueError(f"Tokenizer {path} has no token {self.eod_token!r} to end documents with; name one it has "
                             "with --eod-token TOKEN.")
        self.eod = eod
        # A tokenizer without a start token (ours) has the EOD token before every document but the first of
        # the training stream, so the EOD is what the model saw start a document: GPT-2's convention.
        self.bos_token = _config_token(config, "bos_token") or self._first_known(KNOWN_BOS_TOKENS) or self.eod_token
        # Without a padding token a batch pads with EOD, which the attention mask hides anyway.
        self.pad_token = _config_token(config, "pad_token") or self._first_known(KNOWN_PAD_TOKENS) or self.eod_token
        # Megatron keys its dataset index caches on this; it changes when the vocabulary does.
        serialized = source_file.read_bytes() if source_file.suffix == ".json" else self._tokenizer.to_str().encode()
        self._sha256 = hashlib.sha256(serialized).hexdigest()

    def _first_known(self, names):
        return next((name for name in names if self._tokenizer.token_to_id(name) is not None), None)

    def token_id(self, token: str) -> int:
        return self._tokenizer.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS from the tokenizer's post-processor: the data pipeline places the EOD itself.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

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
        raise NotImplementedError("HFTokenizer is a plain-text language-model tokenizer and has no chat template.")

    def save(self, directory):
        """Write tokenizer.json (a byte copy when the source is one), tokenizer_config.json and
        special_tokens_map.json into directory: what AutoTokenizer.from_pretrained(directory) reads."""
        directory = Path(directory)
        if self.source_file.suffix == ".json":
            (directory / "tokenizer.json").write_bytes(self.source_file.read_bytes())
        else:
            self._tokenizer.save(str(directory / "tokenizer.json"))
        special = {"bos_token": self.bos_token, "eos_token": self.eod_token, "pad_token": self.pad_token}
        # Left padding: a causal LM's batched generate() continues each row from its last real token.
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False,
                  "model_max_length": 1_000_000_000, "padding_side": "left"}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        (directory / SPECIAL_TOKENS_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def _read(path: Path):
    """(tokenizers.Tokenizer, the file it came from, tokenizer_config.json's content or {}) for a tokenizer.json,
    a SentencePiece .model, or a directory holding either."""
    if path.is_dir():
        for name in ("tokenizer.json", SENTENCEPIECE_FILE):
            if (path / name).is_file():
                return _read(path / name)
        raise FileNotFoundError(f"Tokenizer directory {path} has neither tokenizer.json nor {SENTENCEPIECE_FILE}; give "
                                "a Hugging Face tokenizer directory, a tokenizer.json or a SentencePiece .model file.")
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer file {path} does not exist; give a Hugging Face tokenizer directory, a "
                                "tokenizer.json or a SentencePiece .model (`tapa data prepare` writes OUT/tokenizer.json).")
    config_file = path.with_name(CONFIG_FILE)
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if path.suffix == ".model":
        return _from_sentencepiece(path), path, config
    try:
        return Tokenizer.from_file(str(path)), path, config
    except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
        raise ValueError(f"Tokenizer {path} is not a Hugging Face tokenizer.json ({str(err).splitlines()[0]}); give "
                         "a tokenizer.json, a tokenizer directory or a SentencePiece .model.") from None


def _from_sentencepiece(path: Path) -> Tokenizer:
    """A SentencePiece model as a tokenizers.Tokenizer, by transformers' converter (the one that writes the
    tokenizer.json of Llama-2 / Mistral repositories from their tokenizer.model)."""
    import sentencepiece  # imported here: only SentencePiece models need these two
    from transformers.tokenization_utils_base import generate_merges

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as err:
        raise ValueError(f"{path} is not a SentencePiece model ({str(err).splitlines()[0]}); give a tokenizer.model "
                         "file or a tokenizer.json.") from None

    # The Llama-2 / Mistral layout: a BPE over "▁"-joined text with byte fallback, merges ranked by the
    # pieces' scores; the control pieces (<unk>, <s>, </s>) are special tokens.
    vocab = {processor.id_to_piece(i): i for i in range(processor.piece_size())}
    scores = {processor.id_to_piece(i): processor.get_score(i) for i in range(processor.piece_size())}
    unk = processor.id_to_piece(processor.unk_id())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab, scores), unk_token=unk, fuse_unk=True,
                                     byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.add_special_tokens([processor.id_to_piece(i) for i in range(processor.piece_size())
                                  if processor.is_control(i) or processor.is_unknown(i)])
    return tokenizer


def _config_token(config, key):
    """A token as tokenizer_config.json gives it: a string, or an AddedToken dict with "content"."""
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def train_tokenizer(texts, path, vocab_size: int = 8192) -> HFTokenizer:
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
    return HFTokenizer(path)


def load_tokenizer(path, eod_token=None) -> HFTokenizer:
    return HFTokenizer(path, eod_token)
