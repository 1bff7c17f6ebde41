"""The data options a kohya_ss user brings: repeats, `<N>_name` sub-folders, epochs, flip, tag shuffle, buckets."""

import argparse
import dataclasses
from collections import Counter

import pytest
import torch
from conftest import write_scene_folder

from adapters.errors import UserError
from trainer.config import TrainConfig, add_arguments, from_args
from trainer.dataset import bucket_sizes, check_folder, crop_geometry, load_examples, shuffled_captions
from trainer.loop import BatchDrawer, encode_examples, make_batch, train
from trainer.runs import read_events


def _kohya_folder(root):
    """Two images at the top, two more in `3_extra/` (3 repeats each), and a sub-folder the convention skips."""
    write_scene_folder(root, count=2)
    write_scene_folder(root / "3_extra", count=2, seed=7)
    write_scene_folder(root / "unsorted", count=1, seed=9)
    return root


def test_sub_folder_repeats_and_repeats_flag_set_how_often_each_image_comes_up_per_epoch(tmp_path):
    notes = []
    examples = load_examples(_kohya_folder(tmp_path / "data"), 16, repeats=2, notes=notes)
    repeats = {e.path.relative_to(tmp_path / "data").as_posix(): e.repeats for e in examples}
    assert repeats == {"img0.png": 2, "img1.png": 2, "3_extra/img0.png": 3, "3_extra/img1.png": 3}
    assert any(n.startswith("unsorted/: not read; name the sub-folder <repeats>_<name>") for n in notes)
    # one epoch is every image its repeats times, in a fresh order each epoch
    drawer = BatchDrawer(4, 10, 1000, (4, 2, 2), seed=0, repeats=[e.repeats for e in examples])
    first, second = drawer.draw()["index"].tolist(), drawer.draw()["index"].tolist()
    assert Counter(first) == Counter(second) == {0: 2, 1: 2, 2: 3, 3: 3}
    assert first != second


def test_a_zero_repeat_folder_is_refused_with_the_fix(tmp_path):
    write_scene_folder(tmp_path / "data" / "0_style", count=1)
    with pytest.raises(UserError, match=r"0_style/: 0 repeats never shows its images; rename it 1_style"):
        check_folder(tmp_path / "data")


def test_epochs_derive_the_step_count_and_the_start_event_says_so(tiny_model, tmp_path):
    data = _kohya_folder(tmp_path / "data")  # 2 x 1 + 2 x 3 = 8 images per epoch
    run = tmp_path / "run"
    config = TrainConfig(
        base_model=str(tiny_model), data=str(data), epochs=2, steps=3, batch_size=3, save_every=3, run_dir=str(run)
    )
    train(config, device="cpu", log_to_terminal=False)
    events = read_events(run)
    start = next(e for e in events if e["type"] == "start")
    assert (start["images"], start["repeats"], start["batch_size"]) == (4, 8, 3)
    assert (start["steps_per_epoch"], start["steps"], start["epochs"], start["steps_from"]) == (3, 6, 2, "epochs")
    assert [e["step"] for e in events if e["type"] == "progress"] == [1, 2, 3, 4, 5, 6]
    notices = [e["message"] for e in events if e["type"] == "notice"]
    assert "8 per epoch with their repeats" in " ".join(notices)

    # warm-up is checked against the steps the epochs give, not against --steps' default (400)
    TrainConfig(data="x", epochs=20, lr_scheduler="cosine", lr_warmup_steps=500)
    warm = dataclasses.replace(config, lr_scheduler="cosine", lr_warmup_steps=6, run_dir=str(tmp_path / "warm"))
    with pytest.raises(UserError, match=r"--lr-warmup-steps\) 6 is not below the run's 6 steps \(2 epochs of 3\)"):
        train(warm, device="cpu", log_to_terminal=False)
    # resuming a run counted in epochs: --epochs makes it longer, and --steps given counts it in steps instead
    finished = r"already finished at step 6 .*raise --epochs above 1 \(an epoch is 3 steps\), or give --steps above 6"
    with pytest.raises(UserError, match=finished):
        train(dataclasses.replace(config, epochs=1, resume="latest"), device="cpu", log_to_terminal=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    longer = from_args(parser.parse_args(["--run-dir", str(run), "--resume", "latest", "--steps", "9"]))
    assert (longer.epochs, longer.steps, longer.data) == (0, 9, str(data))


def test_steps_and_epochs_together_on_the_command_line_are_refused():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UserError, match="give --steps or --epochs, not both"):
        from_args(parser.parse_args(["--data", "x", "--steps", "10", "--epochs", "2"]))
    assert from_args(parser.parse_args(["--data", "x", "--epochs", "2"])).epochs == 2
    with pytest.raises(UserError, match=r"repeats \(--repeats\) must be at least 1"):
        TrainConfig(data="x", repeats=0)


