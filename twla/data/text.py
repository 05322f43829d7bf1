"""Text sources and token windows for calibration and evaluation.

A source is a built-in public-domain corpus (``emma``, ``mansfieldpark``,
``prideprejudice``, ``persuasion``, ``northangerabbey``, ``sensesensibility``,
``mobydick``), a path to a UTF-8 text file, or ``wikitext2`` / ``c4`` (through
`datasets`, needs a reachable hub). Join several with ``+``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import Tensor

from twla.data.corpora import CORPORA, HUB_DATASETS


@dataclass(frozen=True)
class Text:
    """Loaded text and the parts (corpus names or resolved paths) it came from."""

    text: str
    parts: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(os.path.basename(p) for p in self.parts)


def _hub_text(name: str, role: str) -> str:
    repo, subset, splits, sep = HUB_DATASETS[name]
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(f"text source {name!r} needs the 'datasets' package: pip install 'twla[hub]'") from err
    try:
        if name == "c4":
            files = {
                "train": "en/c4-train.00000-of-01024.json.gz",
                "validation": "en/c4-validation.00000-of-00008.json.gz",
            }
            split = splits[role]
            ds = datasets.load_dataset(repo, data_files={split: files[split]}, split=split)
            ds = ds.select(range(min(len(ds), 5000)))
        else:
            ds = datasets.load_dataset(repo, subset, split=splits[role])
    except Exception as err:  # network, hub and cache failures all surface here
        raise RuntimeError(
            f"could not load {name!r} from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"offline, use a built-in corpus ({', '.join(CORPORA)}) or a local text file"
        ) from err
    return sep.join(ds["text"])


def load_text(source: str, role: str = "evaluation") -> Text:
    """Load a text source (see module docstring); ``role`` picks a hub dataset's split."""
    texts, parts = [], []
    for part in source.split("+"):
        part = part.strip()
        if part in CORPORA:
            texts.append((resources.files("twla.data.corpora") / CORPORA[part]).read_text(encoding="utf-8"))
            parts.append(part)
        elif part in HUB_DATASETS:
            texts.append(_hub_text(part, role))
            parts.append(f"{part}:{HUB_DATASETS[part][2][role]}")
        elif os.path.isfile(part):
            with open(part, encoding="utf-8") as fh:
                texts.append(fh.read())
            parts.append(os.path.realpath(part))
        else:
            raise FileNotFoundError(
                f"text source {part!r} is neither a built-in corpus ({', '.join(CORPORA)}), "
                f"a hub dataset ({', '.join(HUB_DATASETS)}) nor an existing file"
            )
    text = "\n\n".join(texts)
    if not text.strip():
        raise ValueError(f"text source {source!r} is empty")
    return Text(text, tuple(parts))


def check_disjoint(calibration: Text, evaluation: Text) -> None:
    """Calibration and evaluation must never share a source (the quick check by name, before
    tokenizing; :func:`check_no_overlap` compares the content)."""
    shared = {p.split(":")[0] for p in calibration.parts} & {p.split(":")[0] for p in evaluation.parts}
    if shared:
        raise ValueError(f"calibration and evaluation share text ({', '.join(sorted(shared))}); pick disjoint sources")


NGRAM = 12  # tokens; distinct English books share no 12-token n-gram in practice
OVERLAP_LIMIT = 0.01  # fraction of shared n-grams from which two texts overlap


def ngram_hashes(ids: Tensor, n: int = NGRAM) -> np.ndarray:
    """64-bit polynomial hashes of every n-gram of consecutive tokens within each row of ``ids``
    (1-D: one text; 2-D: windows, no n-gram across windows)."""
    rows = ids.reshape(1, -1) if ids.ndim == 1 else ids
    out = [np.zeros(0, dtype=np.uint64)]
    for row in rows.cpu().numpy().astype(np.uint64):
        m = row.size - n + 1
        if m > 0:
            h = np.zeros(m, dtype=np.uint64)
            for j in range(n):
                h = h * np.uint64(1_000_003) + row[j : j + m]
            out.append(h)
    return np.concatenate(out)


