"""``twla generate``: text from a packed checkpoint or a full-precision model."""

from __future__ import annotations

import argparse

from twla.cli.options import add_runtime, int_at_least

DESCRIPTION = (
    "Continue a prompt with SOURCE (a packed checkpoint, or a model as for --model) and print the tokens as\n"
    "they come and the decoding speed. Instruct models get the prompt as a user turn of their chat template.\n"
    "--compare also runs the full-precision model the checkpoint was quantized from and prints both answers."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="packed checkpoint directory, built-in model, local checkpoint or hub id")
    p.add_argument("--prompt", required=True, help="the text to continue (or the user's message)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64, help="at most this many (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="sampling nucleus (default 0.9)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="sampling seed (default 0)")
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None, help="use the chat template")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="continue the plain prompt")
    p.add_argument("--compare", action="store_true", help="also answer with the full-precision model")
    p.add_argument(
        "--fp-model", default=None, help="full-precision model for --compare (default: the one the checkpoint records)"
    )
    add_runtime(p)


def run(args: argparse.Namespace) -> None:
    import torch

    from twla.evaluate.answer import answer

    answer(
        args.source,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        compare=args.compare,
        fp_model=args.fp_model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        kernels=args.kernels,
    )
