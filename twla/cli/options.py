"""Options shared by several subcommands: argument types, the quantization options (model, calibration,
method settings) and the evaluation options, with their defaults read from the config objects."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import get_args

from twla.data.corpora import CORPORA, HUB_DATASETS
from twla.quantization.presets import DEFAULT_METHOD

DATA_HELP = (
    f"a built-in corpus ({', '.join(CORPORA)}), a hub dataset ({', '.join(HUB_DATASETS)}; needs network and "
    "'datasets'), or a path to a UTF-8 text file; join several with '+'"
)
DEVICE_HELP = "compute device (default: cuda if available, else cpu)"


def int_at_least(low: int):
    """An argparse type: an integer ≥ ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    return parse


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    """Comma-separated names, blanks dropped."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def method_epilog() -> str:
    from twla.quantization.methods import method_help

    return f"methods: a base weight quantizer plus '+'-joined modifiers (e.g. {DEFAULT_METHOD})\n" + method_help()


def defaults(cls: type) -> dict[str, object]:
    """The default of every field of the dataclass ``cls`` that has a plain one."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


# command-line flag → (section of QuantConfig.from_method's overrides, field)
RECONSTRUCTION_FLAGS = (
    ("recon-steps", "reconstruction", "steps"),
    ("recon-lr", "reconstruction", "lr"),
    ("round-lr", "reconstruction", "code_lr"),
    ("recon-precision", "reconstruction", "precision"),
    ("e2e-steps", "end_to_end", "steps"),
    ("e2e-lr", "end_to_end", "lr"),
    ("e2e-stride", "end_to_end", "stride"),
    ("e2e-top-k", "end_to_end", "top_k"),
    ("e2e-precision", "end_to_end", "precision"),
)
_RECONSTRUCTION_HELP = {
    "code_lr": "learned rounding: the codes' Adam lr",
    "stride": "compare every N-th position's next-token distribution",
    "top_k": "the teacher's N most likely tokens and the rest (0: the whole vocabulary)",
    "precision": "type of the matrix products (auto: bfloat16 where the device multiplies it natively)",
}
OVERRIDE_FLAGS = (
    ("damp", "weights", "damp"),
    ("amp-budget", "allocation", "budget"),
    ("amp-beta", "allocation", "beta"),
    ("amp-options", "allocation", "options"),
    ("amp-solver", "allocation", "solver"),
    ("amp-costs", "allocation", "costs"),
    ("wmix-budget", "weight_allocation", "budget"),
    ("wmix-options", "weight_allocation", "options"),
    *RECONSTRUCTION_FLAGS,
)
_USERS = {
    "allocation": "+amp, +amp-site or +amp-fisher",
    "weight_allocation": "+wmix",
    "reconstruction": "+recon or +round",
    "end_to_end": "+e2e",
}


