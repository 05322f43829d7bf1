"""``twla generate``: a prompt answered by a packed checkpoint, and beside it by the full-precision
model it came from, streamed with the decoding speed."""

from __future__ import annotations

import torch

from twla.deploy.format import is_packed_checkpoint
from twla.deploy.load import load_packed
from twla.evaluate.generation import Generation, encode_prompt, generate
from twla.kernels.dispatch import kernel_backend
from twla.models.loading import load_model, model_source, resolve_device


def answer(
    source: str,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int = 0,
    chat: bool | None = None,
    compare: bool = False,
    fp_model: str | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    kernels: str = "auto",
) -> list[tuple[str, Generation]]:
    """Continue ``prompt`` with ``source`` (a packed checkpoint, or a model as for
    :func:`twla.load_model`), printing the tokens as they come; with ``compare`` the
    full-precision model the checkpoint records (or ``fp_model``) answers first. Returns
    (label, generation) per model."""
    device = resolve_device(device)
    packed = is_packed_checkpoint(source)
    if (compare or fp_model) and not packed:
        raise ValueError(f"--compare needs a packed checkpoint; {source!r} is not one")
    models = []  # (label, model, tokenizer), the full-precision one first
    if packed:
        with kernel_backend(kernels):  # the CPU layout is chosen at load
            model, tokenizer, meta = load_packed(source, dtype=dtype, device=device)
        if tokenizer is None:
            raise ValueError(f"{source} holds no tokenizer; it is needed to encode the prompt")
        if compare:
            fp = fp_model or meta.get("model")
            if not fp:
                raise ValueError(f"{source} does not record its full-precision model; name it with --fp-model")
            fp_source = model_source(fp)  # checked before any weights are read
            fp_model_, fp_tokenizer = load_model(fp_source, dtype=dtype)
            models.append((f"full precision ({fp})", fp_model_, fp_tokenizer))
        models.append((f"quantized ({meta['method'] or source})", model, tokenizer))
    else:
        model, tokenizer = load_model(model_source(source), dtype=dtype)
        models.append((f"{source} (full precision)", model, tokenizer))
    answers = []
    for label, model, tokenizer in models:
        ids = encode_prompt(tokenizer, prompt, chat=chat)
        print(f"── {label} ──", flush=True)
        with kernel_backend(kernels):
            out = generate(
                model.to(device),
                tokenizer,
                ids,
                max_new_tokens=max_new_tokens,
                sample=sample,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stream=True,
            )
        print(f"[{out.new_tokens} tokens in {out.seconds:.2f} s on {device}: {out.speed(ids.shape[1])}]\n")
        answers.append((label, out))
    if len(answers) > 1:
        same = answers[0][1].text == answers[1][1].text
        print("the two answers are " + ("identical" if same else "different"))
    return answers
