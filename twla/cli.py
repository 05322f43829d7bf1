"""Command line: ``twla bench`` (the main job), ``twla quantize``, ``twla eval``, ``twla generate``,
``twla kernels``, ``twla solvers``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

from twla import scale, speed
from twla.bench import DEFAULT_METHOD, DEFAULT_SAVE, METHOD_SETS, BenchConfig, resolve_methods, run_bench
from twla.checkpoint import STORAGE_DTYPES
from twla.config import EndToEndConfig, QuantConfig, ReconstructionConfig, method_help
from twla.data import CORPORA, HUB_DATASETS
from twla.kernels.dispatch import BACKENDS
from twla.loading import BUILTIN, DEFAULT_MODEL
from twla.solvers.bits import compare as solver_bench
from twla.tasks import DEFAULT_TASKS, TASKS

METHOD_HELP = f"methods: a base weight quantizer plus '+'-joined modifiers (e.g. {DEFAULT_METHOD})\n" + (method_help())
DATA_HELP = (
    f"a built-in corpus ({', '.join(CORPORA)}), a hub dataset ({', '.join(HUB_DATASETS)}; needs network "
    "and 'datasets'), or a path to a UTF-8 text file; join several with '+'"
)


def _int_at_least(low: int):
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


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"built-in model ({', '.join(BUILTIN)}, offline), local checkpoint directory, or hub id "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument("--calibration", default="emma+mansfieldpark", help="calibration text: " + DATA_HELP)
    p.add_argument("--nsamples", type=_int_at_least(1), default=32, help="calibration windows (default 32)")
    p.add_argument(
        "--seqlen", type=_int_at_least(2), default=512, help="calibration window length in tokens (default 512)"
    )
    p.add_argument(
        "--seed",
        type=_int_at_least(0),
        default=None,
        help="seed for the calibration windows and every random choice (rotations, reconstruction batches; default 0)",
    )
    p.add_argument(
        "--damp",
        type=float,
        help="GPTQ damping λ of H = S + λ·mean(diag S)·I for every method (default 0.01)",
    )
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace an output that twla wrote earlier")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    amp = p.add_argument_group("mixed-precision activations (amp / amp-site methods only)")
    amp.add_argument("--amp-budget", type=float, help="mean activation bits (default 4)")
    amp.add_argument("--amp-beta", type=float, help="interaction weight β (default 0.5)")
    amp.add_argument("--amp-options", type=_int_list, help="comma-separated bit-widths (default 2,4,6,8)")
    amp.add_argument("--amp-solver", help="bit-allocation solver (default dp; see `twla solvers`)")
    recon = p.add_argument_group("reconstruction (recon / e2e methods only)")
    for flag, section, name in _RECONSTRUCTION_FLAGS:
        default = getattr(EndToEndConfig if section == "end_to_end" else ReconstructionConfig, name)
        kind = _int_at_least(0) if name == "steps" else float
        stage = "end-to-end" if section == "end_to_end" else "block-wise"
        recon.add_argument(f"--{flag}", type=kind, help=f"{stage} reconstruction: Adam {name} (default {default:g})")


# command-line flag → (section of QuantConfig.from_method's overrides, field)
_RECONSTRUCTION_FLAGS = (
    ("recon-steps", "reconstruction", "steps"),
    ("recon-lr", "reconstruction", "lr"),
    ("e2e-steps", "end_to_end", "steps"),
    ("e2e-lr", "end_to_end", "lr"),
)
_OVERRIDE_FLAGS = (
    ("damp", "weights", "damp"),
    ("amp-budget", "allocation", "budget"),
    ("amp-beta", "allocation", "beta"),
    ("amp-options", "allocation", "options"),
    ("amp-solver", "allocation", "solver"),
    *_RECONSTRUCTION_FLAGS,
)


def _int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers."""
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def _overrides(args: argparse.Namespace, methods: tuple[str, ...]) -> dict[str, dict]:
    """The configuration fields given on the command line, by section; an error names a flag
    that none of ``methods`` uses (e.g. --e2e-steps without an e2e method)."""
    given: dict[str, dict] = {}
    for flag, section, name in _OVERRIDE_FLAGS:
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if not any(QuantConfig.from_method(spec).uses(section) for spec in methods):
            users = _USERS[section]
            raise ValueError(f"--{flag} applies to methods with {users}, and none of {', '.join(methods)} is one")
        given.setdefault(section, {})[name] = value
    return given


