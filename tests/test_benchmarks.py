"""Issue 18's benchmark pieces on the CPU: diffusers' example training step (the reference), diffusers' fused
pipeline, the FLOP count behind MFU, the summary line and the GPU-session driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adapters.base import load_pipeline
from adapters.formats import to_kohya
from adapters.lora import LoraModule, attention_targets
from benchmarks import summary
from benchmarks.reference import DiffusersGeneration, ScriptStep
from benchmarks.sd15 import Record

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("model", ["tiny_model", "tiny_sdxl_model"])
def test_script_step_encodes_every_step_and_trains_only_its_lora(model, image_folder, request):
    model_dir = request.getfixturevalue(model)
    step = ScriptStep(model_dir, image_folder, batch=2, size=32, device="cpu", batches=2)
    lora = {n: p.detach().clone() for n, p in step.unet.named_parameters() if p.requires_grad}
    base = {n: p.detach().clone() for n, p in step.unet.named_parameters() if not p.requires_grad}
    # the scripts' LoRA sits on the layers lora-studio trains by default (attn1 + attn2 q/k/v/out)
    layers = {n.rsplit(".lora_A", 1)[0] for n in lora if ".lora_A" in n}
    assert layers == set(attention_targets(load_pipeline(str(model_dir), device="cpu").unet, "both"))
    assert all(p.dtype == torch.float32 for p in step.params)
    timing = step.speed(warmup=1, steps=2)
    # nothing cached: the VAE and every text encoder ran in each of the three steps
    encoders = {f"text_encoder_{i + 1}": 3 for i in range(2 if model == "tiny_sdxl_model" else 1)}
    assert step.calls == {"vae_encode": 3, **encoders}
    assert timing["script_images_per_s"] == pytest.approx(2 / timing["script_step_s"])
    after = dict(step.unet.named_parameters())
    assert all(not torch.equal(after[n], v) for n, v in lora.items() if ".lora_B" in n)  # B starts at 0 too
    assert all(torch.equal(after[n], v) for n, v in base.items())


def random_adapter(model_dir: Path, path: Path, scale: float = 0.3) -> dict:
    """A random rank-4 LoRA on the UNet's attention layers, written in the kohya layout; returns its modules."""
    unet = load_pipeline(str(model_dir), device="cpu").unet
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name in attention_targets(unet, "both"):
        layer = unet.get_submodule(name)
        modules[f"unet.{name}"] = LoraModule(
            down=torch.randn(4, layer.in_features, generator=gen) * scale,
            up=torch.randn(layer.out_features, 4, generator=gen) * scale,
            alpha=4.0,
        )
    save_file(to_kohya(modules), str(path))
    return modules


def test_diffusers_reference_draws_with_the_adapter_fused_at_its_strength(tiny_model, tmp_path):
    modules = random_adapter(tiny_model, tmp_path / "a.safetensors")
    base = load_pipeline(str(tiny_model), device="cpu").unet
    ref = DiffusersGeneration(tiny_model, tmp_path / "a.safetensors", strength=0.7, device="cpu", steps=2)
    unet = ref.pipe.unet
    assert not any("lora" in name for name, _ in unet.named_parameters())  # LoRA layers gone, nothing unfused
    for key, m in modules.items():
        path = key.split(".", 1)[1]
        expected = base.get_submodule(path).weight + 0.7 * m.delta()
        torch.testing.assert_close(unet.get_submodule(path).weight, expected, rtol=1e-5, atol=1e-5)
    assert ref.draw()[0].size == (32, 32)
    assert ref.seconds(warmup=0, repeats=1) > 0


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_flops_per_image_is_what_torch_counts_on_real_weights(arch):
    from diffusers import UNet2DConditionModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    unet = summary.with_default_lora(UNet2DConditionModel(**summary.unet_config(arch, True)))
    batch = 3  # 64-pixel pictures are 8x8 latents; 77 caption tokens
    extra = {}
    if arch == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32), "time_ids": torch.zeros(batch, 6)}
    counter = FlopCounterMode(display=False)
    # on real CPU tensors the attention must run in its math form to be counted (its CPU kernel has no formula)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = unet(torch.randn(batch, 4, 8, 8), torch.full((batch,), 500), torch.randn(batch, 77, 64), **extra)
        out.sample.pow(2).mean().backward()
    assert summary.flops_per_image(arch, 64, True) * batch == counter.get_total_flops() > 0


