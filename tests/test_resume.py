"""Checkpoints and resume: a stopped run continues exactly where its last checkpoint was."""

import json
import math

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


# Settings with state or with draws of their own, on together: a schedule past its warm-up (resumed by counting),
# two batches per step, a noise offset and input perturbation (more draws per step from the batch generator),
# min-SNR weighting;
# Prodigy keeps its step-size estimate in the optimizer's param groups, clipping reads each step's gradients.
OPTIONS = {
    "defaults": {},
    "cosine, warm-up, accumulation, min-SNR, noise offset, input perturbation": dict(
        lr_scheduler="cosine",
        lr_warmup_steps=3,
        gradient_accumulation_steps=2,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        input_perturbation=0.1,
    ),
    "prodigy, restarts, huber, clipping": dict(
        optimizer="prodigy",
        learning_rate=1.0,
        lr_scheduler="cosine_with_restarts",
        lr_scheduler_num_cycles=2,
        lr_warmup_steps=1,
        loss="huber",
        max_grad_norm=1.0,
    ),
    # the data options: an epoch of every image twice (8 steps at batch 2: the same length as the others), each
    # drawn as it is or mirrored, with one of its cached tag shuffles
    "repeats, epochs, flip, tag shuffle": dict(repeats=2, epochs=2, flip=True, shuffle_tags=True, keep_tokens=1),
    # LoRA on the text encoder too, at its own rate: its weights and AdamW moments are a second parameter group,
    # its captions are token ids drawn with their tag shuffles and dropout, and the schedule moves both rates
    "text encoder, cosine, tag shuffle, caption dropout": dict(
        train_text_encoder=True,
        text_encoder_lr=3e-4,
        lr_scheduler="cosine",
        lr_warmup_steps=3,
        shuffle_tags=True,
        caption_dropout=0.3,
    ),
    # the adapter's shape: dropout draws its masks from torch's own generator (kept in the checkpoint), DoRA adds
    # a magnitude per layer to the parameters and the optimiser's state, LoCon layers of another rank
    "dropout, DoRA, LoCon, feed-forward, proj": dict(
        lora_dropout=0.2, use_dora=True, conv_rank=4, train_ff=True, train_proj=True
    ),
    # two aspect-ratio buckets (three wide pictures join the square ones): each batch draws its bucket first; the
    # wide ones are cut at a random place at each draw (their 48x24 cover into the 40x24 bucket)
    "buckets, random crop, cosine, accumulation, min-SNR, noise offset": dict(
        lr_scheduler="cosine",
        lr_warmup_steps=3,
        gradient_accumulation_steps=2,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        crop="random",
    ),
}


def _lr_by_step(run, key: str = "lr") -> dict[int, float]:
    """The learning rate each step took, as the run's progress events say (a resumed step's last word counts)."""
    return {e["step"]: e[key] for e in read_events(run) if e["type"] == "progress"}


