"""The `tapa` command. Each subcommand parses its arguments, then calls one function of the package."""

import argparse

from tapa_megatron.bench import attention as bench_attention


def build_parser():
    parser = argparse.ArgumentParser(prog="tapa", description="TAPA (Token-Aware Phase Attention) on Megatron-Core.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    bench = commands.add_parser("bench", help="benchmarks that print tables (and plots)")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    attention = benchmarks.add_parser(
        "attention", help="TAPA attention (Triton, torch path, reference) beside SDPA: ms, TFLOP/s, memory",
        description=bench_attention.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_attention.add_arguments(attention)
    attention.set_defaults(handler=bench_attention.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