_USERS = {"allocation": "+amp or +amp-site", "reconstruction": "+recon", "end_to_end": "+e2e"}


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evaluation", default="prideprejudice", help="evaluation text (never the calibration text): " + DATA_HELP
    )
    p.add_argument(
        "--eval-seqlen",
        type=_int_at_least(2),
        default=512,
        help="evaluation window length (default 512; 2048 for papers)",
    )
    p.add_argument(
        "--eval-tokens",
        type=_int_at_least(0),
        default=20480,
        help="evaluate on the first N tokens (default 20480; 0 = all)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="twla",
        description="Post-training ternary quantization of causal LMs (W1.58), benched side by side.",
        epilog="Start with `twla bench`: it quantizes the built-in SmolLM2-135M with the default methods, "
        "offline, and writes runs/latest/report.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser(
        "bench",
        help="quantize a model with several methods and compare them with full precision (the main job)",
        description=textwrap.fill(
            "Quantize MODEL with each method, evaluate perplexity, bits per weight and time, and write "
            "a report (report.md, report.json, plots) to --out."
        ),
        epilog=METHOD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(bench)
    _eval_args(bench)
    bench.add_argument(
        "--methods",
        default="default",
        help="comma-separated methods and presets; a preset expands to its methods: "
        + "; ".join(f"{name} = {','.join(specs)}" for name, specs in METHOD_SETS.items())
        + " (default: default)",
    )
    bench.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds: every method runs once per seed and the report gives mean ± std "
        "(default: --seed, or 0)",
    )
    bench.add_argument(
        "--tasks",
        default=",".join(DEFAULT_TASKS),
        help=f"comma-separated built-in zero-shot tasks scored for every row ({', '.join(TASKS)}; "
        f"default {','.join(DEFAULT_TASKS)}; '' for none)",
    )
    bench.add_argument("--out", default="runs/latest", help="report directory (default runs/latest)")
    bench.add_argument(
        "--save",
        default=None,
        help="comma-separated ternary methods, each among --methods, whose packed checkpoint is written to "
        f"OUT/models/, loaded back and evaluated (default: those of {','.join(DEFAULT_SAVE)} that are benched; "
        "'' for none)",
    )
    bench.add_argument(
        "--save-dtype",
        default="keep",
        choices=STORAGE_DTYPES,
        help="storage type of the saved checkpoints' unquantized tensors (default keep: as loaded, so the reloaded "
        "model is bit-identical; float16 halves the embeddings)",
    )

    quant = sub.add_parser(
        "quantize",
        help="quantize a model with one method and save the packed checkpoint",
        description=textwrap.fill(
            "Quantize MODEL with one ternary method and save a packed checkpoint (2-bit codes, α, μ, "
            "rotations, activation settings; twla_quant.json, which also holds the quantization report). Load it "
            "with twla.load_packed or evaluate it with `twla eval`."
        ),
        epilog=METHOD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(quant)
    quant.add_argument("--method", default=DEFAULT_METHOD, help=f"method (default {DEFAULT_METHOD})")
    quant.add_argument("--out", required=True, help="output checkpoint directory")
    quant.add_argument(
        "--dtype",
        default="float16",
        choices=STORAGE_DTYPES,
        help="storage type of the unquantized tensors (embeddings, norms, rotation factors; default float16; "
        "keep = as loaded, bit-identical)",
    )
    mode = quant.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream",
        dest="stream",
        action="store_true",
        default=None,
        help="read, quantize and write one decoder layer at a time (the default for a checkpoint directory or a "
        "built-in model)",
    )
    mode.add_argument("--in-memory", dest="stream", action="store_false", help="load the whole model first")
    quant.add_argument(
        "--offload-activations",
        action="store_true",
        help="keep the calibration activations between layers in host memory, not on the GPU (same result)",
    )

    evaluate = sub.add_parser(
        "eval",
        help="evaluate a packed checkpoint: perplexity and sizes from its files",
        description="Load a packed checkpoint written by `twla quantize` or `twla bench --save`, report its bits "
        "per weight and size from the files, and its perplexity.",
    )
    evaluate.add_argument("checkpoint", help="packed checkpoint directory")
    _eval_args(evaluate)
    evaluate.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    evaluate.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    evaluate.add_argument(
        "--batch-size", type=_int_at_least(1), default=8, help="sequences per forward pass (default 8)"
    )
    evaluate.add_argument("--kernels", default="auto", choices=BACKENDS, help="kernel backend (default auto)")
    evaluate.add_argument(
        "--tasks",
        default="",
        help=f"comma-separated zero-shot tasks: built-in ({', '.join(TASKS)}; offline) or lm-evaluation-harness "
        "tasks (e.g. hellaswag, arc_easy; needs twla[lm-eval] and the task's data in the datasets cache)",
    )
    evaluate.add_argument("--limit", type=_int_at_least(1), default=None, help="harness tasks: at most N documents")
    evaluate.add_argument("--include-path", default=None, help="harness tasks: a directory of task definitions")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bars")
    evaluate.add_argument(
        "--stream",
        action="store_true",
        help="read the decoder layers from the tensor file one at a time whenever the model runs them (a packed "
        "model larger than memory; the same results)",
    )

    upgrade = sub.add_parser(
        "upgrade",
        help="convert a packed checkpoint of an older format version to this one",
        description="Write the packed checkpoint CHECKPOINT, of an older format version, in this version's "
        "format to --out (the codes are reordered; every value, and so every output, stays the same).",
    )
    upgrade.add_argument("checkpoint", help="packed checkpoint directory of an older format version (only read)")
    upgrade.add_argument("--out", required=True, help="directory for the converted checkpoint")
    upgrade.add_argument("--overwrite", action="store_true", help="replace a packed checkpoint twla wrote there")

    gen = sub.add_parser(
        "generate",
        help="write text with a packed checkpoint or a full-precision model (streamed, tokens/s)",
        description=textwrap.fill(
            "Continue a prompt with SOURCE (a packed checkpoint, or a model as for --model) and print the "
            "tokens as they come and the decoding speed. Instruct models get the prompt as a user turn of "
            "their chat template. --compare also runs the full-precision model the checkpoint was quantized "
            "from and prints both answers."
        ),
    )
    gen.add_argument("source", help="packed checkpoint directory, built-in model, local checkpoint or hub id")
    gen.add_argument("--prompt", required=True, help="the text to continue (or the user's message)")
    gen.add_argument("--max-new-tokens", type=_int_at_least(1), default=64, help="at most this many (default 64)")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    gen.add_argument("--top-p", type=float, default=0.9, help="sampling nucleus (default 0.9)")
    gen.add_argument("--seed", type=_int_at_least(0), default=0, help="sampling seed (default 0)")
    chat = gen.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="use the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="continue the plain prompt")
    gen.add_argument("--compare", action="store_true", help="also answer with the full-precision model")
    gen.add_argument(
        "--fp-model", default=None, help="full-precision model for --compare (default: the one the checkpoint records)"
    )
    gen.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    gen.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    gen.add_argument("--kernels", default="auto", choices=BACKENDS, help="kernel backend (default auto)")

    kernels = sub.add_parser(
        "kernels",
        help="benchmark the ternary kernels and packed decoding against fp16 (GPU; reference path on CPU)",
        description=speed.DESCRIPTION,
    )
    speed.add_arguments(kernels)

    scaling = sub.add_parser(
        "scale",
        help="benchmark peak memory and time of quantization against depth and width (layer by layer vs in memory)",
        description=scale.DESCRIPTION,
    )
    scale.add_arguments(scaling)

    solvers = sub.add_parser(
        "solvers", help="benchmark the activation bit-allocation solvers", description=solver_bench.DESCRIPTION
    )
    solver_bench.add_arguments(solvers)
    return parser


