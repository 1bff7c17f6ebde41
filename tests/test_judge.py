"""The judge's scores and rule (trainer/judge.py), on pictures drawn for the test and on made-up grids.

The learning test, on real runs of the built-in model, is in tests/test_learning.py (test_judge_...).
"""

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapters.errors import UserError
from trainer.builtin.scenes import render, sample_scene
from trainer.config import TrainConfig
from trainer.judge import (
    LABEL,
    PROMPTS,
    RULE,
    Reference,
    leak_limit,
    leak_score,
    recommend,
    statistics,
    style_score,
    swap_subjects,
)

BUILTIN_VAE = Path(__file__).resolve().parent.parent / "adapters" / "builtin" / "vae"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(BUILTIN_VAE).eval()


def pictures(seeds, style: str) -> torch.Tensor:
    """Scenes of the built-in model's world, drawn at 64 px in -1..1."""
    return render([sample_scene(random.Random(s)) for s in seeds], 64, style).float() / 127.5 - 1


def test_style_and_leak_tell_a_copy_a_recoloured_copy_new_content_and_another_style_apart(vae):
    """The training set: 8 neon pictures. A copy of one is in the style and leaks; the same copy made brighter still
    leaks but is further from the style; new neon scenes are in the style without leaking; the same scenes drawn
    plain (flat shapes on light grounds) are far from the style."""
    training = pictures(range(8), "neon")
    reference = Reference(statistics(vae, training))
    in_parts = Reference([statistics(vae, training[:3]), statistics(vae, training[3:])])  # as a run builds it
    assert in_parts.images == 8 and torch.allclose(in_parts.layouts, reference.layouts, atol=1e-6)
    parts, whole = [*in_parts.grams, in_parts.colour], [*reference.grams, reference.colour]
    assert len(parts) == len(whole) and all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(parts, whole))
    one_by_one = statistics(vae, training, batch=1)  # as on a GPU, where the latent cache encodes one at a time
    together = statistics(vae, training)
    assert len(one_by_one.grams) == len(together.grams) and one_by_one.grams[0].shape[0] == 8
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(one_by_one.grams, together.grams))
    assert torch.allclose(one_by_one.layout, together.layout, atol=1e-4)
    copies = statistics(vae, training)
    brighter = statistics(vae, (training + 0.3).clamp(-1, 1))
    new = statistics(vae, pictures(range(100, 108), "neon"))
    plain = statistics(vae, pictures(range(100, 108), "plain"))

    distance = {name: float(reference.distances(s).mean()) for name, s in (("copy", copies), ("brighter", brighter))}
    distance |= {"new": float(reference.distances(new).mean()), "plain": float(reference.distances(plain).mean())}
    assert distance["new"] < 2 * distance["copy"], "new content in the style is about as close as the set itself"
    assert distance["brighter"] > 3 * distance["copy"], "a colour change is a style change"
    assert distance["plain"] > 2 * distance["brighter"] > 10 * distance["new"], "another style is further still"

    assert torch.allclose(reference.likeness(copies), torch.ones(8), atol=1e-4), "a copy is likeness 1"
    assert reference.likeness(brighter).min() > 0.9, "a recoloured copy is still a copy"
    assert reference.likeness(new).mean() < 0.7 and reference.likeness(new).max() < reference.likeness(brighter).min()
    assert reference.likeness(plain).mean() < 0.3


def test_scores_are_measured_from_the_base_model():
    base = torch.tensor([[2.0, 4.0], [2.0, 4.0]])
    assert style_score(base, base) == 0.0  # the base model's own pictures
    assert style_score(torch.zeros(2, 2), base) == 1.0  # the training set's average statistics exactly
    assert style_score(base / 2, base) == pytest.approx(0.5)
    assert style_score(base * 2, base) == pytest.approx(-1.0)  # further from the style than the base model
    likeness = torch.tensor([0.2, 0.4])
    assert leak_score(likeness, likeness) == pytest.approx(0.0) and leak_score(torch.ones(2), likeness) == 1.0
    # the limit: halfway from the training pictures' own likeness (on the leak scale) to a copy; 0.5 for one picture
    assert leak_limit(None, likeness) == 0.5 and leak_limit(0.3, likeness) == pytest.approx(0.5)
    assert leak_limit(1 - 0.7 * 0.5, likeness) == pytest.approx(0.75)


