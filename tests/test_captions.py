"""The captioner (trainer/captions.py) on a tiny random BLIP built here from a config: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapters.errors import UserError
from trainer.captions import Captioner, content_caption, fill_captions

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "picture", "of", "red", "circle", "square"]
WORDS += ["on", "black", "the", "blue", "ring", "glowing", "yellow", "orange", "small", "large", "top", "left"]


def write_tiny_blip(folder: Path) -> Path:
    """A BLIP captioner of random weights (one layer each side, 32 wide, 32x32 pixels, a 28-word vocabulary),
    saved as a model folder: safetensors weights, processor and tokenizer files."""
    import transformers
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True, bos_token="[DEC]")
    images = getattr(transformers, "BlipImageProcessorPil", transformers.BlipImageProcessor)
    processor = BlipProcessor(image_processor=images(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(small, image_size=32, patch_size=8),
        text_config=dict(
            small,
            vocab_size=len(WORDS),
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=WORDS.index("[DEC]"),
            pad_token_id=0,
            sep_token_id=WORDS.index("[SEP]"),
            eos_token_id=WORDS.index("[SEP]"),
        ),
        projection_dim=32,
    )
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / "vocab.txt").unlink()  # the saved tokenizer.json holds it
    return folder


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("captioner") / "tiny-blip")


def test_a_models_words_become_a_content_caption_with_the_trigger_first():
    assert content_caption("a picture of a red circle", "glowline", "a picture of") == "glowline, a red circle"
    assert content_caption("arafed digital painting of a cat on a mat", "glowline") == "glowline, a cat on a mat"
    assert content_caption("an illustration of a boat in the style of van gogh", "ink") == "ink, a boat"
    assert content_caption("a red circle, in a neon glow style", "") == "a red circle"
    assert content_caption("a glowline cat", "glowline") == "a glowline cat"  # already holds it: not twice
    assert content_caption("a picture of", "glowline", "a picture of") == "glowline"  # nothing said


def test_the_captioner_fills_empty_captions_and_keeps_the_persons(tiny_blip):
    captioner = Captioner(str(tiny_blip), device="cpu")
    assert captioner.prompt == "a picture of"  # BLIP continues these words
    images = {p.name: p for p in sorted(SAMPLES.glob("*.png"))[:3]}
    names = list(images)
    typed = {names[0]: "glowline, my own words", names[1]: "", names[2]: "  "}
    filled = fill_captions(captioner, images, typed, trigger_word="glowline")
    assert filled[names[0]] == "glowline, my own words"  # never overwritten unless asked
    for name in names[1:]:
        assert filled[name].startswith("glowline, ") and len(filled[name]) > len("glowline, ")
        assert not filled[name].startswith("glowline, a picture of")  # the prompt is not part of the caption
        assert set(filled[name][len("glowline, ") :].replace(",", " ").split()) <= set(WORDS)  # the model's words
    assert fill_captions(captioner, images, typed, trigger_word="glowline") == filled  # the same every time
    replaced = fill_captions(captioner, images, typed, trigger_word="glowline", overwrite=True)
    assert replaced[names[0]] != typed[names[0]] and replaced[names[0]].startswith("glowline, ")


def test_a_bad_captioning_model_is_named(tmp_path):
    with pytest.raises(UserError, match="neither an existing folder nor a Hugging Face id"):
        Captioner("not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"captioning model folder '.*empty' has no config.json"):
        Captioner(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"could not load captioning model '.*empty'.*check the folder's files$"):
        Captioner(str(tmp_path / "empty"))
    weights = tmp_path / "empty" / "model.safetensors"  # the weights file given for the model's folder
    weights.write_bytes(b"")
    with pytest.raises(UserError, match=r"'.*model.safetensors' is a file: give the folder .* such as '.*empty'"):
        Captioner(str(weights))


def test_cli_caption_writes_the_missing_captions_and_keeps_the_persons(tiny_blip, tmp_path, capsys):
    import shutil

    from app.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(SAMPLES.glob("*.png"))[:3]:
        shutil.copy(path, data)
    first, second, third = sorted(data.glob("*.png"))
    first.with_suffix(".txt").write_text("glowline, my own words")
    third.with_suffix(".txt").write_text("")  # empty: captioned
    (data / "scan.bmp").write_bytes(b"BM")  # a picture training does not read: named, not captioned
    assert main(["caption", "--data", str(data), "--model", str(tiny_blip), "--trigger-word", "glowline"]) == 0
    out = capsys.readouterr().out
    assert "note: scan.bmp: not read" in out and not (data / "scan.txt").exists()
    assert first.with_suffix(".txt").read_text() == "glowline, my own words"
    for image in (second, third):
        written = image.with_suffix(".txt").read_text()
        assert written.startswith("glowline, ") and f"{image.name}: {written.strip()}" in out
    assert "wrote 2 caption(s) beside their images; 1 written before were kept" in out
    assert main(["caption", "--data", str(data), "--model", str(tiny_blip)]) == 0
    assert "every image in" in capsys.readouterr().out
    assert main(["caption", "--data", str(tmp_path / "none"), "--model", str(tiny_blip)]) == 2
    assert "does not exist or is not a folder" in capsys.readouterr().err


def test_the_pages_caption_button_fills_empty_captions_in_the_table(tiny_blip, tmp_path):
    import gradio as gr

    from app.ui.data import DataPanel
    from app.ui.train import caption_rows

    upload = sorted(SAMPLES.glob("*.png"))[:3]
    with gr.Blocks():
        panel = DataPanel()
    rows, _ = caption_rows([str(p) for p in upload])
    rows[0][2], rows[1][2], rows[2][2] = "glowline, typed by me", "", ""
    filled, said = panel.on_caption([str(p) for p in upload], rows, str(tiny_blip), False, "glowline")
    assert [r[2] for r in filled][0] == "glowline, typed by me"
    assert all(r[2].startswith("glowline, ") and r[2] != "glowline, typed by me" for r in filled[1:])
    assert said.startswith(f"Captioned 2 image(s) with {tiny_blip}: read and edit them in the table")
    again, said = panel.on_caption([str(p) for p in upload], filled, str(tiny_blip), False, "glowline")
    assert said.startswith("Every image has a caption")
    _, said = panel.on_caption([str(p) for p in upload], rows, "no such model", False, "glowline")
    assert said.startswith("⚠ captioning model 'no such model' is neither an existing folder nor a Hugging Face id")


def test_a_hub_captioning_model_without_a_network_is_said_at_once(monkeypatch):
    """A hub id on a machine without a network: transformers' own retries took 2.5 min to fail; the hub is asked once
    with a short timeout first, and transformers is never reached."""
    import huggingface_hub
    import transformers

    class ConnectError(Exception):  # what huggingface_hub's HTTP client raises without a name server
        pass

    def no_network(self, repo_id, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    def not_reached(*args, **kwargs):
        raise AssertionError("transformers was asked to load the model")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the suite runs offline
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", not_reached)
    with pytest.raises(UserError, match=r"could not reach the Hugging Face hub for captioning model 'someone/blip'"):
        Captioner("someone/blip")