@pytest.mark.parametrize("options", OPTIONS)
def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(tiny_model, image_folder, tmp_path, options):
    extra = OPTIONS[options]
    if options.startswith("buckets"):
        from PIL import Image

        for i in range(3):  # 3 in a bucket, batches of 2: a checkpoint falls inside its epoch order
            Image.open(image_folder / f"img{i}.png").convert("RGB").resize((64, 32)).save(image_folder / f"w{i}.png")
            (image_folder / f"w{i}.txt").write_text("a wide picture")
    whole = train(
        config_for(tiny_model, image_folder, tmp_path / "whole", **extra), device="cpu", log_to_terminal=False
    )

    steps_seen = []

    def stop_at_six():  # the run is cancelled after step 5, which saves a checkpoint of step 5
        steps_seen.append(None)
        return len(steps_seen) > 5

    cut = config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, keep_checkpoints=2, **extra)
    with pytest.raises(Cancelled):
        train(cut, should_stop=stop_at_six, device="cpu", log_to_terminal=False)
    assert [p.name for p in list_checkpoints(tmp_path / "cut")] == ["step_000004", "step_000005"]  # 2 kept

    resumed = train(
        config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, resume="latest", **extra),
        device="cpu",
        log_to_terminal=False,
    )
    a, b = load_file(whole.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kinds = [e["type"] for e in read_events(tmp_path / "cut")]
    assert kinds.count("cancelled") == 1 and kinds.count("done") == 1
    assert next(e for e in read_events(tmp_path / "cut") if e["type"] == "resume")["step"] == 5
    assert _lr_by_step(tmp_path / "cut") == _lr_by_step(tmp_path / "whole")  # steps 6-8 at the same rates
    if options.startswith("buckets"):
        start = next(e for e in read_events(tmp_path / "whole") if e["type"] == "start")
        assert len(start["buckets"]) == 2
        notices = [e["message"] for e in read_events(tmp_path / "whole") if e["type"] == "notice"]
        assert sum(n.startswith("--crop random: no latent cache") for n in notices) == 1
    if extra.get("lr_scheduler") == "cosine":
        assert len(set(_lr_by_step(tmp_path / "whole").values())) == 8  # the rate moved at every step
    if extra.get("train_text_encoder"):
        assert any(k.startswith("lora_te_") for k in a)
        unet, text = _lr_by_step(tmp_path / "whole"), _lr_by_step(tmp_path / "whole", "text_encoder_lr")
        assert _lr_by_step(tmp_path / "cut", "text_encoder_lr") == text
        # the schedule moves the text encoder's rate as it moves the UNet's: always 3e-4 / 1e-3 of it
        assert all(text[k] == pytest.approx(unet[k] * 0.3, rel=1e-6) for k in unet) and len(set(text.values())) == 8


def test_resume_errors_say_what_to_do(tiny_model, image_folder, tmp_path):
    train(
        config_for(tiny_model, image_folder, tmp_path / "r", steps=4, save_every=2),
        device="cpu",
        log_to_terminal=False,
    )
    saved = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(UserError, match="settings differ \\(rank: checkpoint 8, now 4\\)"):
        train(config_for(tiny_model, image_folder, tmp_path / "r", steps=6, rank=4, resume="latest"), device="cpu")
    assert (tmp_path / "r" / "config.json").read_text() == saved  # a refused resume leaves the run as it was
    for steps in (2, 4):  # the run is done: nothing to resume unless it is to go on
        with pytest.raises(UserError, match="already finished at step 4 .*resume with --steps above 4"):
            train(config_for(tiny_model, image_folder, tmp_path / "r", steps=steps, resume="latest"), device="cpu")
    assert (tmp_path / "r" / "config.json").read_text() == saved
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own file")
    with pytest.raises(UserError, match="already exists"):
        train(config_for(tiny_model, image_folder, tmp_path / "fresh", output=str(mine)), device="cpu")
    assert not (tmp_path / "fresh").exists() and mine.read_bytes() == b"the user's own file"  # no empty run left
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no checkpoints; train with --save-every N"):
        train(config_for(tiny_model, image_folder, tmp_path / "empty", resume="latest"), device="cpu")
    with pytest.raises(UserError, match="already holds a run"):
        train(config_for(tiny_model, image_folder, tmp_path / "r"), device="cpu")
    theirs = tmp_path / "theirs"  # a folder of the user's that holds files a run writes: not written over
    theirs.mkdir()
    (theirs / "loss.png").write_bytes(b"the user's own picture")
    (theirs / "config.json").write_text('{"my": "settings"}')
    with pytest.raises(UserError, match="already holds config.json, loss.png and is not a run's folder"):
        train(config_for(tiny_model, image_folder, theirs), device="cpu")
    assert (theirs / "loss.png").read_bytes() == b"the user's own picture"
    assert (theirs / "config.json").read_text() == '{"my": "settings"}'
    with pytest.raises(UserError, match="needs the run folder too"):
        TrainConfig(data="x", resume="latest")


def test_optimiser_state_nested_as_bitsandbytes_nests_it_survives_a_checkpoint(tmp_path):
    """bitsandbytes' 8-bit AdamW hands its moments over one level down (`{"state1": ..., "nested": {...}}`); a
    checkpoint keeps that state whole, and loading it gives the optimiser back what it saved."""
    from trainer.checkpoint import load_checkpoint, save_checkpoint
    from trainer.loop import BatchDrawer

    class Nesting(torch.optim.AdamW):  # AdamW whose state_dict nests its moments, as bitsandbytes' does
        def state_dict(self):
            state = super().state_dict()
            state["state"] = {i: dict(entry) for i, entry in state["state"].items()}  # the live state stays
            for entry in state["state"].values():
                entry["moments"] = {"exp_avg": entry.pop("exp_avg"), "exp_avg_sq": entry.pop("exp_avg_sq")}
            return state

        def load_state_dict(self, state):
            for entry in state["state"].values():
                entry.update(entry.pop("moments"))
            super().load_state_dict(state)

    weight = torch.nn.Parameter(torch.randn(3, 5))
    optimizer = Nesting([weight], lr=0.1)
    weight.pow(2).sum().backward()
    optimizer.step()
    drawer = BatchDrawer(4, 2, 1000, (4, 8, 8), seed=1)
    settings = TrainConfig().to_dict()
    folder = save_checkpoint(tmp_path, 1, [weight], optimizer, drawer, settings, keep=0)
    again = Nesting([torch.nn.Parameter(torch.zeros(3, 5))], lr=0.1)
    load_checkpoint(folder, [again.param_groups[0]["params"][0]], again, drawer, settings)
    saved, loaded = optimizer.state_dict()["state"][0], again.state_dict()["state"][0]
    assert torch.equal(saved["moments"]["exp_avg_sq"], loaded["moments"]["exp_avg_sq"])
    assert torch.equal(saved["moments"]["exp_avg"], loaded["moments"]["exp_avg"])


def test_a_longer_resumed_run_says_its_decaying_rate_moved(tiny_model, image_folder, tmp_path):
    """--steps raised on resume stretches a cosine schedule over the new length (as kohya_ss does): the rate at the
    resumed step jumps, and the run says so, with both rates; the constant schedule says nothing."""
    cosine = dict(steps=4, save_every=2, lr_scheduler="cosine")
    train(config_for(tiny_model, image_folder, tmp_path / "r", **cosine), device="cpu", log_to_terminal=False)
    longer = config_for(tiny_model, image_folder, tmp_path / "r", **cosine | dict(steps=8), resume="latest")
    train(longer, device="cpu", log_to_terminal=False)
    said = [e["message"] for e in read_events(tmp_path / "r") if e["type"] == "notice"]
    moved = [m for m in said if m.startswith("steps 4 -> 8: the cosine learning-rate schedule now spans 8 steps")]
    was = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4))  # cosine at step 2 of 4, then of 8
    now = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 8))
    assert moved == [f"{moved[0].split(', so')[0]}, so from step 2 the rate is {now:.3g} (it was {was:.3g} on the "
                     "schedule the run began with); resume with the old steps to keep it"]  # fmt: skip
    train(config_for(tiny_model, image_folder, tmp_path / "c", steps=4, save_every=2), device="cpu")
    train(config_for(tiny_model, image_folder, tmp_path / "c", steps=8, resume="latest"), device="cpu")
    assert not any("schedule now spans" in e.get("message", "") for e in read_events(tmp_path / "c"))


