"""Entry point of the `lorakit` command: dispatches to one module per sub-command.

Each module in `lorakit.cli` named in `COMMANDS` defines
``register(subparsers) -> None`` that adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from pathlib import Path

COMMANDS = ("demo", "train", "merge", "params", "memory", "rank", "similarity", "sweep",
            "inspect", "check", "convert", "serve", "export-gguf", "combine")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"lorakit.cli.{name.replace('-', '_')}").register(subparsers)
    return parser


# Errors that mean "the input is wrong" (a path, a value, a name): one line and exit code 2, no traceback.
USER_ERRORS = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
)
_PACKAGE = str(Path(__file__).resolve().parent.parent)


def show_library_messages() -> None:
    """The library never prints: it warns (``warnings``) and logs (``logging``, logger ``lorakit``).
    The command line shows both on stderr, lorakit's own warnings as one ``lorakit: warning:`` line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("lorakit: %(message)s"))
    logger = logging.getLogger("lorakit")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        if str(Path(filename).resolve()).startswith(_PACKAGE):
            print(f"lorakit: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)  # type: ignore[arg-type]

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    # lorakit never downloads: every model comes from a local folder or a PyPI package.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    show_library_messages()
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        print(f"lorakit {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
