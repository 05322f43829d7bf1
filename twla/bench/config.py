"""What a bench run (the main job) quantizes, evaluates and writes: :class:`BenchConfig`, whose
defaults are the command line's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from twla.quantization.job import JobConfig
from twla.quantization.presets import DEFAULT_METHOD, DEFAULT_METHODS, resolve_methods

if TYPE_CHECKING:
    from twla.quantization.config import QuantConfig

DEFAULT_SAVE = (DEFAULT_METHOD,)  # packed, reloaded and evaluated when benched
DEFAULT_TASKS = ("lastword", "nextsent")  # built-in zero-shot tasks scored for every row


@dataclass
class BenchConfig(JobConfig):
    """Methods, evaluation and output of a bench run, on top of its model and calibration (see
    ``twla bench --help``); ``overwrite`` replaces a bench report written earlier at ``out``."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    evaluation: str = "prideprejudice"
    eval_seqlen: int = 512
    eval_tokens: int | None = 20480
    seeds: tuple[int, ...] = (0,)  # each method runs once per seed (calibration windows, rotations, batches)
    out: str = "runs/latest"
    save: tuple[str, ...] = field(default_factory=tuple)
    save_dtype: str = "bfloat16"  # storage of the embeddings and head in saved checkpoints: keep, float16, bfloat16
    histogram_layer: str | None = None  # default: the middle layer's down_proj
    tasks: tuple[str, ...] = DEFAULT_TASKS  # built-in zero-shot tasks scored for every row (twla.evaluate.tasks)

    def __post_init__(self) -> None:
        if not self.methods:
            raise ValueError("no methods to bench; name at least one with --methods")
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        if repeated:
            raise ValueError(f"--methods names {', '.join(repeated)} more than once")
        self.methods = resolve_methods(self.methods)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        checks = {
            "nsamples": (self.nsamples, 1),
            "seqlen": (self.seqlen, 2),
            "eval_seqlen": (self.eval_seqlen, 2),
            "eval_tokens": (self.eval_tokens if self.eval_tokens is not None else 1, 1),
            "batch_size": (self.batch_size, 1),
            "seed": (min(self.seeds, default=0), 0),
        }
        for name, (value, low) in checks.items():
            if value < low:
                raise ValueError(f"{name} must be ≥ {low}, got {value}")
        from twla.deploy.format import storage_dtype
        from twla.evaluate.tasks import TASKS
        from twla.quantization.config import QuantConfig

        plain = [QuantConfig.from_method(spec) for spec in self.methods]
        unused = [s for s in self.overrides if not any(c.uses(s) for c in plain)]
        if unused:
            raise ValueError(f"overrides of {', '.join(unused)} apply to no benched method")
        for spec in self.methods:  # fail early on a bad override value or too few windows
            self.quant_config(spec).check_windows(self.nsamples)
        storage_dtype(self.save_dtype)  # fail early on an unknown storage type
        unknown = set(self.save) - set(self.methods)
        if unknown:
            raise ValueError(f"--save names methods that are not benched: {', '.join(sorted(unknown))}")
        for spec in self.save:
            QuantConfig.from_method(spec).check_packable(spec)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"--tasks: give distinct built-in tasks among {', '.join(TASKS)}, got {list(self.tasks)}")

    def quant_config(self, spec: str, seed: int = 0) -> QuantConfig:
        """The configuration of one benched method at ``seed``, with this run's overrides."""
        from twla.quantization.config import QuantConfig

        plain = QuantConfig.from_method(spec)
        overrides = {section: fields for section, fields in self.overrides.items() if plain.uses(section)}
        return QuantConfig.from_method(
            spec, overrides, batch_size=self.batch_size, layer_windows=self.layer_windows
        ).with_seed(seed)