def test_flip_trains_on_the_mirrored_pictures_too(tiny_model, image_folder):
    from diffusers import StableDiffusionPipeline

    from adapters.families import SD1

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    examples = load_examples(image_folder, 32)
    cache = encode_examples(pipe, SD1, examples, 32, "cpu", torch.float32, flip=True)
    cache["latent_std"].zero_()  # the batch's latents are then exactly the cached means
    draw = BatchDrawer(4, 64, 1000, cache["latent_mean"].shape[1:], seed=0, flip=True).draw()
    latents = make_batch(draw, cache, SD1, "cpu")["latents"]
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        own = [pipe.vae.encode(e.pixels[None]).latent_dist.mean[0] * scale for e in examples]
        mirrored = [pipe.vae.encode(e.pixels.flip(-1)[None]).latent_dist.mean[0] * scale for e in examples]
    for row, index, flipped in zip(latents, draw["index"].tolist(), draw["flip"].tolist()):
        want = mirrored[index] if flipped else own[index]
        assert torch.allclose(row, want, atol=1e-5)
        assert not torch.allclose(row, (own if flipped else mirrored)[index], atol=1e-3)
    assert 16 < int(draw["flip"].sum()) < 48  # about half of the draws are mirrored


def test_tag_shuffle_keeps_the_first_tags_and_the_trigger_word_in_place():
    caption = "zz, portrait, red coat, snow, night, city, neon sign, rain"
    orders = shuffled_captions(caption, 8, keep=2, seed=0)
    assert orders == shuffled_captions(caption, 8, keep=2, seed=0)  # the run's seed gives the same orders
    assert len(set(orders)) > 4
    for order in orders:
        tags = order.split(", ")
        assert tags[:2] == ["zz", "portrait"] and sorted(tags) == sorted(caption.split(", "))
    assert all(o.startswith("zz, ") for o in shuffled_captions(caption, 8, keep=0, seed=1, trigger_word="zz"))
    assert not all(o.startswith("zz, ") for o in shuffled_captions(caption, 8, keep=0, seed=1))
    later = "portrait, red coat, snow, zz style, night, city"  # the trigger word's tag elsewhere: it goes first
    orders = shuffled_captions(later, 8, keep=1, seed=1, trigger_word="zz")
    assert all(o.startswith("zz style, portrait, ") for o in orders) and len(set(orders)) > 4
    assert all(sorted(o.split(", ")) == sorted(later.split(", ")) for o in orders)


def test_tag_shuffle_shows_each_image_with_its_cached_orders(tiny_model, image_folder):
    from diffusers import StableDiffusionPipeline

    from adapters.families import SD1

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    for i in range(4):  # captions of tags, as kohya_ss users write them
        (image_folder / f"img{i}.txt").write_text(f"zz, tag{i}, red coat, snow, night, city, rain")
    examples = load_examples(image_folder, 32)
    orders = [shuffled_captions(e.caption, 3, keep=1, seed=i) for i, e in enumerate(examples)]
    assert all(len(set(o)) == 3 for o in orders)
    captions = [list(variant) for variant in zip(*orders)]
    cache = encode_examples(pipe, SD1, examples, 32, "cpu", torch.float32, captions=captions)
    draw = BatchDrawer(4, 64, 1000, cache["latent_mean"].shape[1:], seed=0, captions=3).draw()
    embeds = make_batch(draw, cache, SD1, "cpu")["cond"]["text_embeds"]
    seen = {i: set() for i in range(4)}
    for row, index in zip(embeds, draw["index"].tolist()):
        match = [
            k for k in range(3) if torch.equal(row, SD1.conditioning(pipe, [orders[index][k]])["text_embeds"][0])
        ]
        assert match, "a row's caption conditioning is none of its image's shuffles"
        seen[index].update(match)
    assert all(len(kinds) == 3 for kinds in seen.values())  # every image came up with every cached order


