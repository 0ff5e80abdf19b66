"""Hugging Face model directories: config.json plus safetensors weights (one file, or shards with
model.safetensors.index.json), read lazily and checked up front; written in shards; and the atomic
output directory both converters write into."""

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tapa_megatron.convert import ConversionError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files beside the weights worth carrying through a conversion (tokenizer, generation defaults).
COMPANION_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def read_config(hf_dir):
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} has no config.json: give a Hugging Face model directory (config.json "
                              "and *.safetensors), e.g. one saved with model.save_pretrained(dir).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path} is not valid JSON ({err}); re-download or re-save the model.") from None


class SafetensorsWeights:
    """A model's safetensors weights by parameter name, opened lazily (memory-mapped), each file checked
    on opening: the files the index names exist, parse, and hold the tensors the index says they do."""

    def __init__(self, hf_dir):
        hf_dir = Path(hf_dir)
        index_path = hf_dir / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(f"{index_path} is not a safetensors index (no valid 'weight_map': {err}); "
                                      "re-download the model.") from None
        elif (hf_dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            found = sorted(p.name for p in hf_dir.glob("*.bin")) or ["no weight files"]
            raise ConversionError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE} (found: {', '.join(found)}); "
                                  "save the model with safetensors (model.save_pretrained(dir, "
                                  "safe_serialization=True)).")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        missing = [name for name in files if not (hf_dir / name).is_file()]
        if missing:
            raise ConversionError(f"{hf_dir}: {INDEX_FILE} names weight files that are missing: {', '.join(missing)}; "
                                  "the download is incomplete, fetch those shards again.")
        self.handles = {name: _open(hf_dir / name) for name in files}
        self.location = {}
        for name, handle in self.handles.items():
            self.location.update({key: name for key in handle.keys()})
        if weight_map:
            wrong = [key for key, name in weight_map.items() if self.location.get(key) != name]
            if wrong:
                raise ConversionError(f"{hf_dir}: {len(wrong)} tensors listed in {INDEX_FILE} are not in the file it "
                                      f"names (first: {wrong[0]} in {weight_map[wrong[0]]}); the shards and the index "
                                      "do not belong together, fetch the model again.")

    def names(self):
        return self.location.keys()

    def shape(self, name):
        return tuple(self.handles[self.location[name]].get_slice(name).get_shape())

    def dtype(self, name):
        return self.handles[self.location[name]].get_slice(name).get_dtype()

    def __getitem__(self, name):
        try:
            return self.handles[self.location[name]].get_tensor(name)
        except SafetensorError as err:
            raise ConversionError(f"{self.location[name]}: tensor {name} cannot be read ({err}); the file is "
                                  "damaged, fetch it again.") from None


def _open(path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as err:
        raise ConversionError(f"{path} is not a readable safetensors file ({err}); it is truncated or damaged, "
                              "fetch it again.") from None


def write_weights(tensors, out_dir, max_shard_bytes):
    """Write (name, tensor) pairs as safetensors shards of at most max_shard_bytes (a tensor larger than
    that gets a shard of its own), with the index when there is more than one shard."""
    out_dir = Path(out_dir)
    shards, current, current_bytes = [], {}, 0

    def flush():
        nonlocal current, current_bytes
        path = out_dir / f"shard-{len(shards):05d}.tmp"
        save_file(current, str(path), metadata={"format": "pt"})
        shards.append((path, list(current)))
        current, current_bytes = {}, 0

    total = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        current_bytes += size
        total += size
    if current:
        flush()
    if len(shards) == 1:
        os.replace(shards[0][0], out_dir / SINGLE_FILE)
        return
    weight_map = {}
    for number, (path, names) in enumerate(shards, start=1):
        final = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        os.replace(path, out_dir / final)
        weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def copy_companions(source_dir, out_dir):
    """Copy the tokenizer / generation files that exist in source_dir. Returns their names."""
    copied = []
    for name in COMPANION_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copy2(Path(source_dir) / name, Path(out_dir) / name)
            copied.append(name)
    return copied


def refuse_overlap(out, *sources):
    """--out must not be, contain, or lie inside an input: replacing it would destroy that input."""
    out = Path(out).resolve()
    for source in sources:
        source = Path(source).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise ConversionError(f"--out {out} overlaps the input {source}; write the result somewhere else.")


@contextmanager
def atomic_output_dir(out, overwrite=False):
    """Yield an empty directory beside `out` to write into; when the block succeeds it becomes `out` by a
    rename, when it fails it is removed. `out` is never half-written. An existing `out` is refused unless
    overwrite, and then replaced only once the new one is complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
    work.mkdir()
    try:
        yield work
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():  # --overwrite: the old one is moved aside, not deleted, until the new one is in place
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(3)}")
        os.replace(out, old)
        os.replace(work, out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(work, out)
