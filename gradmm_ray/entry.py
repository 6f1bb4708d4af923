"""What the two command lines (distill, finetune) share: the parser's shape, the exit codes, and
how a failure reaches the user (one line on stderr)."""

from __future__ import annotations

import argparse
import sys

from gradmm_ray.errors import one_line

EXIT_USER_ERROR = 2  # bad input: the line says what to fix
EXIT_FAILED = 1  # the input was fine, Ray or a stage failed: the line says if re-running helps
EXIT_STOPPED = (
    130  # stopped on purpose (SIGTERM from `ray job stop`, or Ctrl-C): the line says what was kept
)


def make_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A parser that prints ``description`` and ``epilog`` as written (examples keep their
    layout)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """``--set SECTION.KEY=VALUE`` (repeatable): any config field, the value read as YAML."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config field; VALUE is YAML (.inf, 1e-4, true, [0.1, 1]); repeatable",
    )


def fail(prog: str, error: BaseException, code: int) -> int:
    """Print ``error`` as one line and return the exit code."""
    print(one_line(prog, error), file=sys.stderr)
    return code
