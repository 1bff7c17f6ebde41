"""The command line, as a user runs it: train, generate, inspect; bad input gives a message and exit code 2."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_generate_inspect(tiny_model, image_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(
        [
            "train",
            "--base-model",
            tiny_model,
            "--data",
            image_folder,
            "--steps",
            4,
            "--rank",
            4,
            "--output",
            "style.safetensors",
            "--preview-prompt",
            "a red circle",
            "--preview-every",
            2,
        ],
        capsys,
    )
    assert code == 0, err
    assert Path("style.safetensors").is_file()
    run = next(Path("runs").iterdir())  # default run folder under ./runs
    assert (run / "config.json").is_file() and (run / "events.jsonl").is_file()
    assert sorted(p.name for p in (run / "previews").iterdir()) == ["step_000002.png", "step_000004.png"]
    shutil.copy("style.safetensors", "other.safetensors")

    code, out, err = run_cli(
        [
            "generate",
            "--base-model",
            tiny_model,
            "--prompt",
            "a red circle",
            "--adapter",
            "style.safetensors:0.8",
            "--adapter",
            "other.safetensors:0.1",
            "--seed",
            7,
            "--sampling-steps",
            3,
            "--output",
            "out.png",
        ],
        capsys,
    )
    assert code == 0, err
    assert "is now" not in err  # the current spellings raise no notice
    image = Image.open("out.png")
    assert image.size == (32, 32) and "Seed: 7" in image.info["parameters"]
    assert "<lora:style:0.8>" in image.info["parameters"] and "<lora:other:0.1>" in image.info["parameters"]

    # the same file twice would be drawn at the sum of its strengths, and the picture's text name only one
    twice = ["generate", "--base-model", tiny_model, "--prompt", "x", "--output", "twice.png", "--sampling-steps", 2]
    code, _, err = run_cli(
        [*twice, "--adapter", "style.safetensors:0.8", "--adapter", "./style.safetensors:0.5"], capsys
    )
    assert code == 2 and "--adapter ./style.safetensors is given twice (strengths 0.8 and 0.5)" in err, err
    assert not Path("twice.png").exists()

    # --seed -1: a random seed, said, and written into the picture so that the same command draws it again
    pictures = []
    for name in ("r1.png", "r2.png"):
        code, out, err = run_cli([*twice[:-3], name, "--sampling-steps", 2, "--seed", -1], capsys)
        seed = int(re.search(r"seed (\d+) \(--seed \1 draws this picture again\)", out).group(1))
        assert code == 0 and f"Seed: {seed}," in Image.open(name).info["parameters"], err
        pictures.append((seed, np.asarray(Image.open(name))))
    assert pictures[0][0] != pictures[1][0] and not np.array_equal(pictures[0][1], pictures[1][1])
    code, out, err = run_cli([*twice[:-3], "again.png", "--sampling-steps", 2, "--seed", pictures[0][0]], capsys)
    assert np.array_equal(np.asarray(Image.open("again.png")), pictures[0][1])
    code, _, err = run_cli([*twice[:-3], "neg.png", "--guidance", -3], capsys)
    assert code == 2 and "guidance must be 0 or more, got -3" in err and not Path("neg.png").exists()

    code, out, err = run_cli(["inspect", "style.safetensors"], capsys)
    info = json.loads(out)
    assert info["format"] == "kohya" and info["ranks"] == [4] and info["targets"]["attn1"] > 0
    unet = next(Path(tiny_model).glob("unet/*.safetensors"))  # a model's weights, not an adapter
    code, out, err = run_cli(["inspect", unet], capsys)
    assert code == 1 and json.loads(out)["modules"] == 0 and json.loads(out)["alphas"] == "none"
    assert (
        err.strip() == f"{unet} holds no LoRA weights in a layout lora-studio knows: it is not an adapter it can use"
    )


def test_output_never_overwritten_without_asking(tiny_model, image_folder, tmp_path, capsys):
    existing = tmp_path / "mine.safetensors"
    existing.write_bytes(b"precious")
    code, _, err = run_cli(
        [
            "train",
            "--base-model",
            tiny_model,
            "--data",
            image_folder,
            "--steps",
            1,
            "--output",
            existing,
            "--run-dir",
            tmp_path / "r",
        ],
        capsys,
    )
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert existing.read_bytes() == b"precious"
    out = tmp_path / "o.png"
    out.write_bytes(b"also precious")
    code, _, err = run_cli(["generate", "--base-model", tiny_model, "--prompt", "x", "--output", out], capsys)
    assert code == 2 and "already exists" in err and out.read_bytes() == b"also precious"


def test_an_output_that_could_never_be_written_is_refused_before_any_work(tiny_model, image_folder, tmp_path, capsys):
    """An --output under a file (or in a folder the user cannot write) is refused before training, not after the
    run has trained and its adapter would be lost; the same for generate, export and demo's --output-dir."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    run = tmp_path / "r"
    args = ["train", "--base-model", tiny_model, "--data", image_folder, "--steps", 1, "--run-dir", run]
    code, _, err = run_cli([*args, "--output", notes / "a.safetensors"], capsys)
    assert code == 2 and f"{notes} is a file, not a folder" in err and "--output" in err, err
    assert not run.exists() and notes.read_text() == "mine"  # no run started, nothing of the person's touched
    folder = tmp_path / "old.safetensors"
    folder.mkdir()
    code, _, err = run_cli([*args, "--output", folder, "--overwrite"], capsys)
    assert code == 2 and f"--output {folder} is a folder" in err and not run.exists(), err
    generate = ["generate", "--base-model", tiny_model, "--prompt", "x", "--output", notes / "o.png"]
    code, _, err = run_cli(generate, capsys)
    assert code == 2 and f"{notes} is a file, not a folder" in err, err
    code, _, err = run_cli(["demo", "--output-dir", notes], capsys)
    assert code == 2 and "--output-dir" in err and f"{notes} is a file, not a folder" in err, err
    code, _, err = run_cli(["inspect", tmp_path], capsys)  # a folder given where an adapter file goes
    assert code == 2 and f"adapter file {tmp_path} is a folder" in err, err


