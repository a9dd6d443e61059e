"""``python -m tokenbudget.explore``: the same as ``tokenbudget explore``."""

import argparse
import sys

from ..cli.explore import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenbudget.explore")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["explore", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"tokenbudget explore: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
