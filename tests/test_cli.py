import json
import os
from pathlib import Path

import pytest
import torch

from twla.bench.report import markdown_report
from twla.bench.rows import MethodRow
from twla.cli import main
from twla.deploy.format import read_config
from twla.deploy.integer_linear import IntegerLinear
from twla.deploy.load import load_packed
from twla.evaluate.tasks import build_tasks, evaluate_tasks
from twla.kernels.dispatch import kernel_backend
from twla.quantization.config import QuantConfig
from twla.quantization.methods import VOCABULARY, method_table


def test_bench_writes_report_plots_and_checkpoint(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    args = [
        "bench",
        "--model",
        tiny_checkpoint,
        "--methods",
        "absmean,e2m+gptq,e2m+gptq+kotms+a4,e2m+had+amp,pt2+gptq+wmix",
        "--wmix-budget",
        "3",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--eval-seqlen",
        "64",
        "--eval-tokens",
        "512",
        "--out",
        str(out),
        "--save",
        "e2m+gptq,pt2+gptq+wmix",
        "--quiet",
    ]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    methods = ["fp", "absmean", "e2m+gptq", "e2m+gptq+kotms+a4", "e2m+had+amp", "pt2+gptq+wmix"]
    assert [r["method"] for r in report["rows"]] == methods
    assert all(r["ppl"] > 1 for r in report["rows"])
    assert ": 4 windows × 64 tokens, seeds 0" in report["setup"]["calibration"]  # all 4 for the layer-wise pass
    assert report["rows"][2]["bits_storage"] > 2.0
    a4 = report["rows"][3]
    assert (a4["scheme"], a4["rotation"]) == ("W1.58A4", "kotms")
    assert set(a4["shaping"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"} and a4["activations"]["calibrated"] > 0
    text = (out / "report.md").read_text()
    assert "| e2m+gptq | W1.58A16 | none |" in text and "tri-modality" in text
    for row in report["rows"]:  # zero-shot accuracy and continuations for every row
        assert set(row["accuracy"]) == {"lastword", "nextsent"} and 0 <= row["accuracy"]["nextsent"]["mean"] <= 1
        assert row["accuracy"]["lastword"]["items"] == 80 and len(row["samples"]) == 3
    assert "| lastword acc | nextsent acc_norm |" in text and "## Continuations" in text
    mixed = report["rows"][4]
    assert mixed["scheme"] == "W1.58A2-8 mixed" and mixed["act_bits"] <= 4.0 + 1e-9
    assert mixed["allocation"]["allocation"]["bits"] and mixed["allocation"]["agreement"]["entries"] == 2 * 3
    assert "Mixed-precision activations (ILA-AMP)" in text
    counts = ", ".join(f"{b}: {mixed['allocation']['allocation']['bits'].count(b)}" for b in (2, 4, 6, 8))
    assert f"| {counts} |" in text
    seed0 = mixed["seeds"]["0"]  # the same model at uniform 4 bits, evaluated beside the allocation's
    assert seed0["uniform_ppl"] > 1 and (seed0["uniform_ppl"] == seed0["ppl"]) == mixed["allocation"]["kept_uniform"]
    assert f"| {seed0['ppl']:.3f}, {seed0['uniform_ppl']:.3f} ({seed0['ppl'] - seed0['uniform_ppl']:+.3f}) |" in text
    wmix = report["rows"][5]  # ternary and integer linears in one model: each stage averaged where it ran
    assert wmix["scheme"] == "W1.58/3/4A16" and 2.2 < wmix["bits_storage"] <= 3.0
    assert len(set(wmix["weight_allocation"]["formats"].values())) > 1
    assert {"itf", "rtn", "gptq-round"} <= set(wmix["stages"])
    assert "## Mixed-precision weights" in text
    mixed_packed = wmix["packed"]  # its integer linears packed beside the ternary ones, reloaded
    assert mixed_packed["ppl"] == pytest.approx(wmix["ppl"], rel=1e-3)
    assert mixed_packed["bits_per_weight"] == pytest.approx(wmix["bits_storage"], rel=1e-9)
    plots = ("layer_errors.png", "weight_hist.png", "rotation_hist.png", "allocation.png", "cost_prediction.png")
    for plot in (*plots, "frontier.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    saved = out / "models" / "e2m_gptq"
    packed = report["rows"][2]["packed"]
    assert packed["path"] == str(saved) and packed["ppl"] == pytest.approx(report["rows"][2]["ppl"], rel=1e-3)
    assert packed["bits_per_weight"] == pytest.approx(report["rows"][2]["bits_storage"], rel=1e-9)
    assert "## Packed checkpoints" in text and "| e2m+gptq | " + str(saved) in text
    # the saved checkpoint's CPU speed, beside the full-precision model in float32 and bfloat16
    assert set(report["rows"][0]["speed"]) == {"float32", "bfloat16"} and packed["speed"]["tokens_per_s"] > 0
    assert "## Speed on the CPU" in text and "| e2m+gptq (packed) |" in text
    assert list(report["rows"][0]["pipeline"]) == ["evaluation", "CPU speed"]
    steps = report["rows"][2]["pipeline"]  # the saved method's bench steps after its pipeline's stages
    assert list(steps)[-4:] == ["evaluation", "save and load back", "evaluation, packed", "CPU speed, packed"]
    model, _, meta = load_packed(str(saved))
    assert meta["method"] == "e2m+gptq" and meta["format"] == "twla-packed"
    w = model.model.layers[0].self_attn.q_proj.dequantize()
    assert max(row.unique().numel() for row in w) <= 3  # one 64-column block per row


def test_quantize_and_eval_commands(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "q"
    args = [
        "quantize",
        "--model",
        tiny_checkpoint,
        "--method",
        "pt2+gptq+ssr+had+a4",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--damp",
        "0.05",
        "--layer-windows",
        "3",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(args) == 0
    assert "bits per packed weight" in capsys.readouterr().out
    assert read_config(str(out)).weights.damp == 0.05 and read_config(str(out)).layer_windows == 3
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))  # by default the embedding in bfloat16, the rest kept
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored["model.norm.weight"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for k, t in stored.items() if k.endswith(("rot1", "rot2")))
    meta = json.loads((out / "twla_quant.json").read_text())
    report = json.loads((out / "twla_report.json").read_text())
    assert len(report["layers"]) == 14 and meta["linears"]["model.layers.1.mlp.up_proj"]["act_bits"] == 4
    assert meta["provenance"]["calibration"]["windows"] == 4 and meta["provenance"]["calibration"]["seed"] == 0
    evaluation = ["eval", str(out), "--eval-seqlen", "64", "--eval-tokens", "512", "--quiet"]
    assert main(evaluation) == 0
    printed = capsys.readouterr().out
    assert "pt2+gptq+ssr+had+a4: perplexity" in printed and "bits per packed weight" in printed
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a packed twla checkpoint" in capsys.readouterr().err


TOY_TASK = """task: toychoice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_generate_and_zero_shot_eval_commands(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "q")
    quantize = ["quantize", "--model", tiny_checkpoint, "--method", "pt2+gptq+ssr", "--nsamples", "4", "--seqlen", "64"]
    assert main([*quantize, "--out", out, "--quiet"]) == 0
    capsys.readouterr()
    # FP answer beside the quantized one: the checkpoint records the model it came from
    assert main(["generate", out, "--prompt", "It is a truth", "--max-new-tokens", "5", "--compare"]) == 0
    printed = capsys.readouterr().out
    assert f"── full precision ({os.path.abspath(tiny_checkpoint)}) ──" in printed
    assert "── quantized (pt2+gptq+ssr) ──" in printed and printed.count("s on cpu: prefill") == 2
    assert "the two answers are" in printed
    assert main(["generate", tiny_checkpoint, "--prompt", "Hello", "--max-new-tokens", "3", "--sample"]) == 0
    assert "(full precision) ──" in capsys.readouterr().out
    assert main(["generate", tiny_checkpoint, "--prompt", "Hello", "--compare"]) == 2
    assert "--compare needs a packed checkpoint" in capsys.readouterr().err
    # built-in tasks print the same accuracy that scoring the loaded model gives
    assert main(["eval", out, "--eval-tokens", "256", "--eval-seqlen", "64", "--tasks", "nextsent", "--quiet"]) == 0
    model, tokenizer, _ = load_packed(out)
    expected = evaluate_tasks(model, tokenizer, build_tasks(["nextsent"]), bos=None, device=torch.device("cpu"))[0]
    assert f"pt2+gptq+ssr: {expected.describe()}" in capsys.readouterr().out
    # lm-evaluation-harness tasks: a task over local files runs; one whose data is not cached is refused
    pytest.importorskip("lm_eval")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"ctx": c, "choices": [" a", " b"], "label": 0}) + "\n" for c in "xyz"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "toy.yaml").write_text(TOY_TASK.format(data=data))
    harness = ["eval", out, "--eval-tokens", "256", "--eval-seqlen", "64", "--quiet", "--tasks"]
    assert main([*harness, "toychoice", "--include-path", str(tmp_path / "tasks")]) == 0
    assert "toychoice (lm-evaluation-harness) acc,none" in capsys.readouterr().out
    assert main([*harness, "hellaswag", "--limit", "2"]) == 2
    assert "data must already be in the datasets cache" in capsys.readouterr().err
    assert main([*harness, "no_such_task"]) == 2
    assert "knows no task no_such_task" in capsys.readouterr().err


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "--model", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["bench", "--methods", "e2m+magic", "--quiet"]) == 2
    assert "unknown modifier" in capsys.readouterr().err
    assert main(["bench", "--methods", "e2m+had+amp", "--amp-budget", "1.5", "--quiet"]) == 2
    assert "smallest feasible budget is 2" in capsys.readouterr().err
    assert main(["bench", "--methods", "e2m+had+amp", "--amp-solver", "simplex", "--quiet"]) == 2
    assert "unknown bit solver" in capsys.readouterr().err
    assert main(["bench", "--methods", "e2m+gptq", "--damp", "-0.1", "--quiet"]) == 2
    assert "damp ≥ 0" in capsys.readouterr().err
    assert main(["bench", "--methods", "e2m+recon", "--recon-lr", "0", "--quiet"]) == 2
    assert "lr > 0" in capsys.readouterr().err


def test_integer_weights_are_packed_and_structured_ones_refused(tiny_checkpoint, tmp_path, capsys):
    """A uniform method streams into integer linears (a checkpoint directory is quantized one layer
    at a time); structured ternary has no packed format and is refused before any work."""
    out = str(tmp_path / "q")
    quantize = ["quantize", "--model", tiny_checkpoint, "--method", "rtn4+had+a4", "--nsamples", "4", "--seqlen", "64"]
    assert main([*quantize, "--out", out, "--quiet"]) == 0
    model = load_packed(out, dtype=torch.float32)[0]
    with kernel_backend("torch"):
        assert sum(isinstance(m, IntegerLinear) for m in load_packed(out)[0].modules()) == 14
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    args = ["quantize", "--model", tiny_checkpoint, "--method", "pt2+gptq+sal", "--out", str(tmp_path / "s")]
    assert main([*args, "--quiet"]) == 2
    assert "stores plain ternary and integer weights" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    bench = ["bench", "--model", tiny_checkpoint, "--methods", "pt2+sal", "--save", "pt2+sal", "--quiet"]
    assert main(bench) == 2
    assert "stores plain ternary and integer weights" in capsys.readouterr().err


def test_kernel_benchmark_command(tmp_path, capsys):
    assert main(["kernels", "--quick", "--models", "", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert ("GPU rows" in printed) != torch.cuda.is_available()
    report = json.loads((tmp_path / "report.json").read_text())
    if torch.cuda.is_available():
        assert report["kernels"] and all(v > 0 for row in report["kernels"] for k, v in row.items() if k.endswith("ms"))
    else:  # every CPU path timed, each weight's bytes counted: the 4-bit layout holds under a third of fp32's
        assert report["kernels"] and all(v > 0 for row in report["kernels"] for v in row["ms"].values())
        assert all(4 * row["weight_bytes"]["int4 A4"] < row["weight_bytes"]["fp32"] for row in report["kernels"])
    assert main(["kernels", "--models", "gpt5"]) == 2


@pytest.mark.slow
@pytest.mark.cpu_layout
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rows run where there is no GPU")
def test_kernel_benchmark_times_whole_models_on_the_cpu(tmp_path):
    assert main(["kernels", "--quick", "--models", "smollm2-135m", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["models"]
    assert [r["variant"] for r in rows] == ["float32", "bfloat16", "W1.58A16 packed", "W1.58A4 + rot packed"]
    assert all(r["tokens_per_s"] > 0 and r["prefill_s"] > 0 for r in rows)
    assert rows[2]["memory_vs_fp32"] < 0.25 and rows[3]["memory_vs_fp32"] < 0.25


def test_bench_refuses_shared_text(tiny_checkpoint, tmp_path, capsys):
    args = ["bench", "--model", tiny_checkpoint, "--calibration", "emma", "--evaluation", "emma", "--quiet"]
    assert main([*args, "--seqlen", "64", "--eval-seqlen", "64", "--out", str(tmp_path / "r")]) == 2
    assert "share text" in capsys.readouterr().err
    args = ["bench", "--model", tiny_checkpoint, "--calibration", "persuasion", "--quiet", "--seqlen", "64"]
    assert main([*args, "--eval-seqlen", "64", "--out", str(tmp_path / "r")]) == 2  # a task's book
    assert "task lastword is built from persuasion, which is in the calibration text" in capsys.readouterr().err
    assert main([*args, "--eval-seqlen", "64", "--out", str(tmp_path / "r"), "--tasks", "lastword,lastword"]) == 2
    assert "give distinct built-in tasks" in capsys.readouterr().err


def test_help_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "--methods" in capsys.readouterr().out


def test_solver_benchmark_command(tmp_path, capsys):
    out = tmp_path / "solvers.json"
    assert main(["solvers", "--sizes", "4,6", "--solvers", "dp,greedy,brute-force", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| 6 | brute-force |" in table and "| 4 | dp |" in table
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and all(r["excess"] >= -1e-12 for r in rows)
    assert main(["solvers", "--solvers", "simplex"]) == 2


def test_bench_over_seeds_reports_mean_spread_and_reconstruction(tiny_checkpoint, tmp_path):
    out = tmp_path / "seeds"
    common = ["--model", tiny_checkpoint, "--nsamples", "6", "--seqlen", "32", "--eval-seqlen", "32"]
    common += ["--eval-tokens", "256", "--quiet"]
    args = ["bench", *common, "--methods", "e2m+gptq,e2m+gptq+recon", "--seeds", "0,1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    plain, recon = report["rows"][1:]
    assert sorted(plain["seeds"]) == ["0", "1"]
    values = [s["ppl"] for s in plain["seeds"].values()]
    assert plain["ppl"] == pytest.approx(sum(values) / 2) and plain["ppl_spread"]["n"] == 2
    assert plain["ppl_spread"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert values[0] != values[1]  # different calibration windows give different models
    assert recon["reconstruction"]["after"] <= recon["reconstruction"]["before"]
    assert len(recon["reconstruction"]["blocks"]) == 2
    stages = recon["pipeline"]  # the first seed's time and memory per stage, in the order they ran
    assert list(stages) == ["capture", "block targets", "layer-wise solve", "block reconstruction", "evaluation"]
    assert stages["layer-wise solve"]["calls"] == 2 and stages["evaluation"]["seconds"] == recon["eval_seconds"]
    peaks = [e["peak_mb"] for e in stages.values()]  # the kernel's page counts lag by a few MiB at most
    assert all(b > a - 8 for a, b in zip(peaks[:-1], peaks[1:], strict=True))
    assert all(e["resident_mb"] > 0 for e in stages.values())
    text = (out / "report.md").read_text()
    assert "## Where the time and memory go" in text and "| e2m+gptq+recon | block reconstruction | 2 |" in text
    rows = [MethodRow.from_dict(r) for r in report["rows"]]  # report.md is rendered from the typed rows
    assert markdown_report(report["setup"], rows) + "\n" == text and rows[1].seeds.keys() == {0, 1}
    assert "## Perplexity per seed" in text and "## Block-wise reconstruction" in text
    assert f"{plain['ppl_spread']['mean']:.2f} ± {plain['ppl_spread']['std']:.2f}" in text
    assert "## Perplexity against stored bits" in text and "## Ablation" in text
    assert "| +recon | e2m+gptq |" in text  # the one change between the two rows, measured over both seeds
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", *common, "--seed", "1", "--seeds", "0,1", "--out", str(tmp_path / "x")]) == 2


def test_method_vocabulary_drives_parser_help_and_docs(capsys):
    """One table: every term parses into what it says it sets, `twla bench --help` lists it,
    alternatives are refused together, and the docs' method table is the table's own."""
    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text(encoding="utf-8")
    assert method_table() in docs
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    printed = capsys.readouterr().out
    sections = {"weights": "weights", "rotation": "rotation", "activations": "activations", "allocation": "allocation"}
    sections["weight allocation"] = "weight_allocation"
    for term in VOCABULARY:
        for name, sets in zip(term.names, term.sets, strict=True):
            label = name if term.group == "base" else f"+{name}"
            assert label in printed
            spec = name if term.group == "base" else f"e2m+{name}" + ("+a4" if name == "sym" else "")
            config = QuantConfig.from_method(spec)
            if term.group == "base":
                assert config.weights == sets
            elif term.group == "reconstruction":
                assert all(getattr(config, field) == value for field, value in sets.items()), spec
            else:
                section = getattr(config, sections[term.group])
                assert all(getattr(section, field) == value for field, value in sets.items()), spec
    choices = {t.choice for t in VOCABULARY if t.choice}
    for choice in choices:
        a, b = [n for t in VOCABULARY if t.choice == choice for n in t.names][:2]
        with pytest.raises(ValueError, match=f"several choices of {choice}"):
            QuantConfig.from_method(f"e2m+{a}+{b}")


def test_reconstruction_precision_flags_reach_the_configuration_and_refuse_unknown_types(capsys):
    from twla.cli import build_parser
    from twla.cli.options import overrides

    methods = ("pt2+recon+e2e",)
    args = build_parser(("bench",)).parse_args(
        ["bench", "--methods", *methods, "--e2e-precision", "bfloat16", "--recon-precision", "auto"]
    )
    given = overrides(args, methods)
    assert given == {"reconstruction": {"precision": "auto"}, "end_to_end": {"precision": "bfloat16"}}
    config = QuantConfig.from_method(methods[0], given)
    assert (config.reconstruction.precision, config.end_to_end.precision) == ("auto", "bfloat16")
    with pytest.raises(SystemExit):
        build_parser(("bench",)).parse_args(["bench", "--e2e-precision", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err