def test_a_cancelled_run_with_its_own_output_file_resumes_into_it(tiny_model, image_folder, tmp_path):
    """Ctrl-C saves the adapter so far at --output; the resume may replace that file (its own), not another."""
    output = tmp_path / "mine.safetensors"
    steps_seen = []

    def stop_at_four():
        steps_seen.append(None)
        return len(steps_seen) > 3

    config = config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, output=str(output))
    with pytest.raises(Cancelled):
        train(config, should_stop=stop_at_four, device="cpu", log_to_terminal=False)
    partial = output.read_bytes()
    resumed = train(
        config_for(tiny_model, image_folder, tmp_path / "cut", save_every=2, output=str(output), resume="latest"),
        device="cpu",
        log_to_terminal=False,
    )
    assert resumed.adapter == output and output.read_bytes() != partial
    output.write_bytes(partial)  # the user puts another adapter under the run's --output name since
    with pytest.raises(UserError, match="already exists and is no longer the adapter this run wrote there"):
        train(
            config_for(tiny_model, image_folder, tmp_path / "cut", steps=10, output=str(output), resume="latest"),
            device="cpu",
        )
    assert output.read_bytes() == partial
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"not this run's")
    with pytest.raises(UserError, match="already exists"):
        train(
            config_for(tiny_model, image_folder, tmp_path / "cut", steps=10, output=str(other), resume="latest"),
            device="cpu",
        )
    assert other.read_bytes() == b"not this run's"


