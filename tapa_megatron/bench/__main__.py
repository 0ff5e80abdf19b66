"""python -m tapa_megatron.bench attention [options]"""

import argparse

from tapa_megatron.bench import attention


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tapa_megatron.bench")
    sub = parser.add_subparsers(dest="benchmark", required=True)
    attention.add_arguments(sub.add_parser("attention", help=attention.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    attention.run(args)


if __name__ == "__main__":
    main()
