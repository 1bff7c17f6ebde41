"""Issue 13's matrix: every bad input, fault and exposure, made to happen; each test is named by its case number.

Bad input gets a message naming the file or field and the fix, and nothing starts or is lost (cases 1-7); a run
that is killed, diverges, runs out of memory or fills the disk stops cleanly and keeps its last good files (8-12);
the page serves nothing outside the workspace and nobody but the people it is meant for (13-15). Tiny models only;
the live-run tests (12, 14) share one trainer process and come last.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no calls home from tests

import errno
import http.client
import math
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save, save_file

import adapters.formats as formats
import app.jobs as jobs
import trainer.checkpoint as checkpoint
import trainer.loop as loop
from adapters.base import check_base_model
from adapters.errors import UserError
from adapters.library import Library, sanitize_name
from adapters.lora import attention_targets
from adapters.runtime import Studio
from app.cli import build_parser, main
from app.jobs import PID_FILE, active_run, new_run_dir, pair_uploads, stage_dataset, start_run, view_run
from app.ui import launch, status_text
from app.ui.generate import NONE, SLOTS, GenerateTab
from app.ui.library import LibraryTab
from app.ui.train import TrainTab
from tests.conftest import write_scene_folder
from trainer.checkpoint import list_checkpoints
from trainer.config import TrainConfig
from trainer.dataset import check_folder, load_examples, long_captions
from trainer.runs import read_events

REPO = Path(__file__).resolve().parent.parent


def config_for(tiny_model, data, run, **extra) -> TrainConfig:
    values = dict(base_model=str(tiny_model), data=str(data), steps=6, batch_size=2, learning_rate=1e-3, seed=4)
    return TrainConfig(**{**values, "run_dir": str(run), **extra})


def run_quietly(config: TrainConfig):
    return loop.train(config, device="cpu", log_to_terminal=False)


class Boom:
    """A pickle whose loading creates `marker`: proof, if the file appears, that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def studio(tiny_model):
    return Studio(str(tiny_model), device="cpu")


def kohya_name(studio) -> str:
    return "lora_unet_" + attention_targets(studio.pipe.unet, "both")[0].replace(".", "_")


def picture(studio) -> np.ndarray:
    return np.asarray(studio.generate("a red circle", seed=3, sampling_steps=2, strengths={})[0])


# -- 1. Weights that could run code ------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_01_pickle_formats_are_refused_unopened_with_how_to_convert(studio, tmp_path, suffix):
    marker = tmp_path / "unpickled"
    weights = tmp_path / f"style{suffix}"
    weights.write_bytes(pickle.dumps(Boom(marker)))
    attempts = {
        "adapter": lambda: studio.load(weights),
        "library import": lambda: Library(tmp_path / "lib").add(weights),
        "base model": lambda: check_base_model(str(weights)),
    }
    for what, attempt in attempts.items():
        with pytest.raises(UserError) as err:
            attempt()
        text = str(err.value)
        assert str(weights) in text and "safetensors" in text, what
        assert "can run code when loaded" in text or "is a pickled PyTorch checkpoint" in text, what  # unopened
        # adapters/formats.py words it for adapters, adapters/single_file.py (its own command) for base models
        assert "weights_only=True" in text or "convert it once with" in text, what
    assert not marker.exists() and studio.adapters == {}


def test_01_pickle_or_random_bytes_named_safetensors_are_refused_by_content_also_in_the_page(
    studio, tiny_model, tmp_path
):
    marker = tmp_path / "unpickled"
    evil, noise = tmp_path / "evil.safetensors", tmp_path / "noise.safetensors"
    evil.write_bytes(pickle.dumps(Boom(marker)))
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    library = Library(tmp_path / "lib")
    with gr.Blocks():
        generate_tab, library_tab = GenerateTab(library, str(tiny_model)), LibraryTab(library)
    for bad in (evil, noise):
        with pytest.raises(UserError, match=f"{bad.name} is not a valid safetensors file") as err:
            studio.load(bad)
        if bad is evil:  # told by its content, and how to convert a checkpoint one trusts
            assert "it is a pickled PyTorch checkpoint named .safetensors" in str(err.value)
            assert "weights_only=True" in str(err.value)
        with pytest.raises(UserError, match=f"{bad.name} is (not a valid safetensors file|a pickled PyTorch)"):
            check_base_model(str(bad))
        *_, status = library_tab.on_import(str(bad))  # the Adapters tab's Import button
        assert f"{bad.name} is not a valid safetensors file" in status and "Imported" not in status
        *_, status = generate_tab.on_upload_adapter(str(bad))  # the Generate tab's upload
        assert f"{bad.name} is not a valid safetensors file" in status and "Added" not in status
    assert not marker.exists()
    assert library.list() == [] and list(library.root.iterdir()) == [] and studio.adapters == {}


# -- 2. Broken adapters ------------------------------------------------------------------------------------------


