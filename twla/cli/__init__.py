"""The command line: ``twla bench`` (the main job), ``quantize``, ``eval``, ``generate``, ``upgrade``,
``kernels``, ``scale``, ``solvers``.

Each subcommand is a module of this package with ``DESCRIPTION``, ``add_arguments(parser)``, ``run(args)``
and optionally ``epilog()``:
it turns its arguments into the library's config objects and calls one library function. Only
the module of the subcommand being run is imported (``twla --help`` imports none), and each
imports the heavy parts of the library when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {  # subcommand → one line of help; its module is twla.cli.<name>
    "bench": "quantize a model with several methods and compare them with full precision (the main job)",
    "quantize": "quantize a model with one method and save the packed checkpoint",
    "eval": "evaluate a packed checkpoint: perplexity and sizes from its files",
    "generate": "write text with a packed checkpoint or a full-precision model (streamed, tokens/s)",
    "upgrade": "convert a packed checkpoint of an older format version to this one",
    "kernels": "benchmark the ternary kernels and packed decoding against fp16 (GPU; reference path on CPU)",
    "scale": "benchmark peak memory and time of quantization against depth (layer by layer vs in memory)",
    "solvers": "benchmark the activation bit-allocation solvers",
}
_MODULES = {"eval": "evaluate"}  # where a module's name differs from its subcommand


def command_module(name: str):
    return importlib.import_module(f"twla.cli.{_MODULES.get(name, name)}")


def build_parser(commands: tuple[str, ...] = tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The parser, with the full options of ``commands`` (the others show their help line only)."""
    parser = argparse.ArgumentParser(
        prog="twla",
        description="Post-training ternary quantization of causal LMs (W1.58), benched side by side.",
        epilog="Start with `twla bench`: it quantizes the built-in SmolLM2-135M with the default methods, "
        "offline, and writes runs/latest/report.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help in COMMANDS.items():
        if name in commands:
            module = command_module(name)
            p = sub.add_parser(
                name,
                help=help,
                description=module.DESCRIPTION,
                epilog=module.epilog() if hasattr(module, "epilog") else None,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
            module.add_arguments(p)
        else:
            sub.add_parser(name, help=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser((command,) if command in COMMANDS else ()).parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        command_module(args.command).run(args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError, OSError) as err:
        print(f"twla: error: {err}", file=sys.stderr)
        return 2
    return 0
