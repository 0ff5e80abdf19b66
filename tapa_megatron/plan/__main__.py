"""python -m tapa_megatron.plan ...: the same as `tapa plan ...`."""

import argparse

from tapa_megatron.plan import command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tapa_megatron.plan", description=command.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_arguments(parser)
    command.run(parser.parse_args())
