"""The adapter library: list, import, rename, delete; safe names; nothing overwritten unasked."""

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adapters.errors import UserError
from adapters.library import Library, sanitize_name


def make_adapter(path, dim="4"):
    save_file(
        {
            "lora_unet_a_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_a_to_q.lora_up.weight": torch.zeros(8, 4),
        },
        path,
        metadata={"ss_network_dim": dim, "modelspec.trigger_phrase": "zz", "ss_steps": "100"},
    )
    return path


@pytest.mark.parametrize(
    "raw,safe",
    [
        ("my style", "my style"),
        ("../../etc/passwd", "___etc_passwd"),
        ("a/b\\c", "a_b_c"),
        (".hidden", "hidden"),
        ("x.safetensors", "x"),
        ("a..b", "a_b"),
    ],
)
def test_names_are_sanitised(raw, safe):
    name = sanitize_name(raw)
    assert name == safe
    assert "/" not in name and "\\" not in name and ".." not in name and not name.startswith(".")


@pytest.mark.parametrize("raw", ["", "...", "///"])
def test_unusable_names_are_refused(raw):
    with pytest.raises(UserError, match="no usable characters"):
        sanitize_name(raw)


def test_add_list_rename_delete(tmp_path):
    lib = Library(tmp_path / "lib")
    src = make_adapter(tmp_path / "in.safetensors")
    entry = lib.add(src, "../Neon Style", sample=Image.new("RGB", (8, 8), (255, 0, 0)))
    assert entry.path == tmp_path / "lib" / "_Neon Style.safetensors" and entry.sample.is_file()
    assert entry.summary["trigger_word"] == "zz" and entry.summary["rank"] == "4"
    assert [e.name for e in lib.list()] == ["_Neon Style"]
    assert src.is_file()  # importing copies; the user's file stays where it was

    renamed = lib.rename("_Neon Style", "neon")
    assert renamed.name == "neon" and renamed.sample.name == "neon.png"
    assert not (tmp_path / "lib" / "_Neon Style.png").exists()

    lib.delete("neon")
    assert lib.list() == [] and list((tmp_path / "lib").iterdir()) == []


def test_nothing_is_overwritten_without_asking(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_adapter(tmp_path / "a.safetensors", dim="4"), "style")
    lib.add(make_adapter(tmp_path / "b.safetensors", dim="8"), "other")
    with pytest.raises(UserError, match="already has an adapter named 'style'"):
        lib.add(tmp_path / "b.safetensors", "style")
    with pytest.raises(UserError, match="already has an adapter named 'style'"):
        lib.rename("other", "style")
    assert lib.get("style").summary["rank"] == "4" and lib.get("other").summary["rank"] == "8"
    lib.add(tmp_path / "b.safetensors", "style", overwrite=True)
    assert lib.get("style").summary["rank"] == "8"


def test_import_refuses_non_adapters(tmp_path):
    lib = Library(tmp_path / "lib")
    (tmp_path / "x.safetensors").write_bytes(b"\x80\x04not safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        lib.add(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(2)}, tmp_path / "y.safetensors")
    with pytest.raises(UserError, match="holds no LoRA weights"):
        lib.add(tmp_path / "y.safetensors")
    assert lib.list() == []


def test_unreadable_files_are_reported_with_the_reason_and_kept(tmp_path):
    lib = Library(tmp_path / "lib")
    lib.add(make_adapter(tmp_path / "a.safetensors"), "good")
    broken = tmp_path / "lib" / "broken.safetensors"
    broken.write_bytes(b"\x80\x04a pickle, not safetensors")
    assert [e.name for e in lib.list()] == ["good"]
    [(path, reason)] = lib.problems()
    assert path == broken and reason.startswith("not a readable safetensors file (")
    assert "header" in reason and reason.endswith("replace or delete it")
    assert broken.read_bytes() == b"\x80\x04a pickle, not safetensors"
    broken.unlink()
    assert lib.problems() == []


def test_missing_names_are_clear_errors(tmp_path):
    lib = Library(tmp_path / "lib")
    for call in (lambda: lib.get("nope"), lambda: lib.delete("nope"), lambda: lib.rename("nope", "x")):
        with pytest.raises(UserError, match="no adapter named 'nope'"):
            call()