def cell(strength: float, style: float, leak: float) -> dict:
    return {"strength": strength, "style": style, "leak": leak}


def test_recommended_pair_is_the_best_style_that_does_not_leak():
    rows = [
        {"step": 100, "cells": [cell(0, 0, 0), cell(0.5, 0.2, 0.1), cell(1, 0.4, 0.2)]},
        {"step": 200, "cells": [cell(0, 0, 0), cell(0.5, 0.5, 0.3), cell(1, 0.9, 0.8)]},  # strength 1 copies
    ]
    best, why = recommend(rows, limit=0.6)
    assert (best["step"], best["strength"], why) == (200, 0.5, "")
    assert recommend(rows, limit=0.9)[0]["strength"] == 1  # with a looser limit the leaking cell is allowed
    tie = [{"step": 100, "cells": [cell(0.75, 0.5, 0.1), cell(0.5, 0.5, 0.1)]}]
    assert recommend(tie, 0.6)[0]["strength"] == 0.5  # ties: the lower strength
    worse = [{"step": 100, "cells": [cell(0, 0, 0), cell(1, -0.2, 0.1)]}]
    assert (
        recommend(worse, 0.6) == (None, recommend(worse, 0.6)[1])
        and "closer to the style" in recommend(worse, 0.6)[1]
    )
    leaking = [{"step": 100, "cells": [cell(1, 0.5, 0.9)]}]
    best, why = recommend(leaking, 0.6)
    assert best is None and "leaks more" in why


def test_held_out_prompts_swap_the_subject_and_keep_the_trigger_word():
    from transformers import CLIPTokenizer

    from trainer.builtin.scenes import COLORS, SHAPES
    from trainer.builtin.style_set import STYLE_COLORS, STYLE_SHAPES, TRIGGER

    tokenizer = CLIPTokenizer.from_pretrained(BUILTIN_VAE.parent / "tokenizer")
    captions = [p.read_text().strip() for p in sorted(SAMPLES.glob("*.txt"))]
    prompts = swap_subjects(captions, TRIGGER, lambda w: tokenizer.tokenize(w) == [f"{w}</w>"])
    assert len(prompts) == PROMPTS and len(set(prompts)) == PROMPTS
    for prompt in prompts:
        words = prompt.replace(",", " ").split()
        assert words[0] == TRIGGER
        assert not set(words) & set(STYLE_COLORS + STYLE_SHAPES), "no colour or shape of the training captions"
        assert set(words) & (set(COLORS) - set(STYLE_COLORS)) and set(words) & (set(SHAPES) - set(STYLE_SHAPES))
        assert all(tokenizer.tokenize(w) == [f"{w}</w>"] for w in words[1:]), "every word one the model knows"
    # a caption with nothing to swap gets a plain new subject in the style; plurals stay plural
    assert swap_subjects(["zz, moody light"], "zz", lambda w: True, count=1) == ["zz, a circle"]
    assert swap_subjects(["zz, two red cats"], "zz", lambda w: True, count=1) == ["zz, two orange circles"]


@pytest.mark.parametrize("bad", ["", "0,x", "0,nan", "0,9", "0,0"])
def test_bad_judge_strengths_are_refused_naming_the_field(bad):
    with pytest.raises(UserError, match=r"judge_strengths \(--judge-strengths\)"):
        TrainConfig(judge_strengths=bad)


@pytest.mark.parametrize("bad", [dict(save_every=100, judge_every=150), dict(save_every=100, judge_every=-100)])
def test_judge_every_must_name_saved_checkpoints(bad):
    with pytest.raises(UserError, match=r"judge_every \(--judge-every\) must be 0 .* a multiple of save_every"):
        TrainConfig(**bad)
    with pytest.raises(
        UserError, match=r"none is saved: add --save-every N \(N dividing 100, e.g. --save-every 100\)"
    ):
        TrainConfig(judge_every=100)


