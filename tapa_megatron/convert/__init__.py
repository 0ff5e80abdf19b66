"""Checkpoint conversion between Hugging Face Llama directories and our Megatron checkpoints.

    tapa convert hf-to-megatron --hf DIR --out DIR [--position tapa|rope] [--tp N --pp N]
    tapa convert megatron-to-hf --ckpt DIR --out DIR [--format auto|llama|tapa-llama]
    tapa convert inspect DIR

mapping.py holds the parameter tables (one per direction); hf_to_megatron.py and megatron_to_hf.py
run them; modeling_tapa_llama.py / configuration_tapa_llama.py are the TapaLlama model for
transformers that TAPA checkpoints export to (copied into the exported directory, so they import
nothing from this package). See docs/checkpoints.md.
"""


class ConversionError(ValueError):
    """Input that cannot be converted. The message names the problem and what to do about it."""