def test_02_broken_adapters_are_refused_before_they_touch_the_model(studio, tmp_path):
    name = kohya_name(studio)
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    good = save({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up})
    header_len = struct.unpack("<Q", good[:8])[0]
    files = {
        "nan.safetensors": save({f"{name}.lora_down.weight": down * math.nan, f"{name}.lora_up.weight": up}),
        "inf.safetensors": save({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * math.inf}),
        "nolayer.safetensors": save(
            {"lora_unet_no_such_block_to_q.lora_down.weight": down, "lora_unet_no_such_block_to_q.lora_up.weight": up}
        ),
        "shapes.safetensors": save(
            {f"{name}.lora_down.weight": torch.randn(4, 7), f"{name}.lora_up.weight": torch.randn(9, 4)}
        ),
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) - 100],
        "header-too-long.safetensors": struct.pack("<Q", header_len + 10**6) + good[8:],
        "picture.safetensors": png_declaring(8, 8),
    }
    reasons = {
        "nan.safetensors": "contain NaN or Inf",
        "inf.safetensors": "contain NaN or Inf",
        "nolayer.safetensors": "match no layer",
        "shapes.safetensors": "expects in 32 / out 32, the file has in 7 / out 9",
        "empty.safetensors": "is not a valid safetensors file: it is empty (0 bytes), a download or copy",
        "truncated.safetensors": "is not a valid safetensors file: it is cut short or damaged",
        "header-too-long.safetensors": "is not a valid safetensors file: it is cut short or damaged",
        "picture.safetensors": "is not a valid safetensors file: it is a PNG picture, not an adapter",
    }
    before = picture(studio)
    for file_name, blob in files.items():
        path = tmp_path / file_name
        path.write_bytes(blob)
        with pytest.raises(UserError) as err:
            studio.load(path)
        assert file_name in str(err.value) and reasons[file_name] in str(err.value), str(err.value)
    assert studio.adapters == {}
    assert np.array_equal(picture(studio), before)  # the model in memory is what it was


# -- 3. Training images ------------------------------------------------------------------------------------------