def add_quantization(p: argparse.ArgumentParser, run: dict[str, object]) -> None:
    """Model, calibration and method settings; ``run`` holds the defaults (a run config's fields)."""
    from twla.quantization.sections import (
        WEIGHT_FORMATS,
        AllocationConfig,
        CostSource,
        EndToEndConfig,
        Precision,
        ReconstructionConfig,
        TernaryConfig,
        WeightAllocationConfig,
    )

    p.add_argument(
        "--model",
        default=run["model"],
        help=f"built-in model (offline), local checkpoint directory, or hub id (default: {run['model']})",
    )
    p.add_argument(
        "--calibration",
        default=run["calibration"],
        help=f"calibration text (default {run['calibration']}): " + DATA_HELP,
    )
    p.add_argument(
        "--nsamples",
        type=int_at_least(1),
        default=run["nsamples"],
        help=f"calibration windows (default {run['nsamples']})",
    )
    p.add_argument(
        "--layer-windows",
        type=int_at_least(1),
        default=run["layer_windows"],
        help="the layer-wise pass (GPTQ, clipping, block-wise reconstruction) uses the first N calibration "
        f"windows, end-to-end reconstruction all --nsamples (default {run['layer_windows']})",
    )
    p.add_argument(
        "--seqlen",
        type=int_at_least(2),
        default=run["seqlen"],
        help=f"calibration window length in tokens (default {run['seqlen']})",
    )
    p.add_argument(
        "--seed",
        type=int_at_least(0),
        default=None,
        help="seed for the calibration windows and every random choice (rotations, reconstruction batches; default 0)",
    )
    p.add_argument(
        "--damp",
        type=float,
        help=f"GPTQ damping λ of H = S + λ·mean(diag S)·I for every method (default {TernaryConfig.damp})",
    )
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    add_batch_size(p, run["batch_size"])
    p.add_argument("--overwrite", action="store_true", help="replace an output that twla wrote earlier")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    amp = p.add_argument_group("mixed-precision activations (amp / amp-site / amp-fisher methods only)")
    a = AllocationConfig
    amp.add_argument("--amp-budget", type=float, help=f"mean activation bits (default {a.budget:g})")
    amp.add_argument(
        "--amp-beta",
        type=float,
        help=f"interaction weight β (default {a.beta:g}; 0 measures no adjacent pairs)",
    )
    options = ",".join(map(str, a.options))
    amp.add_argument("--amp-options", type=int_list, help=f"comma-separated bit-widths (default {options})")
    amp.add_argument("--amp-solver", help=f"bit-allocation solver (default {a.solver}; see `twla solvers`)")
    amp.add_argument(
        "--amp-costs",
        choices=get_args(CostSource),
        help=f"measured costs, or fisher: their second-order estimate from one backward pass, seconds instead of "
        f"minutes, no adjacent pairs (default {a.costs})",
    )
    wmix = p.add_argument_group("mixed-precision weights (wmix methods only)")
    w = WeightAllocationConfig
    wmix.add_argument("--wmix-budget", type=float, help=f"stored bits per quantized weight (default {w.budget:g})")
    wmix.add_argument(
        "--wmix-options",
        type=lambda text: tuple(text.split(",")),
        help=f"comma-separated weight formats of {', '.join(WEIGHT_FORMATS)} (default {','.join(w.options)})",
    )
    recon = p.add_argument_group("reconstruction (recon / e2e methods only)")
    for flag, section, name in RECONSTRUCTION_FLAGS:
        default = getattr(EndToEndConfig if section == "end_to_end" else ReconstructionConfig, name)
        stage = "end-to-end" if section == "end_to_end" else "block-wise"
        what = f"{stage} reconstruction: {_RECONSTRUCTION_HELP.get(name, f'Adam {name}')}"
        if isinstance(default, str):
            recon.add_argument(f"--{flag}", choices=get_args(Precision), help=f"{what} (default {default})")
            continue
        kind = int_at_least(1 if name == "stride" else 0) if isinstance(default, int) else float
        recon.add_argument(f"--{flag}", type=kind, help=f"{what} (default {default:g})")


def add_batch_size(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=default, help=f"sequences per forward pass (default {default})"
    )


def add_runtime(p: argparse.ArgumentParser) -> None:
    """Where and how a loaded model runs: device, compute type, kernel backend."""
    p.add_argument("--device", default=None, help=DEVICE_HELP)
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument(
        "--kernels", default="auto", choices=("auto", "triton", "torch"), help="kernel backend (default auto)"
    )


def add_evaluation(p: argparse.ArgumentParser, run: dict[str, object]) -> None:
    """Evaluation text and windows; ``run`` holds the defaults."""
    p.add_argument(
        "--evaluation",
        default=run["evaluation"],
        help=f"evaluation text, never the calibration text (default {run['evaluation']}): " + DATA_HELP,
    )
    p.add_argument(
        "--eval-seqlen",
        type=int_at_least(2),
        default=run["eval_seqlen"],
        help=f"evaluation window length (default {run['eval_seqlen']}; 2048 for papers)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int_at_least(0),
        default=run["eval_tokens"],
        help=f"evaluate on the first N tokens (default {run['eval_tokens']}; 0 = all)",
    )


def overrides(args: argparse.Namespace, methods: tuple[str, ...]) -> dict[str, dict]:
    """The configuration fields given on the command line, by section; an error names a flag
    that none of ``methods`` uses (e.g. --e2e-steps without an e2e method)."""
    from twla.quantization.config import QuantConfig

    given: dict[str, dict] = {}
    for flag, section, name in OVERRIDE_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if not any(QuantConfig.from_method(spec).uses(section) for spec in methods):
            raise ValueError(
                f"--{flag} applies to methods with {_USERS[section]}, and none of {', '.join(methods)} is one"
            )
        given.setdefault(section, {})[name] = value
    allocation = given.get("allocation", {})
    if allocation.get("beta", 0) != 0:
        for spec in methods:
            section = QuantConfig.from_method(spec).allocation
            if section is not None and allocation.get("costs", section.costs) == "fisher":
                raise ValueError(f"--amp-beta weighs measured adjacent pairs, and the Fisher costs of {spec} have none")
    return given