def write_json(folder: Path, name: str, **fields) -> None:
    (folder / name).write_text(json.dumps(fields))


def stored_results(folder: Path) -> None:
    """One result of each kind with distinct numbers, plus older, eager, wrapped and tiny-less distractors."""
    gpu = dict(device="NVIDIA H200", tiny=True, resolution=64, date="2026-12-05")
    sd15 = dict(gpu, script="sd15", command="python3 benchmarks/sd15.py")
    sdxl = dict(gpu, script="sdxl", command="python3 benchmarks/sdxl.py")
    write_json(folder, "b.json", **sd15, time="2026-12-05T10:00:00", batch=8, train_images_per_s=101.0,
               speedup_vs_script=1.11)  # fmt: skip
    write_json(folder, "a.json", **sd15, time="2026-12-05T11:00:00", batch=8, train_images_per_s=102.0,
               speedup_vs_script=2.22)  # fmt: skip
    write_json(folder, "o.json", **sd15, time="2026-12-05T09:30:00", batch=8, train_images_per_s=130.0,
               torch_compile=True)  # fmt: skip
    write_json(folder, "q.json", **dict(sd15, command="python3 benchmarks/sd15.py --channels-last on"),
               time="2026-12-05T09:40:00", batch=8, train_images_per_s=140.0, torch_compile=True)  # fmt: skip
    write_json(folder, "r.json", **dict(sd15, command="python3 benchmarks/sd15.py --channels-last=on"),
               channels_last="on", time="2026-12-05T09:45:00", batch=8, train_images_per_s=150.0,
               torch_compile=True)  # fmt: skip
    write_json(folder, "s.json", **sd15, channels_last="on", time="2026-12-05T12:30:00", batch=8,
               train_images_per_s=160.0, speedup_vs_script=9.99)  # fmt: skip
    write_json(folder, "u.json", **dict(sd15, command="python3 benchmarks/sd15.py --channels-last on"),
               time="2026-12-05T12:40:00", batch=8, train_images_per_s=170.0, speedup_vs_script=8.88)  # fmt: skip
    write_json(folder, "c.json", **dict(sd15, command="python3 benchmarks/sd15.py --no-cuda-graphs"),
               time="2026-12-05T12:00:00", batch=8, train_images_per_s=9.0, speedup_vs_script=0.5)  # fmt: skip
    write_json(folder, "d.json", **sd15, how="a monkeypatch", time="2026-12-05T13:00:00", batch=8,
               train_images_per_s=8.0, speedup_vs_script=0.4)  # fmt: skip
    write_json(folder, "e.json", **sd15, time="2026-12-05T10:30:00", batch=1, train_images_per_s=33.0,
               speedup_vs_script=3.33)  # fmt: skip
    write_json(folder, "f.json", **sd15, time="2026-12-05T14:00:00", batch=1, generate_base_30_steps_s=0.4,
               generate_30_steps_s=0.44, generate_fused_30_steps_s=0.402, strength_change_ms=0.0123,
               adapter_cold_load_s=0.0567)  # fmt: skip
    write_json(folder, "l.json", **sd15, time="2026-12-05T18:00:00", batch=1, generate_30_steps_s=0.45,
               strength_change_ms=0.0124, diffusers_compiled_30_steps_s=0.66,
               generate_compiled_30_steps_s=0.33)  # fmt: skip
    write_json(folder, "m.json", **sd15, time="2026-12-05T19:00:00", batch=1, generate_30_steps_s=0.47)  # fmt: skip
    write_json(folder, "n.json", **sd15, time="2026-12-05T09:00:00", batch=1, generate_30_steps_s=0.48,
               generate_compiled_30_steps_s=0.29, generate_background_compiled_30_steps_s=0.31)  # fmt: skip
    write_json(folder, "g.json", device="NVIDIA H200", tiny=True, script="scaling", processes=2, efficiency=0.876,
               date="2026-12-05")  # fmt: skip
    write_json(folder, "h.json", **sdxl, time="2026-12-05T15:00:00", batch=4, train_images_per_s=14.5,
               step_kind="cuda graph", gradient_checkpointing=False, generate_compiled_30_steps_s=0.765)  # fmt: skip
    write_json(folder, "p.json", **sdxl, time="2026-12-05T14:00:00", batch=4, train_images_per_s=19.0,
               step_kind="cuda graph", gradient_checkpointing=False, torch_compile=True)  # fmt: skip
    write_json(folder, "i.json", **sdxl, time="2026-12-05T15:30:00", batch=1, train_images_per_s=3.45,
               train_peak_memory_gib=7.65, step_kind="cuda graph", gradient_checkpointing=True)  # fmt: skip
    write_json(folder, "j.json", **sdxl, time="2026-12-05T16:00:00", batch=1, train_images_per_s=9.9,
               train_peak_memory_gib=12.5, step_kind="cuda graph", gradient_checkpointing=False,
               generate_30_steps_s=0.987)  # fmt: skip
    write_json(folder, "k.json", **dict(sdxl, device="cpu"), time="2026-12-05T17:00:00", batch=4,
               train_images_per_s=1.0, gradient_checkpointing=False)  # fmt: skip


