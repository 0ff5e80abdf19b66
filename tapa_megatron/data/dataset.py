"""Train and validation samples from a prepared corpus, through megatron-core's GPTDataset.

GPTDataset concatenates the (shuffled) documents of a split, EOD-separated, and cuts the stream into
samples of seq_length + 1 tokens, so a long book becomes many consecutive L-token segments, as PG19
training does. Sample i is a dict of int64 `tokens` and `labels` (tokens shifted by one), float
`loss_mask` and int64 `position_ids`, each of length seq_length.

Megatron splits the documents by position: with split "98,2,0" the first 98% of the documents train and
the last 2% validate. The test set is not drawn from here: `prepare` holds whole books out as raw text.
"""

import json
from pathlib import Path

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from tapa_megatron.data.prepare import TRAIN_PREFIX


def build_datasets(data_path, tokenizer, seq_length: int, seed: int, num_train_samples: int,
                   num_valid_samples: int, split: str = "98,2,0", cache_dir=None):
    """(train_ds, valid_ds): GPTDatasets over a prepared corpus, indexed by sample number (`ds[i]`).

    data_path is a directory written by `tapa data prepare` or the prefix of a .bin/.idx pair. A dataset
    repeats its documents (reshuffled per epoch) as often as needed to give the requested number of
    samples. valid_ds is None when the split's valid share is 0. Megatron caches its sample indices under
    cache_dir (default: DATA/cache); the cache key covers seed, seq_length, sample count, split and tokenizer.
    """
    prefix = _resolve_prefix(Path(data_path))
    if seq_length < 1:
        raise ValueError(f"seq_length={seq_length} must be a positive number of tokens.")
    if num_train_samples < 1 or num_valid_samples < 0:
        raise ValueError(f"num_train_samples={num_train_samples} must be at least 1 and "
                         f"num_valid_samples={num_valid_samples} at least 0.")
    _check_tokenizer_matches(prefix, tokenizer)
    documents = len(IndexedDataset(str(prefix)))
    _check_split(split, documents)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([str(prefix)], None),
        split=split,
        path_to_cache=str(Path(cache_dir) if cache_dir is not None else prefix.parent / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        # The model builds its own causal mask; a dense (L, L) mask per sample would not scale to long context.
        create_attention_mask=False,
    )
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_train_samples, num_valid_samples, None], is_built_on_rank=lambda: True, config=config
    ).build()
    return train_ds, valid_ds


def check_prepared(data_path, tokenizer, split: str = "98,2,0"):
    """What build_datasets would refuse, found without building anything: a missing .bin/.idx pair, a
    tokenizer other than the one that wrote it, a split that leaves a share without documents."""
    prefix = _resolve_prefix(Path(data_path))
    _check_tokenizer_matches(prefix, tokenizer)
    _check_split(split, len(IndexedDataset(str(prefix))))


def _resolve_prefix(data_path: Path) -> Path:
    prefix = (data_path / TRAIN_PREFIX if data_path.is_dir() else data_path).resolve()
    missing = [path.name for path in (prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx"))
               if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"No indexed dataset at {prefix} ({' and '.join(missing)} missing); give a directory "
                                "written by `tapa data prepare`, or the prefix of a .bin/.idx pair.")
    return prefix


def _check_tokenizer_matches(prefix: Path, tokenizer):
    """Token ids from one tokenizer read with another are garbage; the manifest says which vocab wrote them."""
    manifest_file = prefix.parent / "manifest.json"
    if not manifest_file.is_file():
        return
    written_with = json.loads(manifest_file.read_text(encoding="utf-8"))["tokenizer"]
    if (tokenizer.vocab_size, tokenizer.eod) != (written_with["vocab_size"], written_with["eod"]):
        raise ValueError(f"{prefix} was tokenized with vocab size {written_with['vocab_size']} (EOD "
                         f"{written_with['eod']}), but the tokenizer given has {tokenizer.vocab_size} (EOD "
                         f"{tokenizer.eod}); load {prefix.parent / written_with['file']}.")


def _check_split(split: str, documents: int):
    """Fail early where megatron would not: a split share that rounds to zero documents makes its
    builder loop forever (it adds epochs of zero tokens until it has enough samples)."""
    try:
        weights = [float(weight) for weight in split.split(",")]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"split={split!r} must be up to three comma-separated weights for train, valid and test, "
                         "not all zero, e.g. '98,2,0'.")
    shares = parse_and_normalize_split(split)
    if shares[2] > 0:
        raise ValueError(f"split={split!r} gives a test share, but the test set is the whole books `prepare` holds "
                         "out as raw text under DATA/test/; use a split with test share 0, e.g. '98,2,0'.")
    # The same document bookends megatron computes: round(start * n) to round(end * n).
    bookends = convert_split_vector_to_split_matrix(shares)
    if bookends[0] is None:
        raise ValueError(f"split={split!r} gives no train share; e.g. use '98,2,0'.")
    for name, share, bookend in (("train", shares[0], bookends[0]), ("valid", shares[1], bookends[1])):
        if bookend is None or round(bookend[1] * documents) > round(bookend[0] * documents):
            continue
        problem = f"{name} split {share * 100:g}% of {documents} documents is 0 documents"
        if documents < 2:
            raise ValueError(f"{problem}: one document cannot be split into train and valid. Prepare more "
                             "documents, or use split='100,0,0' to train without validation.")
        raise ValueError(f"{problem}; every split needs whole documents. Use e.g. split='{documents - 1},1,0' "
                         f"(one document validates), or prepare more, smaller documents.")