def _seeds(args: argparse.Namespace) -> tuple[int, ...]:
    """The bench's seeds from --seeds or --seed (not both)."""
    if args.seeds is None:
        return (args.seed or 0,)
    if args.seed is not None:
        raise ValueError("give either --seed or --seeds, not both")
    try:  # BenchConfig checks the values (at least one, distinct, ≥ 0)
        return tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None


def _bench(args: argparse.Namespace) -> None:
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    benched = resolve_methods(methods)  # BenchConfig resolves the presets again, after its own checks
    if args.save is None:
        save = tuple(m for m in DEFAULT_SAVE if m in benched)
    else:
        save = tuple(m.strip() for m in args.save.split(",") if m.strip())
    cfg = BenchConfig(
        model=args.model,
        methods=methods,
        calibration=args.calibration,
        evaluation=args.evaluation,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_seqlen=args.eval_seqlen,
        eval_tokens=args.eval_tokens or None,
        seeds=_seeds(args),
        device=args.device,
        batch_size=args.batch_size,
        out=args.out,
        save=save,
        save_dtype=args.save_dtype,
        overrides=_overrides(args, benched),
        overwrite=args.overwrite,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
    )
    run_bench(cfg, progress=not args.quiet)


def _quantize(args: argparse.Namespace) -> None:
    from twla.checkpoint import is_packed_checkpoint, pack_model, save_packed, storage_dtype
    from twla.data import bos_token, calibration_windows, load_text, provenance, tokenize
    from twla.io import check_output_dir
    from twla.loading import check_window_length, load_model, model_reference, model_source, resolve_device
    from twla.pipeline import quantize
    from twla.streaming import quantize_checkpoint

    # everything that can be refused is checked before the model's weights are read
    seed = args.seed or 0
    config = QuantConfig.from_method(args.method, _overrides(args, (args.method,)), batch_size=args.batch_size)
    config = config.with_seed(seed)
    config.check_windows(args.nsamples)
    config.check_packable(args.method)
    dtype = storage_dtype(args.dtype)
    device = resolve_device(args.device)
    source = model_source(args.model)
    reference = model_reference(args.model)
    protect = [source.path] if source.local else []
    check_output_dir(args.out, "packed checkpoint", is_packed_checkpoint, args.overwrite, protect)
    check_window_length(source, args.seqlen, "--seqlen")
    text = load_text(args.calibration, "calibration")
    calib = calibration_windows(
        tokenize(source.tokenizer, text), args.nsamples, args.seqlen, seed, bos_token(source.tokenizer)
    )
    if args.stream and not source.local:
        raise ValueError(f"--stream reads a local checkpoint directory; {args.model!r} is a hub id")
    stream = source.local if args.stream is None else args.stream
    print(f"{args.method}: " + ("one decoder layer at a time" if stream else "whole model in memory"))
    saved = dict(provenance=provenance(text, calib, seed), dtype=dtype, overwrite=args.overwrite)
    if stream:
        report, files = quantize_checkpoint(
            source,
            config,
            calib,
            args.out,
            args.method,
            device,
            not args.quiet,
            reference=reference,
            offload=args.offload_activations,
            **saved,
        )
    else:
        model, tokenizer = load_model(source)
        model, report = quantize(model, config, calib, device, not args.quiet, offload=args.offload_activations)
        files = save_packed(
            pack_model(model, report.weights),
            tokenizer,
            args.out,
            args.method,
            config.to_dict(),
            report=report.to_dict(),
            source=reference,
            **saved,
        )
    print(f"{args.method}: quantized in {report.seconds:.1f} s; saved to {os.path.abspath(args.out)}")
    print(files.describe())