def test_summary_takes_each_field_from_the_newest_result_of_its_kind(tmp_path):
    stored_results(tmp_path)
    results = summary.load_results(tmp_path, allow_tiny=True)
    values, sources = summary.summarize(results)
    mfu = {arch: summary.flops_per_image(arch, 64, True) / 989.4e12 for arch in ("sd15", "sdxl")}
    expected = {
        "sd15_bs8_mfu": 150.0 * mfu["sd15"],
        "speedup_bs8": 2.22,
        "speedup_bs1": 3.33,
        "two_gpu_efficiency": 0.876,
        "gen_512_30_s": 0.33,
        "gen_vs_compiled_diffusers": 0.66 / 0.33,
        "scale_change_ms": 0.0124,
        "cold_load_s": 0.0567,
        "unfused_overhead": 0.44 / 0.4 - 1,
        "fused_overhead": 0.402 / 0.4 - 1,
        "sdxl_bs4_mfu": 19.0 * mfu["sdxl"],
        "sdxl_bs1_peak_gib": 7.65,
        "sdxl_bs1_img_s": 3.45,
        "gen_sdxl_1024_30_s": 0.765,
    }
    assert list(values) == list(summary.FIELDS)
    assert values == pytest.approx(expected)
    # the compiled step's speed, not a newer uncompiled run's, channels-last as auto takes it there; the speed-up
    # from the run that timed the script too, not from a newer channels-last run without the compile (auto: off)
    assert sources["sd15_bs8_mfu"].name == "r.json" and sources["sdxl_bs4_mfu"].name == "p.json"
    assert sources["speedup_bs8"].name == "a.json"
    assert sources["cold_load_s"].name == "f.json" and sources["scale_change_ms"].name == "l.json"
    # the page's compiled picture, not the newer uncompiled one; where both compiles were timed, the background's
    assert sources["gen_512_30_s"].name == "l.json"
    assert summary.page_picture_s(json.loads((tmp_path / "n.json").read_text())) == 0.31
    line = summary.summary_line(values)
    assert line.startswith("summary: sd15_bs8_mfu=") and line.endswith("gen_sdxl_1024_30_s=0.765")
    assert " speedup_bs8=2.22 speedup_bs1=3.33 two_gpu_efficiency=0.876 gen_512_30_s=0.33 " in line
    # without --allow-tiny nothing here counts, and every field is na
    assert summary.summary_line(summary.summarize(summary.load_results(tmp_path))[0]) == "summary: " + " ".join(
        f"{field}=na" for field in summary.FIELDS
    )


