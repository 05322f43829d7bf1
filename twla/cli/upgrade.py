"""``twla upgrade``: a packed checkpoint of an older format version in this version's layout."""

from __future__ import annotations

import argparse
import os

DESCRIPTION = (
    "Write the packed checkpoint CHECKPOINT, of an older format version, in this version's format to --out\n"
    "(the codes are reordered; every value, and so every output, stays the same)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="packed checkpoint directory of an older format version (only read)")
    p.add_argument("--out", required=True, help="directory for the converted checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a packed checkpoint twla wrote there")


def run(args: argparse.Namespace) -> None:
    from twla.deploy.format import read_meta
    from twla.deploy.save import upgrade_packed

    version = read_meta(args.checkpoint, upgradable=True)["version"]
    bits = upgrade_packed(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"{args.checkpoint}: format version {version} converted; saved to {os.path.abspath(args.out)}")
    print(bits.describe())