def _upgrade(args: argparse.Namespace) -> None:
    from twla.checkpoint import read_meta, upgrade_packed

    version = read_meta(args.checkpoint, upgradable=True)["version"]
    bits = upgrade_packed(args.checkpoint, args.out, args.overwrite)
    print(f"{args.checkpoint}: format version {version} converted; saved to {os.path.abspath(args.out)}")
    print(bits.describe())


def _eval(args: argparse.Namespace) -> None:
    from contextlib import nullcontext

    import torch

    from twla.checkpoint import load_packed, packed_bits
    from twla.data import load_text
    from twla.loading import resolve_device
    from twla.streaming import streamed_packed

    device = resolve_device(args.device)
    text = load_text(args.evaluation, "evaluation")
    dtype = getattr(torch, args.dtype)
    if args.stream and any(t.strip() and t.strip() not in TASKS for t in args.tasks.split(",")):
        raise ValueError("--stream evaluates perplexity and the built-in tasks; drop it for harness tasks")
    with streamed_packed(args.checkpoint, device, dtype) if args.stream else nullcontext() as streamed:
        model, tokenizer, meta = streamed or load_packed(args.checkpoint, dtype=dtype)
        _evaluate_packed(args, model, tokenizer, meta, text, device)
    print(packed_bits(args.checkpoint).describe())