def test_a_cancelled_run_says_where_its_adapter_is_and_how_to_go_on(
    tiny_model, image_folder, tmp_path, capsys, monkeypatch
):
    """Ctrl-C during `train` (here: the stop it asks for, after two steps) names the adapter learned so far and the
    command that resumes the run; that command goes on to the end."""
    import trainer.loop

    real_train, asked = trainer.loop.train, []
    monkeypatch.setattr(
        trainer.loop,
        "train",
        lambda config: real_train(config, should_stop=lambda: asked.append(1) or len(asked) > 2),
    )
    run = tmp_path / "run"
    args = ["train", "--base-model", tiny_model, "--data", image_folder, "--steps", 6, "--run-dir", run]
    code, _, err = run_cli(args, capsys)
    adapter = run / "adapter.safetensors"
    assert code == 130 and adapter.is_file(), err
    said = f"training cancelled at step 2; the adapter learned so far is {adapter}; go on with: "
    assert said in err and err.strip().endswith(f"lora-studio train --run-dir {run} --resume latest"), err
    monkeypatch.setattr(trainer.loop, "train", real_train)
    code, out, err = run_cli(["train", "--run-dir", run, "--resume", "latest"], capsys)
    assert code == 0 and f"wrote {adapter}" in out, err


def test_a_mistyped_flag_value_is_one_line_with_a_close_match_not_the_usage_block(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--lr-scheduler", "cosin"])
    err = capsys.readouterr().err.splitlines()
    assert stopped.value.code == 2 and not any(line.startswith("usage:") for line in err), err
    assert err[0].startswith("lora-studio train: error: argument --lr-scheduler: invalid choice: 'cosin'")
    assert err[0].endswith("; did you mean 'cosine'?") and err[1] == "(lora-studio train --help lists every flag)"


def test_generate_names_the_largest_size_it_draws(tiny_model, tmp_path, capsys):
    """A side far above the model's own (4096 on the built-in model's 64 px ran for minutes) is refused at once;
    the size here is small so that, were the check gone, the test would draw it quickly and fail, not hang."""
    out = tmp_path / "big.png"
    big = ["--width", 256, "--sampling-steps", 1, "--output", out]
    code, _, err = run_cli(["generate", "--base-model", tiny_model, "--prompt", "x", *big], capsys)
    assert code == 2 and "width 256 is more than 4x the model's native 32 px" in err and "use at most 128" in err
    assert not out.exists()


def test_every_command_prints_its_help(capsys):
    """`lora-studio COMMAND --help` prints every flag of every command (a "%" in a help text once broke it)."""
    from app.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    assert {"train", "generate", "ui", "demo", "export", "caption", "inspect"} <= set(commands)
    printed = {}
    for command in commands:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0, command
        printed[command] = capsys.readouterr().out
    assert "--torch-compile" in printed["train"] and "16% (batch 1)" in printed["train"]
    assert "--adapter" in printed["generate"]


def test_generate_names_a_missing_or_broken_adapter_before_loading_the_base_model(tmp_path, capsys, monkeypatch):
    """A typo in --adapter is reported at once (loading a real base model takes many seconds first otherwise)."""
    from adapters import runtime

    def no_model(*args, **kwargs):
        raise AssertionError("the base model was loaded before the adapters were checked")

    monkeypatch.setattr(runtime, "Studio", no_model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not an adapter")
    for adapter, said in ((tmp_path / "typo.safetensors", "does not exist"), (broken, "not a valid safetensors")):
        args = ["generate", "--prompt", "x", "--adapter", f"{adapter}:0.8", "--output", tmp_path / "o.png"]
        code, _, err = run_cli(args, capsys)
        assert code == 2 and str(adapter) in err and said in err, err
    assert not (tmp_path / "o.png").exists()


def test_generate_compile_draws_the_uncompiled_picture_through_a_compiled_unet(
    tiny_model, tmp_path, capsys, monkeypatch
):
    """`generate --compile` puts the UNet through torch.compile (here a backend that counts what it is given)
    and writes the picture the plain command writes."""
    import numpy as np
    import torch

    from adapters import runtime

    graphs = []
    monkeypatch.setattr(runtime, "COMPILE_BACKEND", lambda gm, inputs: graphs.append(gm) or gm.forward)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    pictures = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"picture{len(flags)}.png"
        args = ["generate", "--base-model", tiny_model, "--prompt", "a red circle", "--sampling-steps", 3]
        code, _, err = run_cli([*args, "--output", out, *flags], capsys)
        assert code == 0, err
        pictures.append(np.asarray(Image.open(out), dtype=int))
        assert bool(graphs) == bool(flags)
    assert np.abs(pictures[0] - pictures[1]).max() <= 1
    torch._dynamo.reset()


def test_old_spellings_still_work_with_a_notice(tiny_model, image_folder, tmp_path, capsys):
    """Flags renamed for one name per concept (--out, --steps of generate, --sample-*) keep working for now."""
    code, _, err = run_cli(
        ["generate", "--base-model", tiny_model, "--prompt", "x", "--steps", 2, "--out", tmp_path / "o.png"], capsys
    )
    assert code == 0, err
    assert "--out is now --output" in err and "--steps is now --sampling-steps" in err
    assert Image.open(tmp_path / "o.png").info["parameters"].count("Steps: 2") == 1
    old_file = tmp_path / "old.json"
    old_file.write_text(json.dumps({"data": str(image_folder), "sample_prompt": "a red circle", "sample_every": 3}))
    from trainer.config import TrainConfig

    config = TrainConfig.from_file(old_file)
    assert (config.preview_prompt, config.preview_every) == (("a red circle",), 3)
    assert "'sample_prompt' (--sample-prompt) is now 'preview_prompt'" in capsys.readouterr().err
    code, _, err = run_cli(["train", "--config", old_file, "--plan"], capsys)  # said once, not once per reading
    assert code == 0 and err.count("'sample_prompt' (--sample-prompt) is now 'preview_prompt'") == 1, err


@pytest.mark.parametrize(
    "setup,extra,message",
    [
        ("empty", [], "has no images"),
        ("fake_png", [], "fake.png: not a readable image"),
        ("no_caption", [], "img0.png: caption img0.txt is missing"),
        ("ok", ["--rank", "0"], "rank (--rank) must be at least 1"),
        ("ok", ["--learning-rate", "-1e-4"], "learning_rate (--learning-rate) must be a positive number"),
        ("ok", ["--base-model", "/no/such/folder"], "neither an existing folder nor a Hugging Face id"),
    ],
)
def test_bad_input_names_the_file_or_field(setup, extra, message, image_folder, tmp_path, capsys):
    data = image_folder
    if setup == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif setup == "fake_png":
        (data / "fake.png").write_text("not an image")
        (data / "fake.txt").write_text("caption")
    elif setup == "no_caption":
        (data / "img0.txt").unlink()
    code, _, err = run_cli(["train", "--data", data, "--steps", 1, "--run-dir", tmp_path / "r", *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "r").exists()  # refused before a run folder is made


def test_a_misspelt_base_model_leaves_no_run_folder(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["train", "--data", image_folder, "--base-model", "bultin"], capsys)
    assert code == 2 and "base model 'bultin' is neither an existing folder nor a Hugging Face id" in err
    assert not (tmp_path / "runs").exists()


def test_local_folder_without_model_index(tmp_path, image_folder, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notamodel").mkdir()
    code, _, err = run_cli(["train", "--data", image_folder, "--base-model", tmp_path / "notamodel"], capsys)
    assert code == 2 and "has no model_index.json" in err and not (tmp_path / "runs").exists()


def test_console_script_exit_code(tmp_path):
    """The installed `lora-studio` command itself exits non-zero with the message on stderr."""
    exe = Path(sys.executable).with_name("lora-studio")
    proc = subprocess.run(
        [str(exe), "train", "--data", str(tmp_path), "--rank", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    assert "rank (--rank) must be at least 1" in proc.stderr and "Traceback" not in proc.stderr


def test_a_run_does_not_tell_the_person_to_install_torchvision():
    """transformers 5 says "CLIPImageProcessor requires torchvision (not installed)" when diffusers' pipelines import;
    the project needs no torchvision, and importing `adapters` drops that notice (and only that one)."""
    import importlib.util
    import os
    import subprocess
    import sys

    load = "import diffusers; diffusers.StableDiffusionPipeline; import transformers; transformers.CLIPImageProcessor"
    env = {key: value for key, value in os.environ.items() if key != "TRANSFORMERS_VERBOSITY"}  # as a person runs it
    said = subprocess.run([sys.executable, "-c", f"import adapters; {load}"], capture_output=True, text=True, env=env)
    assert said.returncode == 0 and "torchvision" not in said.stderr, said.stderr
    if importlib.util.find_spec("torchvision") is None:  # the library does say it without the filter
        plain = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True, env=env)
        assert "requires torchvision (not installed)" in plain.stderr, plain.stderr


def test_a_multi_process_launch_gives_ctrl_c_back_when_its_workers_end(tmp_path, monkeypatch):
    """While the workers run, the launcher ignores SIGINT/SIGTERM (the workers get them and save); after, it has
    its handlers back: left ignored, every process it started later ignored Ctrl-C too (a page did not stop)."""
    import signal
    import subprocess

    from app.cli import _launch
    from trainer.config import TrainConfig

    during = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: during.append(signal.getsignal(signal.SIGINT)) or 0)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    assert _launch(TrainConfig(data="d", num_processes=2, run_dir=str(tmp_path / "run"))) == 0
    assert during == [signal.SIG_IGN]
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_failed_multi_process_run_ends_with_the_main_process_error(tmp_path, monkeypatch, capsys):
    """torchrun's report and the other worker's traceback come last on the terminal; the launcher's own last line
    is the error the main process logged, so the cause is where the user looks."""
    import subprocess

    from app.cli import _launch
    from trainer.config import TrainConfig
    from trainer.runs import EventLog

    run = tmp_path / "run"

    def workers(cmd):  # the main worker logs its error, then torchrun reports the failure
        EventLog(run).emit("start", steps=4)
        EventLog(run).emit("error", message="resume (--resume): checkpoint step_000004 is not complete")
        print("torch.distributed.elastic.multiprocessing.errors.ChildFailedError")
        return 1

    monkeypatch.setattr(subprocess, "call", workers)
    assert _launch(TrainConfig(data="d", num_processes=2, run_dir=str(run))) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "lora-studio: training failed: resume (--resume): checkpoint step_000004 is not complete"


def test_resume_arguments_are_checked_before_any_model_loads(tiny_model, image_folder, tmp_path, capsys):
    """A missing run folder and a mistyped `latest` are named at once; a checkpoint folder alone names its run."""
    from trainer.config import TrainConfig
    from trainer.loop import train
    from trainer.runs import read_events

    code, _, err = run_cli(["train", "--run-dir", tmp_path / "nosuch", "--resume", "latest"], capsys)
    assert code == 2 and "run folder" in err and "nosuch does not exist (--run-dir)" in err
    code, _, err = run_cli(["train", "--run-dir", tmp_path / "nosuch", "--resume", "last"], capsys)
    assert code == 2 and "did you mean --resume latest" in err
    run = tmp_path / "r"
    config = TrainConfig(base_model=str(tiny_model), data=str(image_folder), steps=4, batch_size=2, save_every=2)
    config.run_dir = str(run)
    train(config, device="cpu", log_to_terminal=False)
    checkpoint = run / "checkpoints" / "step_000002"
    code, _, err = run_cli(["train", "--resume", checkpoint, "--steps", "6", "--no-judge"], capsys)
    assert code == 0, err
    events = read_events(run)
    assert next(e for e in events if e["type"] == "resume")["step"] == 2 and events[-1]["type"] == "done"
    assert events[-1]["step"] == 6


def test_train_says_the_name_the_library_saved_the_adapter_under(tiny_model, image_folder, tmp_path, capsys):
    """A name the library already has gets -2: the command says so, not only the run's own file."""
    said = []
    for run in ("a", "b"):
        args = ["train", "--base-model", tiny_model, "--data", image_folder, "--steps", 2, "--batch-size", 2]
        args += ["--no-judge", "--run-dir", tmp_path / run, "--library", tmp_path / "lib", "--name", "mylib"]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        said.append(out)
    assert "saved in the library" in said[0] and said[0].rstrip().endswith("as mylib")
    assert said[1].rstrip().endswith("as mylib-2") and (tmp_path / "lib" / "mylib-2.safetensors").is_file()


def test_ctrl_c_before_train_takes_it_over_is_one_line_not_a_traceback(monkeypatch, capsys):
    """Ctrl-C in train's first seconds (imports, the data check, the plan: before the loop turns it into a clean
    stop) printed a Python traceback; it is one line, and the exit code a shell gives an interrupted command."""
    import app.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_train", interrupted)
    code, _, err = run_cli(["train", "--data", "sample_images"], capsys)
    assert (code, err.strip()) == (130, "training stopped before its first step: nothing was learned (Ctrl-C)")
