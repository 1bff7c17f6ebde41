"""Watching a run learn: preview prompts with their seeds and settings, previews at epoch ends, TensorBoard."""

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.errors import UserError
from trainer.config import TrainConfig
from trainer.loop import train
from trainer.runs import read_events


def test_preview_prompts_read_kohyas_options_and_the_single_string_form():
    config = TrainConfig(
        seed=10, preview_prompt=["a cat", "a dog --d 7 --n blurry --s 30 --l 6"], preview_negative_prompt="ugly"
    )
    first, second = config.previews()
    assert (first.prompt, first.seed, first.negative_prompt, first.sampling_steps, first.guidance) == (
        "a cat", 10, "ugly", 20, 0.0,
    )  # fmt: skip
    assert (second.prompt, second.seed, second.negative_prompt, second.sampling_steps, second.guidance) == (
        "a dog", 7, "blurry", 30, 6.0,
    )  # fmt: skip
    assert TrainConfig.from_dict({"preview_prompt": "one prompt"}).preview_prompt == ("one prompt",)  # old form
    assert TrainConfig(preview_prompt="").previews() == []
    for bad, message in (
        ("a cat --w 512", r"--w is not understood \(previews are drawn at the training resolution\)"),
        ("a cat --d seven", r"--d needs a whole number after it, got 'seven'"),
        ("--d 4", "the prompt itself is empty"),
    ):
        with pytest.raises(UserError, match=r"preview_prompt \(--preview-prompt\) '.*': " + message):
            TrainConfig(preview_prompt=[bad])


def test_each_preview_prompt_draws_with_its_seed_and_settings_and_epoch_ends_make_previews(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    """Four prompts: two with the default seeds (base seed + place), one naming the first one's seed (so it draws
    the same picture), one with its own steps, guidance and negative prompt. 4 images at batch 2: an epoch is 2
    steps, so --preview-every-epoch 1 makes previews at step 2 and at the end."""
    from diffusers import StableDiffusionPipeline

    from adapters.families import SD1

    calls = []
    original = StableDiffusionPipeline.__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    run = tmp_path / "run"
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(image_folder),
        steps=4,
        batch_size=2,
        seed=3,
        run_dir=str(run),
        preview_prompt=["a red circle", "a red circle", "a red circle --d 3", "a red circle --s 2 --l 3 --n blue"],
        preview_negative_prompt="blurry",
        preview_sampling_steps=3,
        preview_guidance=5.0,
        preview_every_epoch=1,
    )
    train(config, device="cpu", log_to_terminal=False)
    previews = [e for e in read_events(run) if e["type"] == "preview"]
    assert [(e["step"], e.get("epoch"), e["prompt"], e["seed"]) for e in previews] == [
        (step, step // 2, "a red circle", seed) for step in (2, 4) for seed in (3, 4, 3, 6)
    ]
    pictures = [np.asarray(Image.open(e["path"])) for e in previews[:4]]
    assert np.array_equal(pictures[0], pictures[2]) and not np.array_equal(pictures[0], pictures[1])
    assert [(c["num_inference_steps"], c["guidance_scale"]) for c in calls[:4]] == [(3, 5.0)] * 3 + [(2, 3.0)]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    for call, negative in zip(calls[:4], ("blurry", "blurry", "blurry", "blue")):
        expected = SD1.conditioning(pipe, [negative])["text_embeds"]
        assert torch.allclose(call["negative_prompt_embeds"].float(), expected, atol=1e-5)


def _tensorboard_values(folder):
    """{tag: [(step, value or image)]} from the TensorBoard event files under `folder` (TFRecord framing: length,
    its CRC, the Event protobuf, its CRC), read with the protobuf classes tensorboardX ships."""
    from tensorboardX.proto.event_pb2 import Event

    found = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                kept = value.image if value.HasField("image") else value.simple_value
                found.setdefault(value.tag, []).append((event.step, kept))
    return found


def test_tensorboard_logs_the_loss_lr_and_previews_into_the_run_folder(tiny_model, image_folder, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(image_folder),
        steps=3,
        batch_size=2,
        run_dir=str(run),
        log_with="tensorboard",
        preview_prompt=["a red circle"],
        preview_sampling_steps=2,
    )
    train(config, device="cpu", log_to_terminal=False)
    logged = _tensorboard_values(run / "tensorboard")
    progress = [e for e in read_events(run) if e["type"] == "progress"]
    assert [step for step, _ in logged["loss"]] == [1, 2, 3]
    assert [v for _, v in logged["loss"]] == pytest.approx([e["loss"] for e in progress], rel=1e-6)
    assert [v for _, v in logged["lr"]] == pytest.approx([e["lr"] for e in progress])
    ((step, image),) = logged["preview/0"]
    assert (step, image.height, image.width) == (3, 32, 32)


def test_tensorboard_without_a_writer_installed_says_what_to_install(tiny_model, image_folder, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    run = tmp_path / "run"
    config = TrainConfig(base_model=str(tiny_model), data=str(image_folder), run_dir=str(run), log_with="tensorboard")
    with pytest.raises(UserError, match=r"log_with \(--log-with\) tensorboard needs .*: pip install tensorboardX"):
        train(config, device="cpu", log_to_terminal=False)
    assert not run.exists()  # refused before the run folder or any model