def _evaluate_packed(args: argparse.Namespace, model, tokenizer, meta: dict, text, device) -> None:
    from twla.data import OVERLAP_LIMIT, bos_token, calibration_overlap, evaluation_windows, tokenize
    from twla.evaluate import perplexity
    from twla.kernels.dispatch import kernel_backend
    from twla.tasks import build_tasks, check_tasks_disjoint, evaluate_tasks

    if tokenizer is None:
        raise ValueError(f"{args.checkpoint} holds no tokenizer; it is needed to tokenize the evaluation text")
    ids = tokenize(tokenizer, text)
    windows = evaluation_windows(ids, args.eval_seqlen, args.eval_tokens or None, bos_token(tokenizer))
    shared = calibration_overlap(meta.get("provenance", {}), ids)
    if shared is not None and shared >= OVERLAP_LIMIT:
        print(
            f"twla: WARNING: {100 * shared:.0f}% of the sampled calibration text of {args.checkpoint} occurs in "
            f"the evaluation text {text.name}: this perplexity is measured on text the model was calibrated on",
            file=sys.stderr,
        )
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    builtin = build_tasks([t for t in names if t in TASKS])
    check_tasks_disjoint(builtin, meta.get("provenance", {}).get("calibration", {}).get("sources", ()))
    harness = [t for t in names if t not in TASKS]
    label = meta["method"] or args.checkpoint
    with kernel_backend(args.kernels):
        result = perplexity(model, windows, text.name, args.batch_size, device, not args.quiet)
        print(f"{label}: perplexity {result.ppl:.4f} on {result.describe()}")
        for task in evaluate_tasks(model, tokenizer, builtin, bos_token(tokenizer), device, not args.quiet):
            print(f"{label}: {task.describe()}")
        if harness:
            from twla.harness import run_harness

            for task, metrics in run_harness(
                model.to(device), tokenizer, harness, args.batch_size, device, args.limit, args.include_path
            ).items():
                values = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
                print(f"{label}: {task} (lm-evaluation-harness) {values}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from twla.checkpoint import is_packed_checkpoint, load_packed
    from twla.generation import encode_prompt, generate
    from twla.kernels.dispatch import kernel_backend
    from twla.loading import load_model, model_source, resolve_device

    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    packed = is_packed_checkpoint(args.source)
    if (args.compare or args.fp_model) and not packed:
        raise ValueError(f"--compare needs a packed checkpoint; {args.source!r} is not one")
    models = []  # (label, model, tokenizer), the full-precision one first
    if packed:
        model, tokenizer, meta = load_packed(args.source, dtype=dtype)
        if tokenizer is None:
            raise ValueError(f"{args.source} holds no tokenizer; it is needed to encode the prompt")
        if args.compare:
            fp = args.fp_model or meta.get("model")
            if not fp:
                raise ValueError(f"{args.source} does not record its full-precision model; name it with --fp-model")
            source = model_source(fp)  # checked before any weights are read
            fp_model, fp_tokenizer = load_model(source, dtype=dtype)
            models.append((f"full precision ({fp})", fp_model, fp_tokenizer))
        models.append((f"quantized ({meta['method'] or args.source})", model, tokenizer))
    else:
        model, tokenizer = load_model(model_source(args.source), dtype=dtype)
        models.append((f"{args.source} (full precision)", model, tokenizer))
    answers = []
    for label, model, tokenizer in models:
        ids = encode_prompt(tokenizer, args.prompt, args.chat)
        print(f"── {label} ──", flush=True)
        with kernel_backend(args.kernels):
            out = generate(
                model.to(device),
                tokenizer,
                ids,
                args.max_new_tokens,
                args.sample,
                args.temperature,
                args.top_p,
                args.seed,
                stream=True,
            )
        print(f"[{out.new_tokens} tokens in {out.seconds:.2f} s: {out.tokens_per_second:.1f} tokens/s on {device}]\n")
        answers.append((label, out))
    if len(answers) > 1:
        same = answers[0][1].text == answers[1][1].text
        print("the two answers are " + ("identical" if same else "different"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        commands = {
            "bench": _bench,
            "quantize": _quantize,
            "eval": _eval,
            "upgrade": _upgrade,
            "generate": _generate,
            "kernels": speed.run,
            "scale": scale.run,
            "solvers": solver_bench.run,
        }
        commands[args.command](args)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:
        print(f"twla: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