def test_a_resume_given_overwrite_does_not_pass_it_on_to_later_resumes(tiny_model, image_folder, tmp_path, capsys):
    """--overwrite (like --resume itself) is for the one command given it: the run's config.json, which a plain
    `--resume latest` starts from, does not keep it, so a later resume refuses an existing --output again."""
    from app.cli import main

    run = tmp_path / "r"

    def train_cli(*args):
        code = main(["train", "--run-dir", str(run), "--save-every", "2", "--no-judge", *map(str, args)])
        return code, capsys.readouterr().err

    assert train_cli("--base-model", tiny_model, "--data", image_folder, "--steps", 4)[0] == 0
    theirs, mine = tmp_path / "theirs.safetensors", tmp_path / "mine.safetensors"
    theirs.write_bytes(b"replace me")
    code, err = train_cli("--resume", "latest", "--steps", 6, "--output", theirs, "--overwrite")
    assert code == 0 and theirs.read_bytes() != b"replace me", err
    saved = json.loads((run / "config.json").read_text())
    assert (saved["steps"], saved["output"], saved["overwrite"], saved["resume"]) == (6, str(theirs), False, "")
    mine.write_bytes(b"precious")
    code, err = train_cli("--resume", "latest", "--steps", 8, "--output", mine)
    assert code == 2 and "already exists" in err and "--overwrite" in err and mine.read_bytes() == b"precious"
    # a run folder written before these were left out of config.json holds them: a plain resume still leaves them
    (run / "config.json").write_text(json.dumps({**saved, "overwrite": True}))
    code, err = train_cli("--resume", "latest", "--steps", 8, "--output", mine)
    assert code == 2 and "already exists" in err and mine.read_bytes() == b"precious"


def test_a_run_stopped_before_its_first_step_starts_over_in_its_folder(tiny_model, image_folder, tmp_path, capsys):
    """Ctrl-C while the model loads leaves a run folder with nothing learned: `--resume latest` (what the cancel
    message prints) starts it over there, and so does the first command again with the same --run-dir; before,
    each refused and sent the user to the other."""
    from app.cli import main

    run = tmp_path / "r"
    with pytest.raises(Cancelled) as stop:
        train(config_for(tiny_model, image_folder, run, steps=3), should_stop=lambda: True, device="cpu")
    assert stop.value.step == 0 and not list_checkpoints(run)
    common = ["--run-dir", run, "--no-judge"]
    code = main(["train", *map(str, common), "--resume", "latest", "--steps", "3"])
    err = capsys.readouterr().err
    assert code == 0 and f"run {run} was stopped before its first step: it starts over" in err, err
    assert [e["type"] for e in read_events(run)].count("done") == 1  # one log: the stopped start's is gone
    assert "cancelled" not in [e["type"] for e in read_events(run)]

    again = tmp_path / "again"  # stopped while loading: its config.json written, no event yet
    again.mkdir()
    config_for(tiny_model, image_folder, again, steps=3).save(again / "config.json")
    assert main(["train", "--config", str(again / "config.json"), "--no-judge", "--run-dir", str(again)]) == 0
    assert (again / "adapter.safetensors").is_file()
    with pytest.raises(UserError, match="already holds a run"):  # a run that did train is not started over
        train(config_for(tiny_model, image_folder, again, steps=3), device="cpu")
