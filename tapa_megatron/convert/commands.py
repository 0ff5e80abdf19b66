"""Convert checkpoints between Hugging Face Llama and TAPA Megatron, and inspect them.

    tapa convert hf-to-megatron --hf meta-llama-3-8b/ --out ckpt/llama3-8b-tapa --position tapa --tp 8
    tapa convert megatron-to-hf --ckpt runs/llama3-8b-tapa-128k --out hf/llama3-8b-tapa-128k
    tapa convert inspect runs/llama3-8b-tapa-128k [--verify]
    tapa convert megatron-lm --ckpt runs/llama3-8b-8k-pretrain-rope --out mlm/llama3-8b-rope

See docs/checkpoints.md for the formats, the parameter mapping and the full recipe.
"""

# Argument definitions only: the converters (torch, Megatron, transformers) load when a command runs.

POSITIONS = ("tapa", "rope")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _fail(command, err):
    raise SystemExit(f"tapa convert {command}: {err}") from None


def cmd_hf_to_megatron(args):
    from tapa_megatron.convert import ConversionError, hf_to_megatron
    from tapa_megatron.model import TapaSettings

    defaults = TapaSettings()
    tapa = None
    if any(value is not None for value in (args.tapa_alpha, args.tapa_theta, args.tapa_phase)):
        tapa = TapaSettings(alpha=args.tapa_alpha if args.tapa_alpha is not None else defaults.alpha,
                            theta=args.tapa_theta if args.tapa_theta is not None else defaults.theta,
                            phase=args.tapa_phase or defaults.phase)
    try:
        hf_to_megatron.convert(args.hf, args.out, position=args.position, tensor_parallel=args.tp,
                               pipeline_parallel=args.pp, dtype=args.dtype, tapa=tapa, overwrite=args.overwrite)
    except ConversionError as err:
        _fail("hf-to-megatron", err)


def cmd_megatron_to_hf(args):
    from tapa_megatron.convert import ConversionError, megatron_to_hf

    try:
        megatron_to_hf.convert(args.ckpt, args.out, export_format=args.format, dtype=args.dtype,
                               tokenizer=args.tokenizer, max_shard_bytes=int(args.max_shard_gb * 2**30),
                               overwrite=args.overwrite)
    except ConversionError as err:
        _fail("megatron-to-hf", err)


def cmd_inspect(args):
    from tapa_megatron.convert import ConversionError
    from tapa_megatron.convert.inspect_checkpoint import inspect_path

    try:
        rows = inspect_path(args.path, verify=args.verify)
    except ConversionError as err:
        _fail("inspect", err)
    for label, text in rows:
        print(f"{label:<9} {text}")


def cmd_megatron_lm(args):
    from tapa_megatron.convert import ConversionError, megatron_lm

    try:
        target = megatron_lm.convert(args.ckpt, args.out, overwrite=args.overwrite)
    except ConversionError as err:
        _fail("megatron-lm", err)
    print(f"wrote {target} and {target.parent / megatron_lm.TRACKER}; continue with Megatron-LM's "
          f"--load {target.parent} --ckpt-format torch_dist --no-load-optim --no-load-rng")


def add_arguments(parser):
    """The `convert` command group: hf-to-megatron, megatron-to-hf, inspect."""
    commands = parser.add_subparsers(dest="convert_command", required=True, metavar="COMMAND")

    to_megatron = commands.add_parser(
        "hf-to-megatron", help="a Hugging Face Llama directory -> a Megatron checkpoint of our model",
        description="Convert a Hugging Face Llama (config.json + safetensors) into a Megatron torch_dist checkpoint "
                    "of our model at step 0, weights only: use it as checkpoint.init_from of a training run.")
    to_megatron.add_argument("--hf", required=True, metavar="DIR", help="the Hugging Face model directory")
    to_megatron.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to create")
    to_megatron.add_argument("--position", choices=POSITIONS, default="tapa",
                             help="tapa (default): a TAPA model initialised from the RoPE weights, for continued "
                                  "pretraining; rope: the same RoPE model (the baseline)")
    to_megatron.add_argument("--tp", type=int, default=1,
                             help="tensor-parallel size you will train at: it must divide the heads, and the "
                                  "vocabulary is padded to a multiple of 128 x TP (default 1)")
    to_megatron.add_argument("--pp", type=int, default=1,
                             help="pipeline-parallel size you will train at: it must divide the layers (default 1)")
    to_megatron.add_argument("--dtype", choices=DTYPES, default="auto",
                             help="weight dtype of the checkpoint (default: the Hugging Face weights' dtype)")
    to_megatron.add_argument("--tapa-alpha", type=float, help="TAPA distance exponent (default 0.1)")
    to_megatron.add_argument("--tapa-theta", type=float, help="TAPA amplitude share of head_dim (default 0.5)")
    to_megatron.add_argument("--tapa-phase", choices=("quadratic", "linear"), help="TAPA phase (default quadratic)")
    to_megatron.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    to_megatron.set_defaults(handler=cmd_hf_to_megatron)

    to_hf = commands.add_parser(
        "megatron-to-hf", help="a Megatron checkpoint (any TP/PP) -> a Hugging Face directory",
        description="Export a checkpoint of our model: RoPE models as LlamaForCausalLM, TAPA models as TapaLlama "
                    "(its code is written into the directory: load with trust_remote_code=True).")
    to_hf.add_argument("--ckpt", required=True, metavar="DIR",
                       help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    to_hf.add_argument("--out", required=True, metavar="DIR", help="the Hugging Face directory to create")
    to_hf.add_argument("--format", choices=("auto", "llama", "tapa-llama"), default="auto",
                       help="auto (default): llama for RoPE models, tapa-llama for TAPA models")
    to_hf.add_argument("--dtype", choices=DTYPES, default="auto",
                       help="weight dtype of the export (default: the checkpoint's)")
    to_hf.add_argument("--tokenizer", metavar="PATH",
                       help="a Hugging Face tokenizer directory (or a tokenizer.json) to include; default: the files "
                            "hf-to-megatron kept with the checkpoint, if any")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file (default 5)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    to_hf.set_defaults(handler=cmd_megatron_to_hf)

    inspect = commands.add_parser(
        "inspect", help="print what a checkpoint is: format, shape, TAPA settings, layout, step, size",
        description="Describe a tapa-megatron checkpoint (or run directory) or a Hugging Face model directory "
                    "from its metadata, without loading weights; --verify checks a checkpoint's files first.")
    inspect.add_argument("path", metavar="DIR")
    inspect.add_argument("--verify", action="store_true",
                         help="check every file of the checkpoint against the sizes and SHA-256 sums in its completion "
                              "marker first (reads all of it); exits non-zero if one does not match")
    inspect.set_defaults(handler=cmd_inspect)

    megatron_lm = commands.add_parser(
        "megatron-lm", help="a directory Megatron-LM's --load continues from (iter_NNNNNNN + tracker file)",
        description="Lay a checkpoint out as Megatron-LM's load_checkpoint expects it (see "
                    "tapa_megatron/convert/megatron_lm.py): hard links to its files, common state with iteration.")
    megatron_lm.add_argument("--ckpt", required=True, help="a checkpoint directory, or a run directory (its newest)")
    megatron_lm.add_argument("--out", required=True, help="the directory to pass to Megatron-LM's --load")
    megatron_lm.add_argument("--overwrite", action="store_true", help="replace that step's iter_ directory")
    megatron_lm.set_defaults(handler=cmd_megatron_lm)
