"""Quantizing a checkpoint one decoder layer at a time: the same checkpoint as in memory, bounded memory."""

import filecmp
import gc
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import tiny_gemma3, tiny_llama
from twla.cli import main
from twla.deploy.format import storage_dtype
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.deploy.streamed import PackedLayers, streamed_packed
from twla.models.loading import load_model, model_source, save_checkpoint
from twla.models.memory import resident_memory
from twla.models.shards import CheckpointTensors, TensorSource, write_safetensors
from twla.quantization.config import QuantConfig
from twla.quantization.fake_quant import QuantLinear
from twla.quantization.pipeline import quantize
from twla.quantization.streaming import StreamedLayers, quantize_checkpoint

METHOD = "pt2+gptq+ssr+had+a4+recon"
E2E = "pt2+gptq+ssr+had+a4+recon+e2e"  # end-to-end reconstruction reloads each layer (the default, with SSR)


@pytest.fixture(scope="module")
def checkpoint(small_tokenizer, tmp_path_factory) -> str:
    """A tiny random Llama of 3 layers, untied, saved in several safetensors shards."""
    tokenizer = small_tokenizer
    path = str(tmp_path_factory.mktemp("stream") / "ckpt")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256, num_hidden_layers=3)
    model.save_pretrained(path, max_shard_size="200KB")
    tokenizer.save_pretrained(path)
    assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    return path


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 1024, (8, 32), generator=torch.Generator().manual_seed(1))  # the small tokenizer's ids


def _config(method: str) -> QuantConfig:
    return QuantConfig.from_method(method, {"end_to_end": {"steps": 20}} if "e2e" in method else None).with_seed(0)


def _in_memory(path: str, method: str, calib: torch.Tensor, out: str, dtype=None) -> None:
    config = _config(method)
    source = model_source(path)
    model, tokenizer = load_model(source)
    model, report = quantize(model, config, calib, device="cpu", progress=False)
    save_packed(
        pack_model(model, report.weights),
        tokenizer,
        out,
        method=method,
        config=config.to_dict(),
        dtype=dtype,
        source="m",
    )


def _same_files(a: str, b: str) -> list[str]:
    """Files that differ between two checkpoints (the run report, with timings, aside)."""
    names = (set(os.listdir(a)) | set(os.listdir(b))) - {"twla_report.json"}
    return sorted(n for n in names if not os.path.isfile(os.path.join(b, n)) or not filecmp.cmp(
        os.path.join(a, n), os.path.join(b, n), shallow=False
    ))  # fmt: skip


@pytest.mark.parametrize(
    "method,dtype,offload",
    [
        (METHOD, "keep", False),
        ("pt2+gptq+ssr+r1+had+a4", "float16", True),
        ("e2m+gptq+ssr+g64+had+reloc+a4", "keep", False),
        (E2E, "keep", False),
        ("pt2+gptq+ssr+r1+kotms+a4", "keep", True),  # learned rotations: a first pass over the layers
        ("pt2+gptq+had+amp", "keep", False),  # bit allocation: every cost pass reloads the layers
        ("pt2+gptq+had+amp-fisher", "keep", False),  # the Fisher costs' backward pass reloads them too
        ("pt2+gptq+ssr+had+amp-site+recon+e2e", "float16", False),  # kept through both whole-model stages
    ],
)
def test_streaming_gives_the_same_checkpoint_bytes_as_in_memory(checkpoint, calib, tmp_path, method, dtype, offload):
    memory, streamed = str(tmp_path / "memory"), str(tmp_path / "streamed")
    _in_memory(checkpoint, method, calib, memory, storage_dtype(dtype))
    config = _config(method)
    report, bits = quantize_checkpoint(
        checkpoint,
        config,
        calib,
        path=streamed,
        method=method,
        device="cpu",
        progress=False,
        dtype=storage_dtype(dtype),
        reference="m",
        offload=offload,
    )
    assert _same_files(memory, streamed) == []
    assert set(os.listdir(streamed)) == set(os.listdir(memory)) | {"twla_report.json"}  # no scratch files left
    assert len(report.records) == 3 * 7 and not report.weights  # each layer's codes went to disk
    model, _, _ = load_packed(streamed)
    assert bits.bits_per_weight > 1.58 and model(calib[:1]).logits.isfinite().all()


def test_streaming_gemma3_gives_the_same_checkpoint_bytes(small_tokenizer, calib, tmp_path):
    """Sandwich norms, QK-norm, scaled embeddings and sliding-window layers, read layer by layer."""
    tokenizer = small_tokenizer
    path = str(tmp_path / "gemma")
    model = tiny_gemma3()
    model.resize_token_embeddings(len(tokenizer))
    save_checkpoint(model, tokenizer, path)
    memory, streamed = str(tmp_path / "memory"), str(tmp_path / "streamed")
    _in_memory(path, E2E, calib, memory)
    config = _config(E2E)
    quantize_checkpoint(path, config, calib, path=streamed, method=E2E, device="cpu", progress=False, reference="m")
    assert _same_files(memory, streamed) == []