def test_write_rewrites_only_the_summary_block_and_keeps_it_last(tmp_path, capsys):
    stored_results(tmp_path)
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    args = ["--results", str(tmp_path), "--results-md", str(md), "--allow-tiny", "--write"]
    summary.main(args)
    with md.open("a") as f:  # someone adds a section after the summary
        f.write("\n## Later section\n\nKept.\n")
    (tmp_path / "a.json").unlink()  # the older batch-8 result is the newest now
    summary.main(args)
    text = md.read_text()
    printed = capsys.readouterr().out.splitlines()[-1]
    assert text.startswith("# Benchmark results\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n## Later section\n\nKept.\n\n")
    assert text.count("## Summary") == 1 and text.index("## Later section") < text.index("## Summary")
    assert text.splitlines()[-1] == printed and " speedup_bs8=1.11 " in printed
    assert "| speedup_bs8 | 1.11 | `b.json` | NVIDIA H200 | 2026-12-05 |" in text


def test_record_keeps_what_was_measured_before_a_stop(tmp_path):
    path = tmp_path / "out" / "r.json"
    record = Record(path, {"script": "sd15"})
    record["train_step_s"] = 0.1
    record.attempt("script", lambda: 1 / 0)
    kept = json.loads(path.read_text())
    error = "ZeroDivisionError: division by zero"
    assert kept == {"script": "sd15", "complete": False, "train_step_s": 0.1, "script_error": error}
    record.finish()
    assert json.loads(path.read_text())["complete"] is True


def test_gpu_session_driver_runs_its_parts_and_ends_with_the_summary_line(tmp_path):
    env = dict(os.environ, TINY="1", PYTHON=sys.executable, WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh")],
        env=dict(env, OUT=str(out), PARTS="sd15_b1 sdxl_b4_compile nonsense"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((out / "sd15_b1.json").read_text())
    assert result["complete"] and result["batch"] == 1 and result["script_images_per_s"] > 0
    # sdxl.py's own arguments reach the trainer (the run's start event says what --torch-compile decided)
    sdxl = json.loads((out / "sdxl_b4_compile.json").read_text())
    assert sdxl["complete"] and sdxl["batch"] == 4 and sdxl["train_images_per_s"] > 0 and "torch_compile" in sdxl
    lines = run.stdout.strip().splitlines()
    assert any("unknown part nonsense" in line for line in lines)
    assert lines[-1].startswith("summary: sd15_bs8_mfu=na speedup_bs8=na speedup_bs1=")
    assert f"speedup_bs1={summary.fmt(result['speedup_vs_script'])} " in lines[-1]
    log = (out / "session.log").read_text()
    assert "== part sd15_b1" in log and log.splitlines()[-1] == lines[-1]
    # no time left: every part is skipped, and the summary still comes, all na
    skipped = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_session.sh")],
        env=dict(env, OUT=str(tmp_path / "none"), BUDGET_S="0"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = skipped.stdout.strip().splitlines()
    assert sum("skipped" in line for line in lines) == 8  # every default part
    assert lines[-1] == "summary: " + " ".join(f"{field}=na" for field in summary.FIELDS)


def test_scaling_row_goes_under_its_table_and_the_summary_stays_last(tmp_path):
    from benchmarks.scaling import add_row

    md = tmp_path / "RESULTS.md"
    head = "| date | device | processes | batch / process |\n|---|---|---|---|\n| 1 | cpu | 2 | 2 |\n"
    md.write_text(f"# Results\n\n{head}\nText.\n\n## Summary\n\nsummary: x=na\n")
    add_row(md, "| 2 | gpu | 2 | 8 |")
    assert md.read_text() == f"# Results\n\n{head}| 2 | gpu | 2 | 8 |\n\nText.\n\n## Summary\n\nsummary: x=na\n"


def test_the_stored_results_end_with_the_summary_line():
    """The issue's form: RESULTS.md ends with the summary line, every field named, `na` for a measure not taken."""
    text = (Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md").read_text()
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith("summary: "), last
    assert [part.split("=")[0] for part in last.removeprefix("summary: ").split()] == list(summary.FIELDS)
