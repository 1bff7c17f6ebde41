"""Data-parallel training through `accelerate launch` on two CPU processes (gloo), as a user starts it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.conftest import write_scene_folder
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.runs import read_events

EXE = str(Path(sys.executable).with_name("lora-studio"))


def cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [EXE, "train", *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    )


def why(out: str) -> str:
    """A failed run's cause: the CLI's own last line and the main process's traceback, which torchrun's report
    and the other worker's traceback would push out of a plain tail."""
    lines = out.splitlines()
    said = [line for line in lines if line.startswith("lora-studio: training failed")]
    rank0 = [line for line in lines if line.startswith("[rank0]")]
    return "\n".join([*said, *rank0[-40:], "--- tail:", out[-1500:]])


def common(tiny_model, data):
    return ["--base-model", tiny_model, "--data", data, "--steps", 40, "--learning-rate", 1e-3, "--seed", 2]


def test_two_processes_match_one_with_twice_the_batch_and_a_killed_run_resumes(tiny_model, tmp_path):
    data = write_scene_folder(tmp_path / "data", count=8)

    # 1. Two processes at batch 2, uninterrupted.
    whole = cli([*common(tiny_model, data), "--batch-size", 2, "--num-processes", 2, "--run-dir", tmp_path / "p2"])
    out = whole.communicate(timeout=300)[0].decode(errors="replace")
    assert whole.returncode == 0, why(out)
    assert sorted(p.name for p in (tmp_path / "p2").glob("*.safetensors")) == ["adapter.safetensors"]
    events = read_events(tmp_path / "p2")
    assert [e["type"] for e in events].count("start") == 1  # one event stream, written by the main process
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, 41))
    assert next(e for e in events if e["type"] == "start")["processes"] == 2

    # 2. One process at batch 4 sees the same data in the same order: same adapter, to float rounding.
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(data),
        steps=40,
        learning_rate=1e-3,
        seed=2,
        batch_size=4,
        run_dir=str(tmp_path / "p1"),
    )
    single = load_file(train(config, device="cpu", log_to_terminal=False).adapter)
    double = load_file(tmp_path / "p2" / "adapter.safetensors")
    # Measured on this CPU: max |difference| 4.8e-6 after these 40 steps, LoRA weights up to 0.55. Allow 1e-4.
    assert max((single[k] - double[k]).abs().max().item() for k in single) < 1e-4

    # 3. The same two-process run, killed (SIGKILL, whole process group) after a checkpoint, then resumed.
    cut = cli(
        [
            *common(tiny_model, data),
            "--batch-size",
            2,
            "--num-processes",
            2,
            "--run-dir",
            tmp_path / "cut",
            "--save-every",
            8,
        ],
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_000008").is_dir():
        assert cut.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(cut.pid, signal.SIGKILL)
    cut.wait()
    # torchrun starts each worker in a session of its own: the kill leaves them running. They see their launcher
    # gone and stop together, saving the step they reached (before, they trained on beside the resumed run).
    deadline = time.time() + 120
    while not {"cancelled", "done"} & {e["type"] for e in read_events(tmp_path / "cut")}:
        assert time.time() < deadline, "the workers of the killed launcher neither stopped nor ended"
        time.sleep(0.1)
    events = read_events(tmp_path / "cut")
    assert events[-1]["type"] == "cancelled", "the workers of the killed launcher trained on to the end"
    assert any("launcher" in e.get("message", "") for e in events if e["type"] == "notice")
    killed_at = max(e["step"] for e in events if e["type"] == "progress")
    assert 8 <= killed_at < 40
    resumed = cli(["--run-dir", tmp_path / "cut", "--resume", "latest"])  # settings come from the run folder
    out = resumed.communicate(timeout=300)[0].decode(errors="replace")
    assert resumed.returncode == 0, why(out)
    events = read_events(tmp_path / "cut")
    resume = next(e for e in events if e["type"] == "resume")
    assert resume["step"] == killed_at  # nothing learned was lost
    assert events[-1]["type"] == "done" and events[-1]["step"] == 40
    after = load_file(tmp_path / "cut" / "adapter.safetensors")
    assert all(torch.equal(after[k], double[k]) for k in double)  # exactly the uninterrupted two-process run


def test_text_encoder_lora_on_two_processes_matches_one_with_twice_the_batch(tiny_model, tmp_path):
    """The text encoders lie outside the UNet that accelerate wraps: their LoRA's gradients must still be averaged
    over the processes, or each process's encoder learns from its own half of the batch only."""
    data = write_scene_folder(tmp_path / "data", count=4)
    args = ["--base-model", tiny_model, "--data", data, "--steps", 4, "--learning-rate", 1e-3, "--seed", 2]
    args += ["--train-text-encoder", "--text-encoder-lr", 3e-3, "--batch-size", 1, "--num-processes", 2]
    both = cli([*args, "--run-dir", tmp_path / "p2"])
    out = both.communicate(timeout=300)[0].decode(errors="replace")
    assert both.returncode == 0, why(out)
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(data),
        steps=4,
        learning_rate=1e-3,
        seed=2,
        batch_size=2,
        train_text_encoder=True,
        text_encoder_lr=3e-3,
        run_dir=str(tmp_path / "p1"),
    )
    single = load_file(train(config, device="cpu", log_to_terminal=False).adapter)
    double = load_file(tmp_path / "p2" / "adapter.safetensors")
    text = [k for k in single if k.startswith("lora_te_") and "lora_up" in k]
    assert text and min(single[k].abs().max().item() for k in text) > 1e-3  # the encoder's LoRA moved
    assert max((single[k] - double[k]).abs().max().item() for k in single) < 1e-4
