"""Bad input gets a clear, specific error before any work, and nothing the toolkit did not write is lost."""

import json
import math
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from tests.helpers import tiny_llama
from twla import QuantConfig, quantize, solve_bits
from twla.cli import main
from twla.deploy.format import CheckpointError
from twla.deploy.load import load_packed
from twla.deploy.save import pack_model, save_packed
from twla.io import OutputPathError, atomic_directory, check_output_dir
from twla.models import builtin, loading
from twla.models.loading import load_model, resolve_device
from twla.solvers.bits import SolverTimeLimit
from twla.solvers.bits.compare import synthetic_costs

QUANTIZE = ["quantize", "--method", "e2m+gptq+had+a4", "--nsamples", "4", "--seqlen", "64", "--quiet"]


def listing(path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes."""
    out = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


@pytest.fixture(scope="module")
def packed(tiny_checkpoint, tmp_path_factory) -> str:
    """A packed checkpoint of the tiny model, written by `twla quantize`, calibrated on emma only."""
    out = str(tmp_path_factory.mktemp("packed") / "ckpt")
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--calibration", "emma", "--out", out]) == 0
    return out


# 1. Output paths: never delete or replace what twla did not write.


def test_quantize_refuses_outputs_that_would_lose_data(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    notes = tmp_path / "w"
    notes.mkdir()
    (notes / "notes.txt").write_text("x")
    somefile = tmp_path / "somefile.txt"
    somefile.write_text("keep me")
    before = listing(tmp_path)
    cases = {
        str(notes): "is a non-empty directory that is not a packed checkpoint written by twla",
        str(somefile): "exists and is not a directory",
        tiny_checkpoint: "would overwrite the model at",
        str(tmp_path): "is the working directory or one of its parents",
        str(tmp_path.parent): "is the working directory or one of its parents",
    }
    monkeypatch.chdir(tmp_path)
    for out, message in cases.items():
        assert main([*QUANTIZE, "--model", tiny_checkpoint, "--out", out]) == 2
        assert message in capsys.readouterr().err
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--out", "."]) == 2
    assert "working directory" in capsys.readouterr().err
    assert listing(tmp_path) == before  # nothing written, nothing removed
    assert os.path.isfile(os.path.join(tiny_checkpoint, "model.safetensors"))


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(tiny_checkpoint, packed, tmp_path, capsys):
    out = str(tmp_path / "ckpt")
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--out", out]) == 0
    first = listing(out)
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--out", out, "--seed", "1"]) == 2
    assert "already holds a packed checkpoint; pass --overwrite" in capsys.readouterr().err
    assert listing(out) == first
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--out", out, "--seed", "1", "--overwrite"]) == 0
    assert listing(out)["model.safetensors"] != first["model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".twla-")]


def test_stale_temporaries_of_interrupted_writes_are_removed(tmp_path):
    from twla.io import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".twla-tmp-{_HOST}-{dead.pid}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".twla-old-{_HOST}-{dead.pid}-def").mkdir()
    live = tmp_path / f".twla-tmp-{_HOST}-{os.getpid()}-ghi"  # a write still in progress
    live.mkdir()
    other_host = tmp_path / f".twla-tmp-00000000-{dead.pid}-jkl"
    other_host.mkdir()
    mine = tmp_path / ".tmp-user-data"
    mine.mkdir()
    with atomic_directory(str(tmp_path / "out")) as tmp:
        open(os.path.join(tmp, "f"), "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, mine.name, "out"])


def test_benchmark_json_outputs_never_replace_foreign_files(tmp_path, capsys):
    foreign = tmp_path / "results.json"
    foreign.write_text('{"mine": 1}')
    solvers = ["solvers", "--sizes", "4", "--solvers", "dp", "--out", str(foreign)]
    assert main(solvers) == 2
    assert "exists and was not written by twla" in capsys.readouterr().err
    assert foreign.read_text() == '{"mine": 1}'
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "report.json").write_text("notes")
    assert main(["kernels", "--quick", "--models", "", "--out", str(tmp_path / "k")]) == 2
    assert (tmp_path / "k" / "report.json").read_text() == "notes"
    own = tmp_path / "own.json"
    assert main([*solvers[:-1], str(own)]) == 0
    assert main([*solvers[:-1], str(own)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*solvers[:-1], str(own), "--overwrite"]) == 0


def test_check_output_dir_accepts_new_and_empty_directories(tmp_path):
    check_output_dir(str(tmp_path / "new"), "report", lambda p: False)
    (tmp_path / "empty").mkdir()
    check_output_dir(str(tmp_path / "empty"), "report", lambda p: False)
    with pytest.raises(OutputPathError, match="would overwrite the model"):
        check_output_dir(str(tmp_path / "m" / "sub"), "report", lambda p: False, protect=[str(tmp_path / "m")])


def test_a_concurrent_first_conversion_of_a_builtin_model_uses_the_other_one(tmp_path, monkeypatch):
    """Two processes converting a built-in model at once: the one whose write finds the other's
    checkpoint in place uses it; a failed write with no checkpoint there still fails."""
    monkeypatch.setenv("TWLA_CACHE", str(tmp_path))
    for name in ("raced", "failed"):
        monkeypatch.setitem(builtin.BUILTIN, name, builtin.BuiltinModel("json", "model.gguf", "json"))
    dequantized = SimpleNamespace(from_pretrained=lambda *args, **kwargs: SimpleNamespace(config=SimpleNamespace()))
    monkeypatch.setattr(loading, "AutoModelForCausalLM", dequantized)
    monkeypatch.setattr(loading, "AutoTokenizer", dequantized)

    def lose_the_race(model, tokenizer, path):
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:  # the other process's conversion
            f.write("{}")
        raise OutputPathError(f"{path} already holds a checkpoint")

    monkeypatch.setattr(loading, "save_checkpoint", lose_the_race)
    assert loading._builtin_checkpoint("raced") == str(tmp_path / "raced")

    def fail(model, tokenizer, path):
        raise OSError("no space left on device")

    monkeypatch.setattr(loading, "save_checkpoint", fail)
    with pytest.raises(OSError, match="no space left"):
        loading._builtin_checkpoint("failed")


# 2, 3, 11. Checkpoints: not taken for dense models, every output-defining file digested,
# byte-identical for the same seed.


def test_packed_checkpoint_is_not_taken_for_a_dense_model(packed, capsys):
    """(Stock transformers without twla refuses it too: tests/test_transformers.py.)"""
    config = json.load(open(os.path.join(packed, "config.json")))["quantization_config"]
    assert (config["quant_method"], config["format"], config["version"]) == ("twla", "twla-packed", 6)
    assert config["method"] == "e2m+gptq+had+a4" and len(config["linears"]) == 14
    with pytest.raises(ValueError, match="is a packed twla checkpoint, not a full-precision model"):
        load_model(packed)
    assert main(["bench", "--model", packed, "--quiet"]) == 2
    assert "is a packed twla checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "file,edit,message",
    [
        ("twla_quant.json", lambda d: d["linears"]["model.layers.0.mlp.up_proj"].update(act_bits=8), "was edited"),
        ("twla_quant.json", lambda d: d["linears"]["model.layers.1.mlp.down_proj"].update(act_clip=0.5), "was edited"),
        ("config.json", lambda d: d.update(hidden_act="relu"), "config.json does not match the SHA-256"),
        ("config.json", lambda d: d.update(rms_norm_eps=0.1), "config.json does not match the SHA-256"),
        ("generation_config.json", lambda d: d.update(eos_token_id=3), "generation_config.json does not match"),
    ],
)
def test_edited_checkpoint_files_are_refused(packed, tmp_path, file, edit, message):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in listing(packed).items():
        (copy / name).write_bytes(data)
    content = json.load(open(copy / file))
    edit(content)
    json.dump(content, open(copy / file, "w"), indent=2)
    with pytest.raises(CheckpointError, match=message):
        load_packed(str(copy))


def test_same_seed_gives_a_byte_identical_checkpoint(tiny_checkpoint, packed, tmp_path):
    again = str(tmp_path / "again")
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--calibration", "emma", "--out", again]) == 0
    a, b = listing(packed), listing(again)
    assert set(a) == set(b) and "twla_report.json" in a  # run metadata (timings) lives apart
    for name in a:
        if name != "twla_report.json":
            assert a[name] == b[name], name


# 4. Degenerate weights.


def degenerate_model():
    model = tiny_llama()
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight.zero_()  # an all-zero layer
        layers[0].mlp.up_proj.weight[:5] = 0  # all-zero rows
        layers[1].mlp.gate_proj.weight[:7] = 0.3  # constant rows
        layers[1].self_attn.o_proj.weight.mul_(1e-30)  # a tiny-norm layer
        layers[1].mlp.down_proj.weight[:, :128] = 0  # an all-zero block
    return model


@pytest.mark.parametrize("spec", ["absmean", "twn", "pt2+gptq", "e2m+gptq+ssr", "e2m+gptq+had+a4", "rtn4+gptq"])
def test_degenerate_weights_quantize_without_error(spec, calib_ids, tmp_path):
    model, report = quantize(degenerate_model(), QuantConfig.from_method(spec), calib_ids, device="cpu", progress=False)
    for record in report.records:
        assert math.isfinite(record.weight_error) and math.isfinite(record.output_error), record.name
        for stage in record.stages.values():
            assert all(math.isfinite(v) for v in stage.values())
    for name, weight in report.weights.items():
        assert torch.isfinite(weight.dequantize()).all(), name
    zero = report.weights["model.layers.0.self_attn.q_proj"]
    assert torch.equal(zero.dequantize(), torch.zeros_like(zero.dequantize()))
    if hasattr(zero, "alpha"):  # ternary: zero codes, finite α, μ
        assert not zero.codes.any() and torch.isfinite(zero.alpha).all() and torch.isfinite(zero.mu).all()
    with torch.no_grad():
        assert torch.isfinite(model(calib_ids[:2]).logits).all()
    if spec != "rtn4+gptq":
        save_packed(pack_model(model, report.weights), None, str(tmp_path / "z"))
        loaded, _, _ = load_packed(str(tmp_path / "z"))
        with torch.no_grad():
            assert torch.isfinite(loaded(calib_ids[:2]).logits).all()


def test_nan_weights_are_refused(calib_ids):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        quantize(model, QuantConfig.from_method("e2m"), calib_ids, device="cpu", progress=False)


@pytest.mark.parametrize("stream", ["--stream", "--in-memory"])
def test_a_nan_anywhere_in_the_model_is_refused_with_the_tensors_name(tiny_checkpoint, tmp_path, stream, capsys):
    from twla.models.loading import save_checkpoint

    model, tokenizer = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] = float("nan")
    save_checkpoint(model, tokenizer, str(tmp_path / "nan"))
    out = tmp_path / "out"
    assert main([*QUANTIZE, "--model", str(tmp_path / "nan"), stream, "--out", str(out)]) == 2
    assert "model.embed_tokens.weight contains NaN or inf values" in capsys.readouterr().err
    assert not out.exists()


def test_more_calibration_windows_than_the_text_holds_are_refused_at_once(tiny_checkpoint, tmp_path, capsys):
    start = time.perf_counter()
    args = [*QUANTIZE, "--model", tiny_checkpoint, "--calibration", "persuasion", "--out", str(tmp_path / "q")]
    assert main([*args, "--nsamples", "100000", "--seqlen", "128"]) == 2
    err = capsys.readouterr().err
    assert "100000 windows would repeat it: ask for at most" in err and "windows of 128" in err
    assert time.perf_counter() - start < 60  # refused before any model work (it used to run for hours)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), RuntimeError("Error while serializing: IoError(No space left on device)")],
)
def test_a_full_disk_is_one_clear_line_and_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys, error):
    import twla.deploy.save

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(twla.deploy.save, "write_safetensors", full)
    before = listing(tmp_path)
    assert main([*QUANTIZE, "--model", tiny_checkpoint, "--in-memory", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"twla: error: the disk filled while {tmp_path / 'q'} was written; nothing was written there (free "
                   "some space or write elsewhere)"]  # fmt: skip
    assert listing(tmp_path) == before


# 6. Calibration/evaluation overlap by content; provenance.


def test_overlap_is_detected_by_content_not_by_name(tiny_checkpoint, tmp_path, capsys):
    from twla.data.text import load_text

    copy = tmp_path / "copy_of_persuasion.txt"
    copy.write_text(load_text("persuasion").text)
    args = ["bench", "--model", tiny_checkpoint, "--calibration", "persuasion", "--evaluation", str(copy)]
    assert main([*args, "--seqlen", "64", "--eval-seqlen", "64", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert (
        "calibration and evaluation share text: 100.0% of the evaluated 12-token sequences" in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()


def test_eval_warns_when_the_checkpoint_was_calibrated_on_the_evaluation_text(packed, capsys):
    meta = json.load(open(os.path.join(packed, "twla_quant.json")))
    cal = meta["provenance"]["calibration"]
    assert cal["sources"] == ["emma"] and (cal["windows"], cal["seqlen"], cal["seed"]) == (4, 64, 0)
    assert len(cal["tokens_sha256"]) == 64 and len(cal["ngram_sample"]) == 4 * (64 - 12 + 1)
    evaluation = ["eval", packed, "--eval-seqlen", "64", "--eval-tokens", "256", "--quiet"]
    assert main([*evaluation, "--evaluation", "emma"]) == 0
    assert "WARNING" in capsys.readouterr().err
    assert main([*evaluation, "--evaluation", "persuasion"]) == 0
    assert "WARNING" not in capsys.readouterr().err


# 7, 8, 9. Arguments and options checked before any work; reports written whole or not at all.


@pytest.mark.parametrize(
    "args,message",
    [
        (["--eval-tokens", "-100"], "must be ≥ 0, got -100"),
        (["--eval-seqlen", "0"], "must be ≥ 2, got 0"),
        (["--batch-size", "0"], "must be ≥ 1, got 0"),
        (["--nsamples", "0"], "must be ≥ 1, got 0"),
        (["--seqlen", "x"], "'x' is not an integer"),
    ],
)
def test_numeric_options_are_range_checked(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_errors_come_before_the_weights_are_read(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model's weights were read before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    out = ["--out", str(tmp_path / "r"), "--quiet"]
    cases = [
        (["bench", "--model", tiny_checkpoint, "--seqlen", "4096", *out], "seqlen 4096 exceeds the model's context"),
        (
            [
                "bench",
                "--model",
                tiny_checkpoint,
                "--seqlen",
                "64",
                "--eval-seqlen",
                "64",
                "--nsamples",
                "2",
                "--methods",
                "e2m",
                *out,
                "--calibration",
                str(_short_text(tmp_path)),
            ],
            "calibration text is too short",
        ),
        (["bench", "--methods", "e2m+recon", "--nsamples", "3", *out], "holds out 4 of the 3 calibration windows"),
        (["bench", "--seed", "1", "--seeds", "0,1", *out], "either --seed or --seeds"),
        (["bench", "--methods", "e2m+a4+a8", *out], "names several choices of activation bits (a4, a8)"),
        (["bench", "--methods", "e2m+sym", *out], "sym has no effect without quantized activations"),
        (["bench", "--methods", "e2m+gptq", "--amp-budget", "3", *out], "--amp-budget applies to methods with +amp"),
        (["bench", "--methods", "e2m+recon", "--e2e-steps", "9", *out], "--e2e-steps applies to methods with +e2e"),
        (
            ["bench", "--methods", "e2m+amp-site", "--amp-costs", "fisher", "--amp-beta", "0.5", *out],
            "--amp-beta weighs measured adjacent pairs, and the Fisher costs of e2m+amp-site have none",
        ),
        (
            ["bench", "--methods", "e2m+amp-fisher", "--amp-beta", "0.5", *out],
            "the Fisher costs of e2m+amp-fisher have none",
        ),
        (["bench", "--methods", "e2m,e2m+gptq", "--save", "pt2", *out], "--save names methods that are not benched"),
        (["bench", "--methods", "", *out], "no methods to bench"),
        (["bench", "--methods", "e2m,e2m", *out], "names e2m more than once"),
        (["quantize", "--model", tiny_checkpoint, "--out", str(tmp_path / "q"), "--device", "tpu"], "device 'tpu'"),
    ]
    if not torch.cuda.is_available():
        cases.append((["bench", "--device", "cuda", *out], "device 'cuda' is not available"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = ["--seqlen", "64", "--eval-seqlen", "64"]
    cases.append((["bench", "--model", tiny_checkpoint, "--calibration", str(empty), *short, *out], "is empty"))
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(gpt2)
    cases.append((["bench", "--model", str(gpt2), *out], "unsupported architecture 'gpt2'"))
    before = listing(tmp_path)
    for args, message in cases:
        assert main(args) == 2, args
        assert message in capsys.readouterr().err, args
    assert listing(tmp_path) == before  # nothing written, nothing removed


def _short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A very short text.")
    return path


def test_missing_devices_are_named():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0' is not available"):
            resolve_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu7")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_failing_bench_writes_no_report(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr("twla.bench.run.quantize", broken)
    out = tmp_path / "r"
    args = ["bench", "--model", tiny_checkpoint, "--methods", "e2m", "--seqlen", "64", "--eval-seqlen", "64"]
    assert main([*args, "--nsamples", "2", "--eval-tokens", "256", "--out", str(out), "--quiet"]) == 2
    assert os.listdir(tmp_path) == []  # no report, no temporaries


# 10. Allocation solvers: a time limit is a wall-clock promise.


def test_brute_force_refusal_is_short():
    with pytest.raises(ValueError) as info:
        solve_bits(synthetic_costs(5000, seed=0), 4.0, solver="brute-force")
    assert len(str(info.value)) < 200 and "4^5000 = about 10^3010 allocations" in str(info.value)


def _solve_with_time_limit(solver: str, limit: float) -> float:
    """Solve 2000 units with ``solver`` under ``limit`` seconds; check what it returns; the seconds taken."""
    costs = synthetic_costs(2000, seed=0)
    start = time.perf_counter()
    try:
        allocation = solve_bits(costs, 4.0, solver=solver, time_limit=limit)
    except SolverTimeLimit as err:
        assert f"found no allocation for 2000 units within its time limit of {limit:g} s" in str(err)
    else:
        assert allocation.status in ("optimal", "time limit") and allocation.mean_bits <= 4.0 + 1e-9
        assert np.isfinite(allocation.objective)
        if allocation.status == "optimal":
            assert allocation.gap is not None and allocation.relative_gap < 1e-6
    return time.perf_counter() - start


@pytest.mark.parametrize("solver", ["cp-sat", "scip", "milp", "cvxpy"])
def test_time_limited_solves_return_an_allocation_or_say_why(solver):
    _solve_with_time_limit(solver, 4.0)


@pytest.mark.timing
@pytest.mark.parametrize("solver", ["cp-sat", "scip", "milp", "cvxpy"])
def test_time_limits_hold_on_large_instances(solver):
    # about 5 % over on an idle machine (SCIP takes about 6 s to prove 1000 units optimal, so
    # ignoring the limit on 2000 units fails); a wall-time check, so it runs only with -m timing
    assert _solve_with_time_limit(solver, 4.0) <= 1.5 * 4.0