def png_declaring(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height RGB pixels: a decompression bomb if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_03_bombs_and_broken_images_are_refused_per_file_and_listed_together(tiny_model, image_folder, tmp_path):
    (image_folder / "bomb.png").write_bytes(png_declaring(30000, 30000))
    (image_folder / "big.png").write_bytes(png_declaring(10000, 10000))  # over the limit, under Pillow's own error
    jpeg = image_folder / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:-300])
    (image_folder / "zero.png").write_bytes(b"")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(image_folder / "tiff.png", format="TIFF")
    for stem in ("bomb", "big", "cut", "zero", "tiff"):
        (image_folder / f"{stem}.txt").write_text("a caption")
    with pytest.raises(UserError) as err:
        check_folder(image_folder)
    text = str(err.value)
    assert "has 5 problem(s)" in text
    assert "bomb.png: refused, too many pixels to decode safely (Image size (900000000 pixels) exceeds" in text
    assert "big.png: refused, too many pixels to decode safely (Image size (100000000 pixels) exceeds" in text
    assert "cut.jpg: not a readable image (OSError: image file is truncated" in text
    assert "zero.png: the file is empty (0 bytes); replace or remove it" in text
    assert "tiff.png: is a TIFF file, whatever its name says; save it as PNG, JPEG, WebP or GIF" in text
    # and through train(): refused before a model loads or a run folder is made
    with pytest.raises(UserError, match="has 5 problem"):
        run_quietly(config_for(tiny_model, image_folder, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_03_odd_but_sound_images_come_out_upright_rgb_and_animations_give_their_first_frame(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(data / "anim.webp", save_all=True, append_images=[blue], lossless=True)
    red.save(data / "anim.gif", save_all=True, append_images=[blue])
    red.save(data / "apng.png", save_all=True, append_images=[blue])
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(data / "cmyk.jpg", quality=100)  # pure cyan
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(data / "palette.png", transparency=0)  # every pixel transparent black
    Image.fromarray(np.full((16, 16), 32768, dtype=np.uint16)).save(data / "grey16.png")  # 16-bit mid grey
    Image.new("LA", (16, 16), (0, 0)).save(data / "alpha.png")  # transparent black, with an alpha channel
    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to view"
    rotated.save(data / "exif.jpg", exif=exif, quality=100)
    for path in list(data.iterdir()):
        path.with_suffix(".txt").write_text("a caption")
    notes: list[str] = []
    pixels = {e.path.name: e.pixels for e in load_examples(data, 16, notes=notes)}
    assert all(p.shape == (3, 16, 16) and p.dtype == torch.float32 for p in pixels.values())

    def rgb(name, y=8, x=8):
        return [round(float(v), 2) for v in pixels[name][:, y, x]]

    for name in ("anim.webp", "anim.gif", "apng.png"):
        assert rgb(name) == [1.0, -1.0, -1.0], name  # the first (red) frame
        assert f"{name}: animated (2 frames); training uses the first frame" in notes
    assert len(notes) == 3
    assert np.allclose(rgb("cmyk.jpg"), [-1.0, 1.0, 1.0], atol=0.05)
    assert rgb("palette.png") == [1.0, 1.0, 1.0] and rgb("alpha.png") == [1.0, 1.0, 1.0]  # flattened on white
    assert rgb("grey16.png") == [round(128 / 127.5 - 1, 2)] * 3  # scaled to 8 bits, not clipped to white
    top, bottom = rgb("exif.jpg", y=1), rgb("exif.jpg", y=14)
    assert top[0] > 0.9 and top[2] < -0.9 and bottom[2] > 0.9 and bottom[0] < -0.9  # upright: red above blue


# -- 4. Captions ---------------------------------------------------------------------------------------------------


def test_04_missing_and_empty_captions_are_named_or_filled(image_folder):
    (image_folder / "img0.txt").unlink()
    (image_folder / "img1.txt").write_text(" \n")
    with pytest.raises(UserError) as err:
        check_folder(image_folder)
    assert "img0.png: caption img0.txt is missing; write one, or set a default caption (--default-caption)" in str(
        err.value
    )
    assert "img1.png: caption img1.txt is empty" in str(err.value)
    pairs = dict(check_folder(image_folder, default_caption="neon"))
    assert pairs[image_folder / "img0.png"] == pairs[image_folder / "img1.png"] == "neon"


def test_04_captions_not_in_utf8_are_read_and_said_once(image_folder):
    (image_folder / "img0.txt").write_bytes(b"neon \xff glow")
    (image_folder / "img1.txt").write_bytes(b"caf\xe9 sign")  # Latin-1
    notes: list[str] = []
    pairs = dict(check_folder(image_folder, notes=notes))
    assert pairs[image_folder / "img0.png"] == "neon \ufffd glow"
    assert notes == [
        "caption(s) not in UTF-8, read with \ufffd in place of the bytes that are not: img0.txt, img1.txt; "
        "save them as UTF-8 to keep every character"
    ]


def test_04_a_caption_longer_than_the_text_encoder_reads_is_named_with_the_tokens_dropped(tiny_model, image_folder):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    (image_folder / "img2.txt").write_text(" ".join(["neon glow"] * 60))  # 120 words
    examples = load_examples(image_folder, 32)
    dropped = len(tokenizer(examples[2].caption).input_ids) - tokenizer.model_max_length
    assert tokenizer.model_max_length == 77 and dropped >= 120 + 2 - 77
    assert long_captions(examples, tokenizer) == [
        f"img2.png: its caption is {dropped} token(s) longer than the 77 the text encoder reads; training drops "
        "the end (shorten the caption to keep it)"
    ]


@pytest.fixture(scope="module")
def odd_run(tiny_model, tmp_path_factory):
    """One short run with an animated image, a Latin-1 caption and an overlong one, named like a path escape."""
    root = tmp_path_factory.mktemp("odd")
    data = write_scene_folder(root / "data", count=3)
    Image.open(data / "img0.png").save(data / "anim.webp", save_all=True, append_images=[Image.new("RGB", (32, 32))])
    (data / "anim.txt").write_text("neon, moving")
    (data / "img1.txt").write_bytes(b"caf\xe9 sign")
    (data / "img2.txt").write_text(" ".join(["neon glow"] * 60))
    config = TrainConfig(
        base_model=str(tiny_model), data=str(data), steps=2, name="../../escape\0<>|?*", library=str(root / "lib")
    )
    cwd = Path.cwd()
    os.chdir(root)  # the default run folder is ./runs
    try:
        result = run_quietly(config)
    finally:
        os.chdir(cwd)
    return root, root / result.run_dir


def test_04_what_the_data_check_says_reaches_the_run_log(odd_run):
    _, run = odd_run
    said = [e["message"] for e in read_events(run) if e["type"] == "notice"]
    assert "anim.webp: animated (2 frames); training uses the first frame" in said
    assert any(m.startswith("caption(s) not in UTF-8") and "img1.txt" in m for m in said)
    assert any(re.match(r"img2\.png: its caption is \d+ token\(s\) longer than the 77", m) for m in said)


# -- 5. Upload limits ----------------------------------------------------------------------------------------------


def test_05_an_upload_of_too_many_files_is_refused_with_the_limit(image_folder, tmp_path):
    paths = sorted(image_folder.iterdir())  # 4 images, 4 captions
    uploads, problems = pair_uploads(paths, max_files=7)
    assert uploads == [] and problems == [
        "the upload has 8 files, more than the 7 allowed; upload fewer "
        "(the limit is lora-studio ui --max-upload-files)"
    ]
    with gr.Blocks():
        tab = TrainTab(tmp_path / "runs", Library(tmp_path / "lib"), None, max_upload_files=7)
    message, _ = tab.on_train([str(p) for p in paths], [], *[c.value for c in tab.settings.inputs])
    assert "Nothing started" in message and "more than the 7 allowed" in message
    rows, note = tab.caption_rows([str(p) for p in paths])
    assert rows == [] and problems[0] in note
    assert not (tmp_path / "runs").exists()
    # The size of each file is gradio's max_file_size, checked over HTTP in test_13_the_server_...


# -- 6. Names ------------------------------------------------------------------------------------------------------

HOSTILE_NAMES = ["../../evil", "/etc/passwd", "a\0b", 'con<>:"|?*', "..", "~/x", "C:\\evil"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_06_hostile_run_and_adapter_names_stay_inside_their_folders(name, tmp_path):
    runs, library = tmp_path / "ws" / "runs", Library(tmp_path / "ws" / "library")
    assert new_run_dir(runs, name).parent == runs
    source = tmp_path / "in.safetensors"
    save_file(
        {
            "lora_unet_a_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, 4),
        },
        source,
    )
    try:
        entry = library.add(source, name)
    except UserError as exc:  # nothing usable in it: refused, which is also safe
        assert "has no usable characters" in str(exc)
        entry = library.add(source, "plain")
    assert entry.path.parent == library.root and "\0" not in entry.path.name
    try:
        renamed = library.rename(entry.name, name + "2")
    except UserError:
        renamed = entry
    assert renamed.path.parent == library.root
    with pytest.raises(UserError, match="no adapter named"):
        library.get("../" + entry.name)  # sanitised to another name, which does not exist
    outside = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "ws" not in p.parts)
    assert outside == [Path("in.safetensors")]  # nothing written outside the workspace


def test_06_the_name_of_a_run_and_its_library_entry_are_confined(odd_run):
    root, run = odd_run
    assert run.parent == root / "runs" and run.name.endswith("-escape")
    assert [p.name for p in (root / "lib").iterdir()] == [sanitize_name("../../escape\0<>|?*") + ".safetensors"]
    assert sorted(p.name for p in root.iterdir()) == ["data", "lib", "runs"]


def test_06_uploaded_file_names_are_staged_inside_the_staging_folder(image_folder, tmp_path):
    odd = tmp_path / "up"
    odd.mkdir()
    for weird in ("-rf $(x).png", "..a.png", " spaced .png"):
        (odd / weird).write_bytes((image_folder / "img0.png").read_bytes())
    uploads, problems = pair_uploads(sorted(odd.iterdir()))
    assert problems == []
    for up in uploads:
        up.caption = "a caption"
    staged = stage_dataset(uploads)
    try:
        assert {p.parent for p in staged.rglob("*")} == {staged}
        assert len(list(staged.glob("*.png"))) == 3
    finally:
        shutil.rmtree(staged)


# -- 7. Impossible settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("resolution", 60, r"resolution \(--resolution\) must be 0 \(native\) or a multiple of 8 from 64 up"),
        ("resolution", 32, r"resolution \(--resolution\) must be 0 \(native\) or a multiple of 8 from 64 up"),
        ("batch_size", 0, r"batch_size \(--batch-size\) must be at least 1"),
        ("steps", 0, r"steps \(--steps\) must be at least 1"),
        ("steps", -5, r"steps \(--steps\) must be at least 1"),
        ("rank", 0, r"rank \(--rank\) must be at least 1"),
        ("learning_rate", math.nan, r"learning_rate \(--learning-rate\) must be a positive number below 1"),
        ("learning_rate", math.inf, r"learning_rate \(--learning-rate\) must be a positive number below 1"),
        ("learning_rate", 1e30, r"learning_rate \(--learning-rate\) must be a positive number below 1"),
        ("num_processes", 0, r"num_processes \(--num-processes\) must be at least 1"),
    ],
)
def test_07_impossible_settings_name_the_field_and_the_fix(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})