def test_a_run_with_tag_shuffle_encodes_the_shuffled_orders(tiny_model, image_folder, tmp_path, monkeypatch):
    from trainer import loop

    seen = {}

    def spy(*args, **kwargs):
        seen["captions"] = args[8] if len(args) > 8 else kwargs.get("captions")
        return encode_examples(*args, **kwargs)

    monkeypatch.setattr(loop, "encode_examples", spy)
    (image_folder / "img0.txt").write_text("a, b, c, d, e, f")
    config = TrainConfig(
        base_model=str(tiny_model),
        data=str(image_folder),
        steps=2,
        shuffle_tags=True,
        keep_tokens=1,
        tag_shuffles=5,
        run_dir=str(tmp_path / "run"),
    )
    train(config, device="cpu", log_to_terminal=False)
    first = [variant[0] for variant in seen["captions"]]  # img0's five cached orders
    assert len(first) == 5 and len(set(first)) > 1 and all(c.startswith("a, ") for c in first)


def add_landscape_images(folder, count: int = 2):
    """`count` 64x32 pictures (2:1) with captions, beside the square ones."""
    from PIL import Image

    for i in range(count):
        Image.open(folder / f"img{i}.png").convert("RGB").resize((64, 32)).save(folder / f"wide{i}.png")
        (folder / f"wide{i}.txt").write_text(f"a wide picture {i}")
    return folder


def test_buckets_keep_each_images_aspect_ratio_and_the_true_crop(image_folder):
    add_landscape_images(image_folder, 1)
    sizes = bucket_sizes(32, 16)
    assert (32, 32) in sizes and all(w % 16 == 0 and h % 16 == 0 and w * h <= 32 * 32 for w, h in sizes)
    shapes = {e.path.name: tuple(e.pixels.shape) for e in load_examples(image_folder, 32, buckets=sizes)}
    assert shapes["img0.png"] == (3, 32, 32) and shapes["wide0.png"] == (3, 16, 48)  # 2:1 -> the 3:1 bucket
    assert tuple(load_examples(image_folder, 32)[-1].pixels.shape) == (3, 32, 32)  # without buckets: the square
    # resized to cover 48x16 (48x24), then 4 rows cut at the top and bottom: SDXL's time ids say so
    assert crop_geometry(image_folder / "wide0.png", 32, (48, 16)) == ((32, 64), (4, 0))
    assert crop_geometry(image_folder / "wide0.png", 32) == ((32, 64), (0, 16))


@pytest.mark.parametrize("model", ["sd1", "sdxl"])
def test_a_real_models_buckets_are_multiples_of_64_near_its_square(model):
    """SD 1.x at 512 and SDXL at 1024, from their configs (no weights): bucket sides step by 64, each bucket's area
    is within a fifth below the square's (never above), sides at most 4:1 apart."""
    from adapters.base import model_geometry
    from trainer.dataset import bucket_stride
    from trainer.plan import CONFIGS

    native, vae_scale, levels = model_geometry(str(CONFIGS / model))
    assert native == {"sd1": 512, "sdxl": 1024}[model] and bucket_stride(native, vae_scale, levels) == 64
    sizes = bucket_sizes(native, bucket_stride(native, vae_scale, levels))
    assert (native, native) in sizes and (native + 64, native - 64) in sizes and len(sizes) > 10
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0 and max(w, h) <= 4 * min(w, h)
        assert 0.8 * native**2 <= w * h <= native**2, (w, h)


def test_every_batch_comes_from_one_bucket_and_each_bucket_comes_up():
    # images 0-2 in bucket 0 (latents 4x4), 3-4 in bucket 1 (latents 2x6); image 4 has 3 repeats
    drawer = BatchDrawer(
        5,
        2,
        1000,
        None,
        seed=0,
        repeats=[1, 1, 1, 1, 3],
        buckets=[0, 0, 0, 1, 1],
        bucket_shapes=[(4, 4, 4), (4, 2, 6)],
    )
    seen = Counter()
    for _ in range(40):
        draw = drawer.draw()
        bucket = {0 if i < 3 else 1 for i in draw["index"].tolist()}
        assert len(bucket) == 1
        (bucket,) = bucket
        assert draw["noise"].shape[1:] == ((4, 4, 4), (4, 2, 6))[bucket]
        seen[bucket] += 1
    assert seen[0] > 5 and seen[1] > seen[0]  # bucket 1 holds 4 of the 7 images per epoch


