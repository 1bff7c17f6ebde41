"""Checkpoints and resume: a stopped run continues exactly where its last checkpoint was."""

import pytest
import torch
from safetensors.torch import load_file

from adapters.errors import UserError
from trainer.checkpoint import list_checkpoints
from trainer.config import TrainConfig
from trainer.loop import Cancelled, train
from trainer.runs import read_events


def config_for(tiny_model, data, run, **extra):
    values = dict(
        base_model=str(tiny_model),
        data=str(data),
        steps=8,
        batch_size=2,
        learning_rate=1e-3,
        run_dir=str(run),
        seed=4,
    )
    return TrainConfig(**{**values, **extra})


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_model, image_folder, tmp_path):
    whole = train(config_for(tiny_model, image_folder, tmp_path / "whole"), device="cpu", log_to_terminal=False)

    steps_seen = []

    def stop_at_six():  # the run dies after step 5; its newest checkpoint is step 4
        steps_seen.append(None)
        return len(steps_seen) > 5

    cut = config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, keep_checkpoints=2)
    with pytest.raises(Cancelled):
        train(cut, should_stop=stop_at_six, device="cpu", log_to_terminal=False)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_000002", "step_000004"]

    resumed = train(
        config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, resume="latest"),
        device="cpu",
        log_to_terminal=False,
    )
    a, b = load_file(whole.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = [e["type"] for e in read_events(tmp_path / "cut")]
    assert kinds.count("cancelled") == 1 and kinds.count("done") == 1
    assert next(e for e in read_events(tmp_path / "cut") if e["type"] == "resume")["step"] == 4


def test_resume_errors_say_what_to_do(tiny_model, image_folder, tmp_path):
    train(
        config_for(tiny_model, image_folder, tmp_path / "r", steps=4, save_every=2),
        device="cpu",
        log_to_terminal=False,
    )
    with pytest.raises(UserError, match="settings differ \\(rank: checkpoint 8, now 4\\)"):
        train(config_for(tiny_model, image_folder, tmp_path / "r", steps=6, rank=4, resume="latest"), device="cpu")
    with pytest.raises(UserError, match="is at step 2; raise --steps above it"):
        train(config_for(tiny_model, image_folder, tmp_path / "r", steps=2, resume="latest"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no checkpoints; train with --save-every N"):
        train(config_for(tiny_model, image_folder, tmp_path / "empty", resume="latest"), device="cpu")
    with pytest.raises(UserError, match="already holds a run"):
        train(config_for(tiny_model, image_folder, tmp_path / "r"), device="cpu")
    with pytest.raises(UserError, match="needs the run folder too"):
        TrainConfig(data="x", resume="latest")