def test_a_judge_clip_that_is_not_there_is_refused_before_any_work(tmp_path):
    """A --judge-clip folder that does not exist (or is no model) or a hub id not in the local cache is refused by
    the settings check, as --plan and the page's Train run it, not after the base model has loaded."""
    with pytest.raises(UserError, match=r"judge_clip \(--judge-clip\) '.*nowhere': no such folder$"):
        TrainConfig(judge_clip=str(tmp_path / "nowhere"))
    in_cache = r"no such model in the local Hugging Face cache .*\(hf download someone/clip\)"
    with pytest.raises(UserError, match=in_cache):
        TrainConfig(judge_clip="someone/clip")
    with pytest.raises(UserError, match=r"the folder has no config.json"):
        TrainConfig(judge_clip=str(tmp_path))
    TrainConfig(judge_clip=str(tmp_path / "nowhere"), judge=False)  # not judged: not looked at


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A CLIP model folder with random weights (two small towers, the built-in model's tokenizer), built offline."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_VAE.parent / "tokenizer")
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = CLIPModel(
        CLIPConfig(
            text_config=dict(tower, vocab_size=len(tokenizer), max_position_embeddings=77),
            vision_config=dict(tower, image_size=32, patch_size=8),
            projection_dim=16,
        )
    )
    square = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(**square), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_a_named_clip_model_that_cannot_be_loaded_is_refused_by_field(tmp_path):
    from trainer.judge import _Clip

    with pytest.raises(UserError, match=r"judge_clip \(--judge-clip\): cannot load a CLIP model from .*nowhere"):
        _Clip("cpu", str(tmp_path / "nowhere"))
    assert "no CLIP model in the local Hugging Face cache" in _Clip("cpu").why  # the tests' cache holds none


@pytest.mark.judge
def test_judge_off_writes_nothing_and_a_resumed_run_judges_its_steps_again(
    tiny_model, image_folder, tiny_clip, tmp_path, capsys
):
    """With --no-judge: no judge.json, no strength in the file. With it (the default), judging every checkpoint:
    the same adapter as without (judging changes nothing of what is learned); on a run stopped and resumed, every
    checkpoint judged once, the steps after the one it resumed from judged again, not twice; the file and the
    library say the strength the judge recommends for it; with a CLIP model, every cell has a prompt-following
    score."""
    from adapters.formats import RECOMMENDED_STRENGTH, read_safetensors
    from adapters.library import Library
    from app.cli import build_parser
    from trainer.checkpoint import checkpoint_adapter
    from trainer.config import from_args
    from trainer.judge import JUDGE_JSON, read_judge
    from trainer.loop import train

    assert TrainConfig().judge, "judged by default"
    common = dict(base_model=str(tiny_model), data=str(image_folder), batch_size=1, save_every=2, steps=4)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in common.items()]
    off = from_args(build_parser().parse_args(["train", *flags, "--no-judge", f"--run-dir={tmp_path}/off"]))
    off = train(off, device="cpu")
    assert not (off.run_dir / JUDGE_JSON).exists()
    assert RECOMMENDED_STRENGTH not in read_safetensors(off.adapter)[1]

    run, library = tmp_path / "on", tmp_path / "library"
    common |= dict(judge_strengths="0,1", judge_clip=str(tiny_clip), run_dir=str(run))  # every checkpoint: default
    on = train(TrainConfig(**common), device="cpu")
    tensors, off_tensors = read_safetensors(on.adapter)[0], read_safetensors(off.adapter)[0]
    assert tensors.keys() == off_tensors.keys() and all(torch.equal(tensors[k], off_tensors[k]) for k in tensors)
    first = read_judge(run)
    assert [row["step"] for row in first["checkpoints"]] == [2, 4]
    said = capsys.readouterr().err  # the terminal hears of each judging and of the verdict
    assert f"lora-studio: judging step 2: {len(first['prompts'])} prompts at strengths 0, 1" in said
    assert "lora-studio: judged step 4 in " in said
    best, why = recommend(first["checkpoints"], first["leak_limit"])
    verdict = f"recommended step {best['step']} at strength {best['strength']:g}" if best else why
    assert f"lora-studio: judge: {'' if best else 'no checkpoint and strength recommended: '}{verdict}" in said
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000002"]  # resumed from, steps 3-4 again
    # the checkpoint's adapter file says the strength the judge recommends for its step, as judge.json does
    best, _ = recommend(first["checkpoints"][:1], first["leak_limit"])
    kept = read_safetensors(checkpoint_adapter(run / "checkpoints" / "step_000002"))[1].get(RECOMMENDED_STRENGTH, "")
    assert kept == ("" if best is None else f"{best['strength']:g}")
    done = train(
        TrainConfig(**common | dict(steps=6), resume="latest", library=str(library), name="judged"), device="cpu"
    )
    again = read_judge(run)
    assert [row["step"] for row in again["checkpoints"]] == [2, 4, 6]
    assert again["checkpoints"][0] == first["checkpoints"][0]  # step 2 kept as it was judged
    sheet = Image.open(run / "judge" / "step_000006.png").convert("L")  # strengths 0 and 1, a row a prompt, labelled
    tile = (sheet.width - LABEL) // 2
    assert sheet.size == (LABEL + 2 * tile, LABEL + len(again["prompts"]) * tile)
    assert min(sheet.crop((LABEL, 0, sheet.width, LABEL)).getdata()) < 128, "each column's strength written"
    assert min(sheet.crop((0, LABEL, LABEL, sheet.height)).getdata()) < 128, "each prompt's number written"
    assert all(row["cells"][1]["leak"] != 0 for row in again["checkpoints"]), "strength 1 draws with the LoRA"

    latest = again["latest"]
    assert latest["step"] == 6
    written = read_safetensors(done.adapter)[1].get(RECOMMENDED_STRENGTH, "")
    shown = Library(library).get("judged").summary["recommended_strength"]
    assert written == shown == ("" if latest["strength"] is None else f"{latest['strength']:g}")
    assert again["prompt_following"] == str(tiny_clip) and again["prompt_following_skipped"] is None
    following = [cell["prompt_following"] for row in again["checkpoints"] for cell in row["cells"]]
    assert len(following) == 6 and all(0 <= value <= 100 for value in following)