def test_07_config_files_with_unknown_keys_or_no_mapping_are_refused(tmp_path):
    (tmp_path / "typo.yaml").write_text("data: d\nlearning_rte: 0.001\n")
    with pytest.raises(
        UserError, match=r"typo.yaml: unknown field\(s\) 'learning_rte' \(did you mean 'learning_rate'"
    ):
        TrainConfig.from_file(tmp_path / "typo.yaml")
    (tmp_path / "list.yaml").write_text("- data\n- steps\n")
    with pytest.raises(UserError, match=r"list.yaml: expected a mapping of field names to values, got list"):
        TrainConfig.from_file(tmp_path / "list.yaml")


def test_07_fp16_on_the_cpu_is_refused_before_any_model_loads(tiny_model, image_folder, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_pipeline", no_loading)
    with pytest.raises(
        UserError, match="mixed_precision \\(--mixed-precision\\) fp16 needs a CUDA GPU; use no or bf16"
    ):
        run_quietly(config_for(tiny_model, image_folder, tmp_path / "run", mixed_precision="fp16"))
    assert not (tmp_path / "run").exists()


def test_07_a_rank_larger_than_the_layers_is_refused_before_any_data_is_encoded(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    """Known only once the model is loaded (the tiny model's attention layers are 32 wide), so checked right
    after loading, before the data is encoded or a step runs."""

    def no_encoding(*args, **kwargs):
        raise AssertionError("the data was encoded")

    monkeypatch.setattr(loop, "encode_examples", no_encoding)
    with pytest.raises(UserError, match=r"rank \(--rank\) 64 is larger than the layer .* use a rank of at most 32"):
        run_quietly(config_for(tiny_model, image_folder, tmp_path / "run", rank=64))


# -- 8. Killed mid-run and mid-save ---------------------------------------------------------------------------------

DIE_IN_SECOND_CHECKPOINT = """
import os, signal, sys
import torch
import trainer.checkpoint as checkpoint
from safetensors.torch import save
from trainer.config import TrainConfig
from trainer.loop import train

calls = []

def half_then_killed(tensors, filename, metadata=None):
    calls.append(filename)
    if len(calls) < 2:
        return save_file(tensors, filename, metadata)
    blob = save(tensors)
    with open(filename, "wb") as f:
        f.write(blob[: len(blob) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

save_file, checkpoint.save_file = checkpoint.save_file, half_then_killed
torch.set_num_threads(int(sys.argv[2]))  # the test's own count: float sums, so the steps, depend on it
train(TrainConfig.from_file(sys.argv[1]), device="cpu", log_to_terminal=False)
"""

DIE_WRITING_ADAPTER = """
import os, signal, sys
from pathlib import Path
import adapters.formats as formats

def killed(fd):
    os.kill(os.getpid(), signal.SIGKILL)

formats.os.fsync = killed  # the bytes are written, the file not yet renamed into place
formats.write_atomic(Path(sys.argv[1]), b"new weights " * 10000)
"""


def python(script: str, *args) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, timeout=300)


def test_08_killed_mid_save_leaves_no_half_file_under_a_final_name_and_resume_is_bit_exact(
    tiny_model, image_folder, tmp_path
):
    whole = run_quietly(config_for(tiny_model, image_folder, tmp_path / "whole"))

    run = tmp_path / "cut"
    config_for(tiny_model, image_folder, run, save_every=2).save(tmp_path / "cut.json")
    killed = python(DIE_IN_SECOND_CHECKPOINT, tmp_path / "cut.json", torch.get_num_threads())
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [".step_000004.tmp", "step_000002"]  # killed while writing step 4; only step 2 is final
    assert load_file(run / "checkpoints" / "step_000002" / "state.safetensors")  # complete and readable
    assert not (run / "adapter.safetensors").exists()

    resumed = run_quietly(config_for(tiny_model, image_folder, run, save_every=2, resume="latest"))
    notices = [e["message"] for e in read_events(run) if e["type"] == "notice"]
    assert f"resuming at step 2 from checkpoint {run / 'checkpoints' / 'step_000002'} (the newest complete one)" in (
        notices
    )
    a, b = load_file(whole.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def test_08_killed_while_writing_an_adapter_leaves_the_old_file_under_its_name(tmp_path):
    target = tmp_path / "adapter.safetensors"
    target.write_bytes(b"old weights")
    killed = python(DIE_WRITING_ADAPTER, target)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert target.read_bytes() == b"old weights"
    [partial] = [p for p in tmp_path.iterdir() if p != target]
    assert partial.name.startswith(".adapter.safetensors.") and partial.name.endswith(".tmp")


# -- 9-11. Divergence, out of memory, a full disk -------------------------------------------------------------------


def break_step(monkeypatch, at: int, fault):
    """Wrap the training step: at call `at`, after the real step, `fault(step)` runs (poisons weights, raises)."""
    real = loop.make_step
    calls = []

    class Faulty:
        def __init__(self, step):
            self.step = step

        def __getattr__(self, name):  # kind, why, optimizer...: the real step's
            return getattr(self.step, name)

        def __call__(self, batch):
            calls.append(None)
            loss = self.step(batch)
            if len(calls) == at:
                fault(self.step)
            return loss

    def wrapped(*args, **kwargs):
        return Faulty(real(*args, **kwargs))

    monkeypatch.setattr(loop, "make_step", wrapped)


def poison(step):
    """What a diverging optimiser step does: LoRA weights become NaN."""
    with torch.no_grad():
        step.optimizer.param_groups[0]["params"][1].fill_(math.nan)


@pytest.mark.parametrize(
    "poisoned_at,stopped_at,why,last_progress",
    [(3, 4, "the loss is nan", 3), (2, 2, "the LoRA weights hold NaN or Inf values", 2)],
    ids=["loss-nan-the-step-after", "weights-nan-at-a-checkpoint"],
)
def test_09_a_diverging_run_stops_within_one_step_and_writes_no_nan(
    poisoned_at, stopped_at, why, last_progress, tiny_model, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the adapter from before")
    break_step(monkeypatch, poisoned_at, poison)
    run = tmp_path / "run"
    config = config_for(tiny_model, image_folder, run, save_every=2, output=str(out), overwrite=True)
    with pytest.raises(UserError) as err:
        run_quietly(config)
    text = str(err.value)
    assert text.startswith(f"training stopped at step {stopped_at}: {why}; the run diverged.")
    assert "lower --learning-rate (now 0.001; try 0.0001)" in text and "--mixed-precision bf16" in text
    events = read_events(run)
    assert events[-1] == {**events[-1], "type": "error", "message": text}
    assert [e["step"] for e in events if e["type"] == "progress"] == list(range(1, last_progress + 1))
    assert out.read_bytes() == b"the adapter from before"
    kept = list_checkpoints(run)
    assert [p.name for p in kept] == (["step_000002"] if stopped_at > 2 else [])
    assert ("step_000002, is kept" in text) == bool(kept) and ("no checkpoint had been saved" in text) != bool(kept)
    for path in kept:
        assert all(torch.isfinite(t).all() for t in load_file(path / "state.safetensors").values())


def test_09_no_adapter_file_with_nan_weights_is_ever_written(tmp_path):
    with pytest.raises(UserError, match=r"not writing .*x.safetensors: tensor\(s\) \['w'\] hold NaN or Inf"):
        formats.save_adapter(tmp_path / "x.safetensors", {"w": torch.tensor([1.0, math.inf])}, {})
    assert list(tmp_path.iterdir()) == []


def test_10_cuda_out_of_memory_says_what_to_change_and_the_page_shows_it(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    def out_of_memory(step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    break_step(monkeypatch, 3, out_of_memory)
    run = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_quietly(config_for(tiny_model, image_folder, run, save_every=2))
    text = str(err.value)
    assert text.startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB).")
    for advice in (
        "--batch-size (now 2; try 1)",
        "--resolution (now the model's native size)",
        "--rank (now 8)",
        "--gradient-checkpointing on (now auto)",
    ):
        assert advice in text
    assert "--no-cuda-graphs" in text and "step_000002, is kept: --run-dir" in text
    assert [p.name for p in list_checkpoints(run)] == ["step_000002"]
    view = view_run(run)
    shown = status_text(view)
    assert view.status == "error" and view.message == text
    assert "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)." in shown
    assert "Press **Resume** to go on from its newest checkpoint, step_000002." in shown


def test_11_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_model, image_folder, tmp_path, monkeypatch):
    real = checkpoint.save_file
    calls = []

    def disk_fills(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) < 2:
            return real(tensors, filename, metadata)
        Path(filename).write_bytes(save(tensors)[:1000])  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_fills)
    run = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_quietly(config_for(tiny_model, image_folder, run, save_every=2))
    assert str(err.value) == (
        f"could not save checkpoint step 4 in {run / 'checkpoints'}: the disk is full (No space left on device). "
        "The partial checkpoint was removed and the previous checkpoint, step_000002, is kept; free some space, "
        "then resume with --resume latest"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert read_events(run)[-1]["type"] == "error"


def test_11_a_full_disk_while_writing_the_adapter_keeps_the_previous_one(
    tiny_model, image_folder, tmp_path, monkeypatch
):
    out = tmp_path / "out" / "style.safetensors"
    out.parent.mkdir()
    out.write_bytes(b"the adapter from before")
    real = loop.save_adapter

    def disk_fills(path, tensors, metadata):
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        if Path(path) != out:  # a checkpoint's own adapter file: written
            return real(path, tensors, metadata)
        with monkeypatch.context() as m:  # only this write sees a full disk (the event log fsyncs too)
            m.setattr(formats.os, "fsync", no_space)
            real(path, tensors, metadata)

    monkeypatch.setattr(loop, "save_adapter", disk_fills)
    run = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_quietly(config_for(tiny_model, image_folder, run, save_every=2, output=str(out), overwrite=True))
    assert str(err.value) == (
        f"could not write {out}: the disk is full (No space left on device). The partial file was removed and "
        "style.safetensors is left as it was; free some space and try again"
    )
    assert out.read_bytes() == b"the adapter from before" and list(out.parent.iterdir()) == [out]
    assert [p.name for p in list_checkpoints(run)] == ["step_000002", "step_000004"]


# -- 13. Exposure --------------------------------------------------------------------------------------------------


def test_13_a_host_other_than_this_machine_needs_a_login(tmp_path, capsys):
    assert build_parser().parse_args(["ui"]).host == "127.0.0.1"
    for host in ("0.0.0.0", "192.168.1.5", "::", "myhost.example"):
        code = main(["ui", "--host", host, "--workspace", str(tmp_path)])
        err = capsys.readouterr().err
        assert code == 2 and f"--host {host} lets other machines open the page" in err
        assert "add --auth user:password, or --insecure-no-auth" in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_13_launch_settings_share_off_minimal_paths_and_a_size_limit(tmp_path, monkeypatch):
    seen = {}

    def fake_launch(self, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    launch("0.0.0.0", 7000, workspace=str(tmp_path), insecure_no_auth=True, max_file_mb=5)
    assert seen["share"] is False and seen["auth"] is None and seen["server_name"] == "0.0.0.0"
    assert seen["allowed_paths"] == [str(tmp_path / name) for name in ("runs", "library", "outputs")]
    assert seen["max_file_size"] == "5mb"
    launch("0.0.0.0", 7000, auth="ann:secret", workspace=str(tmp_path))
    assert seen["auth"] == ("ann", "secret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, raw_path: str) -> tuple[int, bytes, dict]:
    """One GET with the path sent exactly as written (no client-side normalisation), redirects not followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", raw_path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, dict(response.getheaders())


def post_file(port: int, name: str, data: bytes) -> tuple[int, bytes]:
    boundary = "lorastudioboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/gradio_api/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    result = response.status, response.read()
    conn.close()
    return result


def test_13_the_server_gives_no_file_outside_the_workspace_and_refuses_oversized_uploads(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    preview = workspace / "runs" / "r1" / "previews" / "step_000001.png"
    preview.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(preview)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-OUTSIDE")
    (workspace / "notes.txt").write_text("SECRET-IN-WORKSPACE-ROOT")  # in the workspace, not in runs/ or library/
    port = free_port()
    app = launch("127.0.0.1", port, workspace=str(workspace), base_model=str(tiny_model), max_file_mb=1, block=False)
    try:
        status, body, _ = get(port, f"/gradio_api/file={preview}")  # what the page does show is served
        assert status == 200 and body == preview.read_bytes()
        runs = workspace / "runs"
        probes = [
            "/gradio_api/file=/etc/passwd",
            "/file=/etc/passwd",
            "/gradio_api/file/etc/passwd",
            f"/gradio_api/file={runs}/../../../../../../etc/passwd",
            f"/gradio_api/file={runs}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
            f"/gradio_api/file={runs}%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
            "/gradio_api/file=..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
            f"/gradio_api/file={secret}",
            f"/file={secret}",
            f"/gradio_api/file={runs}/../../secret.txt",
            f"/gradio_api/file={runs}/%2e%2e/%2e%2e/secret.txt",
            f"/gradio_api/file={workspace}/notes.txt",
            f"/gradio_api/file={REPO / 'pyproject.toml'}",
            f"/gradio_api/file={REPO / 'app' / 'cli.py'}",
            "/gradio_api/file=http://169.254.169.254/latest/meta-data/",  # not an open redirect or proxy either
        ]
        for probe in probes:
            status, body, headers = get(port, probe)
            assert status >= 400, (probe, status)
            assert b"root:" not in body and b"SECRET" not in body and b"lora-studio" not in body, probe
            assert "location" not in {k.lower() for k in headers}, probe
        status, body = post_file(port, "small.png", b"x" * 1000)
        assert status == 200
        status, body = post_file(port, "big.png", b"x" * (2 * 1024 * 1024))
        assert status == 413 and b"maximum allowed size of 1048576 bytes" in body
    finally:
        app.close()


def test_13_with_a_login_files_need_it_too(tiny_model, tmp_path):
    workspace = tmp_path / "ws"
    preview = workspace / "runs" / "r1" / "previews" / "step_000001.png"
    preview.parent.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(preview)
    port = free_port()
    app = launch(
        "127.0.0.1", port, auth="ann:secret", workspace=str(workspace), base_model=str(tiny_model), block=False
    )
    try:
        status, body, _ = get(port, f"/gradio_api/file={preview}")
        assert status in (401, 403) and body != preview.read_bytes()
    finally:
        app.close()


# -- 15. Dependencies ----------------------------------------------------------------------------------------------


def test_15_gradio_is_pinned_past_the_published_file_access_advisories():
    """6.22.0 is the first release with every fix the README lists (CVE-2026-28414, GHSA-j36p-7w88-g82j, the
    file-route open redirect of gradio#13593, the file-serving workers of authenticated apps in gradio#13687)."""
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    [pin] = [Requirement(d) for d in re.findall(r'"(gradio[<>=!~ ].*?)"', (REPO / "pyproject.toml").read_text())]
    minimum = min(Version(s.version) for s in pin.specifier if s.operator == ">=")
    assert minimum >= Version("6.22")
    assert Version(version("gradio")) in pin.specifier
    assert f"gradio {minimum}" in (REPO / "README.md").read_text()


# -- 12 and 14: with a run training (one trainer process, shared) ---------------------------------------------------


@pytest.fixture(scope="module")
def live_run(tiny_model, tmp_path_factory):
    """A training run in its own process, as the page starts one, past its first checkpoint; killed at the end."""
    root = tmp_path_factory.mktemp("live")
    staged = stage_dataset(pair_uploads(sorted(write_scene_folder(root / "images").iterdir()))[0])
    config = TrainConfig(data="x", base_model=str(tiny_model), steps=100000, batch_size=1, save_every=3, name="live")
    run = start_run(config, staged, root / "runs", root / "library")
    try:
        wait_for(lambda: list_checkpoints(run) and view_run(run).step >= 4, run)
        yield run
    finally:  # every trainer this module started (a test that fails may have started one more)
        for pid in {int((run / PID_FILE).read_text()), *jobs._CHILDREN}:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        for proc in jobs._CHILDREN.values():
            proc.wait(timeout=30)


def wait_for(condition, run: Path, seconds: float = 180):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, (run / "train.log").read_text()[-2000:]
        time.sleep(0.2)


def test_12_a_restarted_app_reattaches_and_a_trainer_that_died_without_a_word_offers_resume(live_run, tmp_path):
    runs = live_run.parent
    pid = int((live_run / PID_FILE).read_text())
    child = jobs._CHILDREN.get(pid)
    jobs._CHILDREN.clear()  # the app restarts: it has no handle on the trainer any more
    with gr.Blocks():
        tab = TrainTab(runs, Library(tmp_path / "lib"), None)  # the restarted app's Train tab
    assert tab.on_load().value == live_run.name  # the page re-attaches to the live run
    view = view_run(live_run)
    assert view.status == "running" and [s for s, _ in view.losses] == list(range(1, view.step + 1))

    os.killpg(pid, signal.SIGKILL)  # the trainer dies without a word
    if child is not None:
        child.wait(timeout=30)
    wait_for(lambda: view_run(live_run).status == "interrupted", live_run)
    view = view_run(live_run)
    newest = list_checkpoints(live_run)[-1]
    shown = status_text(view)
    assert "Interrupted: the trainer stopped without finishing" in shown
    assert f"Press **Resume** to go on from its newest checkpoint, {newest.name}." in shown
    assert [s for s, _ in view.losses] == list(range(1, view.step + 1))  # the history is intact

    assert tab.on_resume(live_run.name).startswith(f"Resuming **{live_run.name}**")
    wait_for(lambda: any(e["type"] == "resume" for e in read_events(live_run)), live_run)
    view, kept = view_run(live_run), int(newest.name.split("_")[1])
    assert view.live and [s for s, _ in view.losses][:kept] == list(range(1, kept + 1))


def test_14_a_second_training_while_one_runs_waits_in_the_queue_in_words(live_run, image_folder, tmp_path):
    with gr.Blocks():
        tab = TrainTab(live_run.parent, Library(tmp_path / "lib"), None)
    files = [str(p) for p in sorted(image_folder.iterdir())]
    staged_before = set(Path(tempfile.gettempdir()).glob("lora-studio-upload-*"))
    message, picker = tab.on_train(files, [], *[c.value for c in tab.settings.inputs])
    waiting = live_run.parent / picker.constructor_args["value"]
    try:
        assert set(Path(tempfile.gettempdir()).glob("lora-studio-upload-*")) == staged_before  # nothing left staged
        assert message.startswith(f"Queued (position 1): run **{waiting.name}** starts when the run before it ends")
        assert jobs.view_run(waiting).status == "queued" and (waiting / "data").is_dir()
        assert active_run(live_run.parent).run_dir == live_run
    finally:
        assert jobs.cancel_run(waiting)  # out of the queue: it never starts, even when the live run is killed
    assert jobs.view_run(waiting).status == "cancelled" and not (waiting / PID_FILE).exists()


def test_14_ten_generate_requests_from_several_sessions_while_a_run_trains_are_all_answered(live_run, tiny_model):
    from gradio_client import Client

    workspace = live_run.parent.parent
    port = free_port()
    app = launch("127.0.0.1", port, workspace=str(workspace), base_model=str(tiny_model), block=False)
    try:
        plain = [
            str(tiny_model),
            "a red circle",
            "",
            0,
            False,
            2,
            5.0,
            0.0,
            0,
            0,
            "model default",
            1,
            1,
            "0, 1",
            False,
        ]

        def one_session(seed: int):
            # a browser session of its own; a browser waits for the page longer than httpx's 5 s default
            client = Client(f"http://127.0.0.1:{port}/", verbose=False, httpx_kwargs={"timeout": 120})
            values = list(plain)
            values[3] = seed
            return client.predict(*values, *[NONE] * SLOTS, *[1.0] * SLOTS, api_name="/on_generate")

        with ThreadPoolExecutor(max_workers=10) as pool:
            answers = list(pool.map(one_session, range(10)))
        assert view_run(live_run).live  # the run trained all along
    finally:
        app.close()
    for seed, (gallery, status, *_) in enumerate(answers):
        assert status.startswith(f"Seed {seed}. base model. Saved in outputs/") and len(gallery["value"]) == 1
    saved = sorted(p.name for p in (workspace / "outputs").glob("*/*.png"))  # one file each, none overwritten
    assert sorted(name.split("-")[1] for name in saved) == sorted(f"{seed}.png" for seed in range(10))