@pytest.mark.parametrize("method", [METHOD, E2E, "pt2+gptq+had+amp"])
def test_only_one_decoder_layer_holds_weights_at_a_time(checkpoint, calib, tmp_path, monkeypatch, method):
    """Also in end-to-end reconstruction: its teacher pass and every forward and backward pass
    reload the layers one at a time, and nothing keeps a dropped layer's modules (and with them
    its weights) alive."""
    materialized = []

    def counting(load):
        def wrapped(self, index):
            loaded = load(self, index)
            materialized.append([i for i, m in enumerate(self.layers) if any(not p.is_meta for p in m.parameters())])
            return loaded

        return wrapped

    alive = []  # quantized linears holding real weights anywhere, as each layer is packed
    finish = StreamedLayers.finish

    def finishing(self, index, layer, weights):
        alive.append(sum(type(m) is QuantLinear and not m.weight.is_meta for m in gc.get_objects()))
        return finish(self, index, layer, weights)

    monkeypatch.setattr(StreamedLayers, "load", counting(StreamedLayers.load))
    monkeypatch.setattr(StreamedLayers, "reload", counting(StreamedLayers.reload))
    monkeypatch.setattr(StreamedLayers, "finish", finishing)
    quantize_checkpoint(
        checkpoint, _config(method), calib, path=str(tmp_path / "out"), method=method, device="cpu", progress=False
    )
    assert all(len(layers) == 1 for layers in materialized)
    assert alive == [7, 7, 7]  # the layer being packed; no dropped layer's modules are kept by anything
    if method == METHOD:
        assert materialized == [[0], [1], [2]]
    elif method == E2E:  # the teacher pass window by window, quantization, then the tuned passes
        assert len(materialized) > 20 * 2 * 3 and materialized[: 3 * 8 + 3] == [[0], [1], [2]] * 9
    else:  # quantization, then a pass per measured cost
        assert len(materialized) > 3 * 10


def test_an_interrupted_streaming_run_leaves_the_old_checkpoint(checkpoint, calib, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    config = QuantConfig.from_method("pt2+gptq+ssr").with_seed(0)
    quantize_checkpoint(checkpoint, config, calib, path=out, method="pt2+gptq+ssr", device="cpu", progress=False)
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    release = StreamedLayers.release

    def interrupted(self, index, layer, report, keep=False):
        if index == 1:
            raise KeyboardInterrupt
        release(self, index, layer, report, keep)

    monkeypatch.setattr(StreamedLayers, "release", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(
            checkpoint, config, calib, path=out, method="pt2+gptq+ssr", device="cpu", progress=False, overwrite=True
        )
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the staging directory is gone


def test_bad_checkpoints_are_refused_before_any_work(small_tokenizer, checkpoint, calib, tmp_path):
    tokenizer = small_tokenizer
    config = QuantConfig.from_method("pt2+gptq+ssr")
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    save_checkpoint(model, tokenizer, str(tmp_path / "nan"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        quantize_checkpoint(str(tmp_path / "nan"), config, calib, path=str(tmp_path / "out"))
    save_checkpoint(
        tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256), tokenizer, str(tmp_path / "bin")
    )
    os.remove(tmp_path / "bin" / "model.safetensors")
    torch.save({}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        quantize_checkpoint(str(tmp_path / "bin"), config, calib, path=str(tmp_path / "out"))
    renamed = str(tmp_path / "renamed")
    save_checkpoint(tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256), tokenizer, renamed)
    tensors = CheckpointTensors(renamed)
    save_file({k.replace("model.", "base."): tensors.get(k) for k in tensors.keys()}, f"{renamed}/model.safetensors")
    with pytest.raises(ValueError, match="tensor names differ"):
        quantize_checkpoint(renamed, config, calib, path=str(tmp_path / "out"))
    truncated = str(tmp_path / "truncated")
    shutil.copytree(checkpoint, truncated)
    shard = sorted(f for f in os.listdir(truncated) if f.endswith(".safetensors"))[-1]
    os.truncate(os.path.join(truncated, shard), os.path.getsize(os.path.join(truncated, shard)) - 100)
    with pytest.raises(ValueError, match=shard):
        quantize_checkpoint(truncated, config, calib, path=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_tensor_files_are_written_as_safetensors_writes_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16]
    tensors = {f"layers.{i}.w": (10 * torch.randn(3, 5, generator=g)).to(d) for i, d in enumerate(dtypes)}
    tensors |= {
        "codes": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "empty": torch.zeros(0),
        "s": torch.tensor(2.0),
    }
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    shuffled = {k: TensorSource.of(tensors[k]) for k in sorted(tensors, reverse=True)}
    write_safetensors(str(tmp_path / "b.safetensors"), shuffled, {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    read = CheckpointTensors.of_files([str(tmp_path / "b.safetensors")])
    assert all(torch.equal(read.get(k), t) for k, t in tensors.items())


def test_quantize_command_streams_a_checkpoint_directory(checkpoint, tmp_path, capsys):
    args = ["quantize", "--model", checkpoint, "--method", METHOD, "--nsamples", "8", "--seqlen", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "streamed")]) == 0
    assert "one decoder layer at a time" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "memory"), "--in-memory"]) == 0
    assert "whole model in memory" in capsys.readouterr().out
    assert _same_files(str(tmp_path / "memory"), str(tmp_path / "streamed")) == []
    assert main([*args[:4], E2E, *args[5:], "--out", str(tmp_path / "default")]) == 0
    assert "one decoder layer at a time" in capsys.readouterr().out  # the default method streams too
    mixed = [*args[:4], "pt2+gptq+wmix", *args[5:], "--wmix-budget", "3", "--out", str(tmp_path / "mixed")]
    assert main(mixed) == 0  # a weight allocation runs the whole model, so it does not stream
    assert "whole model in memory" in capsys.readouterr().out
    assert main([*mixed[:-1], str(tmp_path / "refused"), "--stream"]) == 2
    assert "--stream contradicts 'pt2+gptq+wmix'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "refused")


