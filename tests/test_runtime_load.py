"""Cold adapter loads (`Studio.load` places each LoRA layer by its path instead of peft's walk over every module):
what is drawn is exactly what peft's own `add_adapter` path and diffusers' `load_lora_weights` draw from the same
files, and loading more adapters leaves the earlier ones' pictures as they were. "Exactly": equal float pictures."""

import numpy as np
import pytest
import torch
from peft.utils import get_peft_model_state_dict

from adapters import lora as lora_module
from adapters import runtime
from adapters.base import load_pipeline
from adapters.formats import save_adapter, to_kohya
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio


def random_lora(pipe, seed, attention="both", rank=4, alpha=2.0, text_encoder=False) -> dict[str, LoraModule]:
    """Random LoRA on the UNet's attention projections (and every CLIP layer's projections and MLP)."""
    gen = torch.Generator().manual_seed(seed)
    paths = [("unet", p) for p in attention_targets(pipe.unet, attention)]
    if text_encoder:
        encoder = pipe.text_encoder.named_modules()
        paths += [
            ("text_encoder", n)
            for n, _ in encoder
            if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"))
        ]
    out = {}
    for component, path in paths:
        layer = getattr(pipe, component).get_submodule(path)
        out[f"{component}.{path}"] = LoraModule(
            down=torch.randn(rank, layer.in_features, generator=gen) * 0.3,
            up=torch.randn(layer.out_features, rank, generator=gen) * 0.3,
            alpha=alpha,
        )
    return out


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """Three adapter files as the app writes them (kohya layout): a on attn1 + attn2 and the text encoder; b on
    attn1 only at rank 2; c on attn1 + attn2 at rank 8, another alpha."""
    folder = tmp_path_factory.mktemp("adapters")
    pipe = load_pipeline(str(tiny_model), device="cpu")
    loras = {
        "a": random_lora(pipe, 1, text_encoder=True),
        "b": random_lora(pipe, 2, attention="self", rank=2, alpha=1.0),
        "c": random_lora(pipe, 3, rank=8, alpha=6.0),
    }
    for name, lora in loras.items():
        save_adapter(folder / f"{name}.safetensors", to_kohya(lora), {})
    return folder


def draw(pipe):
    generator = torch.Generator().manual_seed(5)
    return pipe("a red circle", num_inference_steps=3, generator=generator, output_type="np").images


def loaded(model, files, names):
    # peft's own LoRA layers at draw time, so the pictures compare the load path alone (the merged and packed
    # forwards are checked against these layers in test_generate.py, to a tolerance: merging rounds differently)
    studio = Studio(str(model), device="cpu", lora_forward="peft")
    for name in names:
        studio.load(files / f"{name}.safetensors")
    return studio


def test_loaded_adapters_draw_what_peft_add_adapter_and_diffusers_draw(tiny_model, files, monkeypatch):
    fast = loaded(tiny_model, files, "abc")
    pictures = {}
    for strengths in ({"a": 1.0}, {"a": 0.5, "b": 1.0, "c": 0.7}):
        fast.set_strengths(strengths)
        pictures[str(strengths)] = draw(fast.pipe)
    saved = {c: get_peft_model_state_dict(getattr(fast.pipe, c), adapter_name="a") for c in ("unet", "text_encoder")}

    # the same files through peft's add_adapter + set_peft_model_state_dict, as every adapter was attached before
    monkeypatch.setattr(runtime, "install", lora_module._install_through_peft)
    slow = loaded(tiny_model, files, "abc")
    for strengths in ({"a": 1.0}, {"a": 0.5, "b": 1.0, "c": 0.7}):
        slow.set_strengths(strengths)
        assert np.array_equal(draw(slow.pipe), pictures[str(strengths)]), strengths
    for component, state in saved.items():  # what peft (and so diffusers' save_lora_weights) reads back out
        theirs = get_peft_model_state_dict(getattr(slow.pipe, component), adapter_name="a")
        assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in state)
    # the same peft config, but for peft's shortening of a long target list to the names' common endings
    ours, peft_s = (studio.pipe.unet.peft_config["c"].to_dict() for studio in (fast, slow))
    assert ours.pop("target_modules") == set(attention_targets(fast.pipe.unet, "both"))
    assert peft_s.pop("target_modules") == {"to_q", "to_k", "to_v", "to_out.0"} and ours == peft_s

    theirs = load_pipeline(str(tiny_model), device="cpu")
    theirs.load_lora_weights(str(files), weight_name="a.safetensors", adapter_name="a")
    assert np.array_equal(draw(theirs), pictures[str({"a": 1.0})])


def alone(model, files, name):
    """Adapter `name`'s picture at strength 1 from a fresh runtime that loaded only it."""
    studio = loaded(model, files, name)
    studio.set_strengths({name: 1.0})
    return draw(studio.pipe)


def test_loading_more_adapters_leaves_the_first_ones_pictures_alone(tiny_model, files):
    studio = loaded(tiny_model, files, "a")
    studio.set_strengths({"a": 1.0})
    first = draw(studio.pipe)
    studio.set_strengths({})
    base = draw(studio.pipe)
    assert not np.array_equal(first, base)
    studio.load(files / "b.safetensors")  # a second adapter into the layers a wrapped, on fewer of them
    studio.load(files / "c.safetensors")  # a third, of another rank and alpha
    for strengths, picture in (({"a": 1.0}, first), ({}, base), ({"c": 1.0}, alone(tiny_model, files, "c"))):
        studio.set_strengths(strengths)
        assert np.array_equal(draw(studio.pipe), picture), strengths
    studio.unload("a")  # its layers stay wrapped, holding b and c; loading it again goes into them
    studio.load(files / "a.safetensors")
    studio.set_strengths({"a": 1.0})
    assert np.array_equal(draw(studio.pipe), first)


def test_a_load_leaves_models_other_threads_build_meanwhile_alone(tiny_model, files, monkeypatch):
    """The page loads adapters in one thread while another may be loading a model (a base model for Generate, the
    VAE for the data check): the LoRA weights a load makes on the meta device are made so for its own thread only."""
    import threading

    made = []
    real = lora_module.dispatch_default

    def meanwhile(*args, **kwargs):  # another thread builds a layer while this load is placing its LoRA layers
        if not made:
            other = threading.Thread(target=lambda: made.append(torch.nn.Linear(4, 4).weight.device))
            other.start()
            other.join()
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_module, "dispatch_default", meanwhile)
    loaded(tiny_model, files, "c")
    assert made == [torch.device("cpu")]