def test_a_run_trains_each_bucket_at_its_size_and_says_how_many_images_each_holds(tiny_model, image_folder, tmp_path):
    add_landscape_images(image_folder)  # the tiny model's buckets: multiples of 8 (its VAE x UNet stride)
    run = tmp_path / "run"
    config = TrainConfig(base_model=str(tiny_model), data=str(image_folder), steps=4, run_dir=str(run))
    train(config, device="cpu", log_to_terminal=False)
    events = read_events(run)
    assert next(e for e in events if e["type"] == "start")["buckets"] == {"32x32": 4, "40x24": 2}
    notices = " ".join(e["message"] for e in events if e["type"] == "notice")
    assert "2 aspect-ratio bucket(s), width x height: images: 32x32: 4, 40x24: 2" in notices
    train(
        TrainConfig(**{**config.to_dict(), "buckets": False, "run_dir": str(tmp_path / "square")}),
        device="cpu",
        log_to_terminal=False,
    )
    assert next(e for e in read_events(tmp_path / "square") if e["type"] == "start")["buckets"] == {"32x32": 6}


def test_sdxl_time_ids_name_the_bucket_and_its_true_crop(tiny_sdxl_model, image_folder):
    from diffusers import StableDiffusionXLPipeline

    from adapters.families import SDXL

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    add_landscape_images(image_folder, 1)
    examples = load_examples(image_folder, 32, buckets=bucket_sizes(32, 16))
    cache = encode_examples(pipe, SDXL, examples, 32, "cpu", torch.float32)
    time_ids = dict(zip([e.path.name for e in examples], cache["cond"]["time_ids"].tolist()))
    # original (height, width), crop (top, left), trained (height, width)
    assert time_ids["wide0.png"] == [32, 64, 4, 0, 16, 48]
    assert time_ids["img0.png"] == [32, 32, 0, 0, 32, 32]
    assert [tuple(m.shape) for m in cache["latent_mean"]][-1] == (4, 4, 12)  # the wide one's latent, 48x16 / 4


def test_random_crop_cuts_each_picture_anew_each_epoch_and_center_does_not(tiny_model, image_folder):
    """--crop random: a picture wider than its square is cut at a new place at each draw (its latent differs from
    epoch to epoch, so no latent is cached); --crop center cuts it the same way every time. SDXL's time ids name the
    drawn crop's corner."""
    from diffusers import StableDiffusionPipeline

    from adapters.families import SD1, SDXL
    from trainer.loop import CropEncoder

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    add_landscape_images(image_folder, 1)  # 64x32 into the 32x32 square (--no-buckets): 32 columns to choose from
    latents_seen = {}
    for crop in ("center", "random"):
        examples = load_examples(image_folder, 32, crop=crop)
        wide = [e.path.name for e in examples].index("wide0.png")
        cache = encode_examples(pipe, SD1, examples, 32, "cpu", torch.float32, latents=crop == "center")
        if crop == "random":
            assert "latent_mean" not in cache  # nothing cached to cut from
            cache["crops"] = CropEncoder(pipe, SD1, examples, "cpu", torch.float32)
        drawer = BatchDrawer(len(examples), len(examples), 1000, (4, 8, 8), seed=0, crop=crop == "random")
        seen = []
        for _ in range(3):  # a batch of every image: one epoch per draw
            draw = drawer.draw()
            draw["latent_noise"].zero_()  # the batch's latents are then the encoded means of what was cut
            seen.append(make_batch(draw, cache, SD1, "cpu")["latents"][draw["index"].tolist().index(wide)])
        latents_seen[crop] = seen
    center, random = latents_seen["center"], latents_seen["random"]
    assert all(torch.equal(center[0], c) for c in center[1:])
    assert not torch.allclose(random[0], random[1]) and not torch.allclose(random[1], random[2])
    encoder = CropEncoder(pipe, SDXL, load_examples(image_folder, 32, crop="random"), "cpu", torch.float32)
    _, _, placed = encoder([wide], [False], torch.tensor([[0.0, 0.999]]))  # the right-most of the 33 places
    assert placed["time_ids"].tolist() == [[32, 64, 0, 32, 32, 32]]