def test_resident_memory_sees_an_allocation_and_keeps_its_peak():
    before = resident_memory()
    block = torch.ones(64 * 2**20)  # 256 MiB, every page written
    held = resident_memory()
    del block
    gc.collect()
    after = resident_memory()
    assert held["resident_mb"] > before["resident_mb"] + 200 and held["peak_mb"] >= held["resident_mb"]
    # the kernel's page counts are synchronised lazily: a few MiB either way
    assert after["resident_mb"] < held["resident_mb"] - 200 and after["peak_mb"] > held["resident_mb"] - 8


@pytest.mark.slow
def test_streaming_peak_memory_does_not_grow_with_depth(tmp_path):
    """Peak RSS of real runs, each in its own process, at 2 and 8 decoder layers of SmolLM2's width (six
    more layers, so that in memory they stand clear of the peak's run-to-run noise, about 60 MB)."""
    from twla.bench.depth import measure, synthetic_checkpoint

    peaks = {}
    for depth in (2, 8):
        path = str(tmp_path / f"d{depth}")
        synthetic_checkpoint(path, 576, depth, vocab=8192)
        for mode in ("stream", "memory"):
            peaks[(mode, depth)] = (
                measure(path, mode, "pt2+gptq+ssr", nsamples=4, seqlen=64, work=str(tmp_path))["peak_rss_mb"] * 2**20
            )
    tensors = CheckpointTensors(path)
    layer = sum(tensors.get(k).nbytes for k in tensors.keys() if k.startswith("model.layers.0."))
    print({k: round(v / 2**20) for k, v in peaks.items()}, f"one layer {layer / 2**20:.1f} MiB")
    assert peaks[("stream", 8)] < 1.1 * peaks[("stream", 2)]
    assert peaks[("memory", 8)] - peaks[("memory", 2)] > 2 * layer  # in memory, the 6 more layers add up


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_evaluation_gives_the_loaded_models_outputs_one_layer_at_a_time(
    checkpoint, calib, tmp_path, monkeypatch, capsys, dtype
):
    out = str(tmp_path / "packed")
    quantize_checkpoint(checkpoint, _config(METHOD), calib, path=out, method=METHOD, device="cpu", progress=False)
    loaded, _, _ = load_packed(out, dtype=dtype)
    materialized = []
    load = PackedLayers.load

    def counting(self, index):
        layer = load(self, index)
        materialized.append(
            [i for i, m in enumerate(self.layers) if any(not t.is_meta for t in m.state_dict().values())]
        )
        return layer

    monkeypatch.setattr(PackedLayers, "load", counting)
    ids = calib[:2]
    with streamed_packed(out, device="cpu", dtype=dtype) as (model, tokenizer, meta):
        assert meta["method"] == METHOD and tokenizer is not None
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert materialized == [[0], [1], [2]]
    # streaming reads the reference modules; so does the in-memory model on the torch backend
    args = ["eval", out, "--eval-tokens", "512", "--eval-seqlen", "64", "--quiet", "--kernels", "torch"]
    assert main(args) == 0
    in_memory = capsys.readouterr().out
    assert main([*args, "--stream"]) == 0
    assert capsys.readouterr().out == in_memory and "perplexity" in in_memory
    assert main([*args, "--stream", "--tasks", "hellaswag"]) == 2
