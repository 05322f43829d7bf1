"""``twla solvers``: the bit-allocation solvers side by side on synthetic chains."""

from __future__ import annotations

import argparse

from twla.cli.options import int_list, names

DESCRIPTION = "Time to optimum and optimality gap of every bit-allocation solver on synthetic chains."
REPORT_FORMAT = "solver benchmark"  # marks the JSON file as this benchmark's


def add_arguments(p: argparse.ArgumentParser) -> None:
    from twla.solvers.bits.compare import DEFAULT_SIZES
    from twla.solvers.bits.solve import SOLVERS

    p.add_argument("--sizes", type=int_list, default=DEFAULT_SIZES, help="comma-separated unit counts")
    p.add_argument("--solvers", default=",".join(SOLVERS), help=f"comma-separated ({', '.join(SOLVERS)})")
    p.add_argument("--budget", type=float, default=4.0, help="mean bits (default 4)")
    p.add_argument("--beta", type=float, default=0.5, help="interaction weight β (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="instance seed (default 0)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per IP solve (default 60)")
    p.add_argument("--out", default="", help="also write the rows as JSON to this file")
    p.add_argument("--overwrite", action="store_true", help="replace a JSON file an earlier run wrote at --out")


def run(args: argparse.Namespace) -> list[dict]:
    from twla.io import check_output_file, write_json
    from twla.solvers.bits.compare import benchmark, markdown
    from twla.solvers.bits.solve import SOLVERS

    solvers = names(args.solvers)
    unknown = set(solvers) - set(SOLVERS)
    if unknown:
        raise ValueError(f"unknown solvers: {', '.join(sorted(unknown))}; choose from {', '.join(SOLVERS)}")
    if args.out:
        check_output_file(args.out, REPORT_FORMAT, overwrite=args.overwrite)
    rows = benchmark(
        list(args.sizes),
        solvers=list(solvers),
        budget=args.budget,
        beta=args.beta,
        seed=args.seed,
        time_limit=args.time_limit,
    )
    print(markdown(rows))
    if args.out:
        write_json(args.out, {"format": REPORT_FORMAT, "setup": vars(args), "rows": rows})
    return rows