def test_train_tab_grid_marks_the_recommended_pair_and_the_leaking_cells(tmp_path):
    """The page's grid: one row per judged checkpoint, one column per strength, the recommended cell starred, a cell
    above the leak limit flagged, and why nothing is recommended when nothing is."""
    import json

    from app.ui.judge import judge_html

    rows = [
        {"step": 100, "cells": [cell(0, 0, 0), cell(0.5, 0.2, 0.1), cell(1, 0.4, 0.2)]},
        {"step": 200, "cells": [cell(0, 0, 0), cell(0.5, 0.5, 0.3), cell(1, 0.9, 0.8)]},
    ]
    best, _ = recommend(rows, 0.6)
    record = {"checkpoints": rows, "recommended": best, "leak_limit": 0.6, "prompts": ["zz, a cat"], "rule": RULE}
    (tmp_path / "judge.json").write_text(json.dumps(record))
    page = judge_html(tmp_path)
    assert "★ = recommended: among the cells" in page and "1. “zz, a cat”" in page
    table = page.split("<table>", 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 3 and "step 200" in table
    starred = table.split("★", 1)[1].split("</td>", 1)[0]
    assert "style 0.50" in starred and "leak 0.30" in starred and table.count("★") == 1
    assert table.count("⚠") == 1 and "leak 0.80 ⚠" in table
    assert "Recommended: step 200 at strength 0.5" in page
    # a recommended step before the newest judged: where its adapter file is, while its checkpoint is kept
    record["latest"] = {"step": 300, "strength": None}
    (tmp_path / "judge.json").write_text(json.dumps(record))
    assert "no longer kept" in judge_html(tmp_path) and "For step 300, the newest judged" in judge_html(tmp_path)
    kept = tmp_path / "checkpoints" / "step_000200"
    kept.mkdir(parents=True)
    (kept / "run-step200.safetensors").write_bytes(b"")
    assert "Step 200's adapter file is in its checkpoint" in judge_html(tmp_path)
    record |= {"recommended": None, "not_recommended_because": "every cell leaks"}
    (tmp_path / "judge.json").write_text(json.dumps(record))
    page = judge_html(tmp_path)
    assert "★" not in page.split("<table>", 1)[1].split("</table>", 1)[0]
    assert "No recommendation</b>: every cell leaks" in page
    assert judge_html(tmp_path / "elsewhere") == ""  # a run without a judge.json shows nothing


@pytest.mark.judge
def test_an_sdxl_run_training_its_text_encoders_is_judged_with_its_lora(
    tiny_sdxl_model, image_folder, tmp_path, monkeypatch
):
    """SDXL (two text encoders, pooled text, time ids) with --train-text-encoder, drawn one prompt at a time as on a
    GPU: the judge draws with the LoRA of the UNet and of both encoders at strength 1, and without any at 0, so the
    two differ."""
    from trainer.judge import Judge, read_judge
    from trainer.loop import train

    monkeypatch.setattr(Judge, "_batch", lambda self, device: 1)

    config = TrainConfig(
        base_model=str(tiny_sdxl_model),
        data=str(image_folder),
        steps=2,
        batch_size=2,
        learning_rate=1e-2,
        train_text_encoder=True,
        judge_strengths="0,1",
        run_dir=str(tmp_path / "xl"),
    )
    train(config, device="cpu", log_to_terminal=False)
    judged = read_judge(config.run_dir)
    (row,) = judged["checkpoints"]
    assert len(judged["prompts"]) == len(row["cells"][1]["likeness"]) == 3
    base, adapted = row["cells"]
    assert (row["step"], base["strength"], adapted["strength"]) == (2, 0, 1)
    assert base["style"] == base["leak"] == 0 and adapted["style_distance"] != base["style_distance"]


@pytest.mark.judge
def test_a_judge_out_of_gpu_memory_is_said_and_the_run_goes_on(tiny_model, image_folder, tmp_path, monkeypatch):
    from adapters.formats import RECOMMENDED_STRENGTH, read_safetensors
    from trainer.judge import Judge
    from trainer.loop import train
    from trainer.runs import read_events

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Judge, "_draw", out_of_memory)
    config = TrainConfig(base_model=str(tiny_model), data=str(image_folder), steps=2, run_dir=str(tmp_path / "r"))
    result = train(config, device="cpu", log_to_terminal=False)
    assert RECOMMENDED_STRENGTH not in read_safetensors(result.adapter)[1]
    said = [e["message"] for e in read_events(result.run_dir) if e["type"] == "notice"]
    assert any("the judge ran out of GPU memory at step 2" in message for message in said)
    assert [e["type"] for e in read_events(result.run_dir)][-1] == "done"


@pytest.mark.judge
def test_the_recommended_checkpoint_outlives_keep_checkpoints(tiny_model, image_folder, tmp_path, monkeypatch):
    """--keep-checkpoints 1 keeps the newest checkpoint and the one the judge recommends, whatever its age."""
    import trainer.loop as loop

    steps = []

    def judge_prefers_step_2(rows, limit):
        steps.append([row["step"] for row in rows])
        return {"step": 2, "strength": 1.0, "style": 0.5, "leak": 0.1}, ""

    monkeypatch.setattr(loop, "recommend", judge_prefers_step_2)
    run = tmp_path / "run"
    config = dict(base_model=str(tiny_model), data=str(image_folder), batch_size=1, steps=8, save_every=2)
    loop.train(TrainConfig(**config, keep_checkpoints=1, judge_strengths="1", run_dir=str(run)), device="cpu")
    assert steps and steps[-1] == [2, 4, 6]  # every saved checkpoint judged, by default
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000006"]
