"""The ``mailedge`` command: its subcommands and their argument parser.

Each subcommand is a :class:`Subcommand` (its arguments and the function that runs it)
listed in :func:`subcommands`; :func:`main` parses the command line and runs one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from mailedge.cli.check import add_check_arguments, check_command
from mailedge.cli.decode import add_decode_arguments, decode_command
from mailedge.cli.probe_command import add_probe_arguments, probe_command

# A shell's status for a command killed by SIGPIPE (128 + 13): what `head` leaves behind.
EXIT_BROKEN_PIPE = 141

__all__ = ["Subcommand", "build_parser", "main", "subcommands", "version"]


@dataclass(frozen=True)
class Subcommand:
    """One ``mailedge`` subcommand: its name, one line of help, its arguments and its body."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def subcommands() -> list[Subcommand]:
    """Every subcommand, in the order ``--help`` lists them."""
    return [
        Subcommand(
            name="decode",
            help="decode a captured PROXY protocol header and print it as JSON",
            add_arguments=add_decode_arguments,
            run=decode_command,
        ),
        Subcommand(
            name="probe",
            help="connect to a listener as a proxy would and show what the server sees",
            add_arguments=add_probe_arguments,
            run=probe_command,
        ),
        Subcommand(
            name="check",
            help="validate a config file and show, per listener, what is in effect",
            add_arguments=add_check_arguments,
            run=check_command,
        ),
    ]


def version() -> str:
    """The installed distribution's version, from its metadata (pyproject.toml's)."""
    try:
        return importlib.metadata.version("mailedge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``mailedge`` and all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="mailedge",
        description="Tools for the network edge of a mail server behind a PROXY protocol proxy.",
    )
    parser.add_argument("--version", action="version", version=f"mailedge {version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for subcommand in subcommands():
        sub = commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.help
        )
        subcommand.add_arguments(sub)
        sub.set_defaults(run=subcommand.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``mailedge`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        status = run(args)
        # Flushed here, so a reader that went away is noticed here (see below).
        sys.stdout.flush()
    except BrokenPipeError:
        # `mailedge decode ... | head`: the reader has all it wanted. Say nothing, and keep
        # the interpreter's final flush from failing on the same pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return status