def shared_fraction(probe: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of the n-gram hashes ``probe`` that also occur in ``reference``."""
    return float(np.isin(probe, reference).mean()) if probe.size else 0.0


def check_no_overlap(calibration_ids: Tensor, evaluation: Tensor) -> None:
    """Refuse evaluation windows that share text with the calibration tokens, by content: a
    fraction ≥ :data:`OVERLAP_LIMIT` of their token n-grams occurs in the calibration text."""
    shared = shared_fraction(ngram_hashes(evaluation), ngram_hashes(calibration_ids))
    if shared >= OVERLAP_LIMIT:
        raise ValueError(
            f"calibration and evaluation share text: {100 * shared:.1f}% of the evaluated {NGRAM}-token "
            "sequences occur in the calibration text; pick disjoint sources"
        )


def provenance(text: Text, windows: Tensor, seed: int, *, sample: int = 256) -> dict:
    """What a quantized model was calibrated on: sources, window count and length, seed, the
    SHA-256 of the token windows, and ``sample`` of their n-gram hashes (evenly spaced), by which
    a later evaluation can detect overlap with its own text."""
    hashes = ngram_hashes(windows)
    picks = hashes[np.linspace(0, hashes.size - 1, min(sample, hashes.size)).astype(int)] if hashes.size else hashes
    return {
        "calibration": {
            "sources": list(text.parts),
            "windows": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]),
            "seed": seed,
            "tokens_sha256": hashlib.sha256(windows.cpu().numpy().astype(np.int64).tobytes()).hexdigest(),
            "ngram": NGRAM,
            "ngram_sample": [int(h) for h in picks],
        }
    }


def calibration_overlap(provenance: dict, evaluation: Tensor) -> float | None:
    """Fraction of a checkpoint's sampled calibration n-grams found in ``evaluation`` (None when
    the checkpoint records none)."""
    cal = provenance.get("calibration") or {}
    if not cal.get("ngram_sample") or cal.get("ngram") != NGRAM:
        return None
    return shared_fraction(np.array(cal["ngram_sample"], dtype=np.uint64), ngram_hashes(evaluation))


def tokenize(tokenizer, text: Text) -> Tensor:
    """Token ids of the whole text, without BOS or other special tokens (1-D)."""
    return torch.tensor(tokenizer(text.text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def bos_token(tokenizer) -> int | None:
    """The BOS id that ``tokenizer`` puts before a text by default (Gemma's ``<bos>``), or None
    (SmolLM2 and Llama-style tokenizers configured without one). Windows start with it so the
    model sees text the way it was trained to."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def _prefixed(windows: Tensor, bos: int | None) -> Tensor:
    return windows if bos is None else torch.cat([torch.full((windows.shape[0], 1), bos), windows], dim=1)


def calibration_windows(ids: Tensor, nsamples: int, seqlen: int, *, seed: int, bos: int | None = None) -> Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random starts drawn with ``seed``; with ``bos``,
    each is that token followed by ``seqlen − 1`` text tokens."""
    if nsamples < 1 or seqlen < 2:
        raise ValueError("need at least one calibration sample of at least 2 tokens")
    span = seqlen - (bos is not None)
    if ids.numel() < span + 1:
        raise ValueError(
            f"calibration text is too short: {ids.numel()} tokens, need more than seqlen={seqlen}; "
            "give a longer text or a shorter sequence length"
        )
    if nsamples > ids.numel() // span:
        raise ValueError(
            f"calibration text holds {ids.numel()} tokens, {ids.numel() // span} windows of {seqlen}; "
            f"{nsamples} windows would repeat it: ask for at most {ids.numel() // span}, or give more text"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - span, (nsamples,), generator=gen)
    return _prefixed(torch.stack([ids[s : s + span] for s in starts.tolist()]), bos)


def evaluation_windows(ids: Tensor, seqlen: int, *, max_tokens: int | None = None, bos: int | None = None) -> Tensor:
    """Non-overlapping windows of ``seqlen`` tokens covering the first ``max_tokens`` tokens; with
    ``bos``, each is that token followed by ``seqlen − 1`` text tokens (so every window still
    scores ``seqlen − 1`` predictions)."""
    if max_tokens is not None:
        ids = ids[:max_tokens]
    span = seqlen - (bos is not None)
    nwin = ids.numel() // span if span > 0 else 0
    if nwin < 1:
        raise ValueError(f"evaluation text is too short: {ids.numel()} tokens, need at least one window of {seqlen}")
    return _prefixed(ids[: nwin * span].view(nwin, span), bos)
