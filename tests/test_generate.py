"""Generation: strengths change the picture without reloading, and strength 0 is exactly the base model."""

import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapters.errors import UserError
from adapters.lora import LoraModule, attention_targets
from adapters.runtime import Studio, parse_adapter_arg


def random_lora(unet, scale=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for path in attention_targets(unet, "both"):
        layer = unet.get_submodule(path)
        out[f"unet.{path}"] = LoraModule(
            down=torch.randn(4, layer.in_features, generator=gen) * scale,
            up=torch.randn(layer.out_features, 4, generator=gen) * scale,
            alpha=4.0,
        )
    return out


def render(studio, scales, seed=3):
    studio.set_strengths(scales)
    return studio.pipe(
        "a red circle", num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="np"
    ).images


def test_strength_zero_is_the_base_model_exactly(tiny_model):
    base = render(Studio(str(tiny_model), device="cpu"), {})
    studio = Studio(str(tiny_model), device="cpu")
    studio.add(random_lora(studio.pipe.unet), "style")
    assert np.array_equal(render(studio, {"style": 0.0}), base)
    assert np.abs(render(studio, {"style": 1.0}) - base).max() > 1e-2
    assert np.array_equal(render(studio, {}), base)  # no adapter selected: the base model again


def test_strength_changes_do_not_reload(tiny_model):
    studio = Studio(str(tiny_model), device="cpu")
    studio.add(random_lora(studio.pipe.unet), "a")
    studio.add(random_lora(studio.pipe.unet, seed=1), "b")
    unet_id, weight_id = id(studio.pipe.unet), studio.pipe.unet.conv_in.weight.data_ptr()
    first = render(studio, {"a": 1.0})
    render(studio, {"a": 0.2, "b": 0.7})
    assert np.array_equal(render(studio, {"a": 1.0}), first)
    assert id(studio.pipe.unet) == unet_id and studio.pipe.unet.conv_in.weight.data_ptr() == weight_id


def test_a_strength_changed_in_place_draws_what_a_fresh_setting_draws(tiny_model):
    """With the same adapters active, a new strength only overwrites each layer's scale in place; the picture
    must be the one a studio set to that strength from the start draws."""
    studio, fresh = Studio(str(tiny_model), device="cpu"), Studio(str(tiny_model), device="cpu")
    for s in (studio, fresh):
        s.add(random_lora(s.pipe.unet), "a")
        s.add(random_lora(s.pipe.unet, seed=1), "b")
    render(studio, {"a": 0.3, "b": -0.5})
    changed = render(studio, {"a": 0.8, "b": 0.4})  # same adapters: the in-place path
    assert np.abs(changed - render(fresh, {"a": 0.8, "b": 0.4})).max() < 1e-6
    assert np.abs(changed - render(fresh, {"a": 0.3, "b": -0.5})).max() > 1e-3


@pytest.mark.parametrize("mode", ["merged", "packed"])
def test_merged_and_packed_lora_layers_draw_what_peft_layers_draw(tiny_model, mode):
    """Generation runs each LoRA Linear from a merged copy of its weight (`MergedLinear`) or packed (every active
    adapter in two products, `PackedLinear`); the pictures are peft's own, adapter by adapter, up to rounding: one
    adapter, two of different ranks, the text encoder's, a strength changed in place, a switch back to one, then
    none (the base model exactly: the base weights are never touched)."""
    from adapters.runtime import MergedLinear, PackedLinear

    ours, plain = Studio(str(tiny_model), device="cpu", lora_forward=mode), Studio(str(tiny_model), device="cpu")
    plain.use_lora_forward("peft")
    for studio in (ours, plain):
        studio.add(random_lora(studio.pipe.unet, scale=0.1), "a")
        other = random_lora(studio.pipe.unet, 0.1, seed=1)
        small = {k: LoraModule(m.down[:2], m.up[:, :2], 1.0) for k, m in other.items()}
        encoder = studio.pipe.text_encoder
        gen = torch.Generator().manual_seed(2)
        for path, layer in encoder.named_modules():
            if path.endswith(("q_proj", "v_proj", "fc1")):
                small[f"text_encoder.{path}"] = LoraModule(
                    torch.randn(2, layer.in_features, generator=gen) * 0.1,
                    torch.randn(layer.out_features, 2, generator=gen) * 0.1,
                    1.0,
                )
        studio.add(small, "b")
    base = render(plain, {})
    for strengths in ({"a": 1.0}, {"a": 0.6, "b": -0.8}, {"a": 1.3, "b": 0.5}, {"b": 1.0}, {}):
        mine, theirs = render(ours, strengths), render(plain, strengths)
        assert np.abs(mine - theirs).max() < 1e-4, strengths
        assert strengths == {} or np.abs(mine - base).max() > 1e-2, strengths
        assert ours.lora_forward_now == (mode if strengths else None)
        assert plain.lora_forward_now == ("peft" if strengths else None)
    assert np.array_equal(render(ours, {}), base)
    ours.set_strengths({"a": 0.5, "b": 0.5})
    runs = [m for c in ("unet", "text_encoder") for m in getattr(ours.pipe, c).modules() if "forward" in m.__dict__]
    expected = len(attention_targets(ours.pipe.unet, "both")) + len(small) - len(random_lora(ours.pipe.unet))
    kind = MergedLinear if mode == "merged" else PackedLinear
    assert len(runs) == expected and all(isinstance(m.forward, kind) for m in runs)
    ours.set_strengths({})
    assert not [m for m in ours.pipe.unet.modules() if "forward" in m.__dict__]  # peft's forward back


def test_channels_last_weights_draw_what_the_default_layout_draws(tiny_model):
    """The layout CUDA generation uses (UNet and VAE channels-last) draws the default layout's picture."""
    plain, last = Studio(str(tiny_model), device="cpu"), Studio(str(tiny_model), device="cpu", channels_last=True)
    conv = last.pipe.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for studio in (plain, last):
        studio.add(random_lora(studio.pipe.unet, scale=0.1), "a")
    assert np.abs(render(plain, {"a": 0.8}) - render(last, {"a": 0.8})).max() < 1e-4


def compiled_parts(graphs) -> set[str]:
    """Which parts of the pipeline the graphs dynamo handed a backend come from, by their inputs' names: the UNet
    (its time embedding) or the VAE's decoder (the rest: a decoder has no time embedding)."""
    names = [[n.target for n in gm.graph.nodes if n.op == "placeholder"] for gm in graphs]
    return {"unet" if any("time_embedding" in n for n in inputs) else "vae decoder" for inputs in names}


def test_a_compiled_unet_draws_the_plain_pictures_and_a_change_of_strengths_or_adapters_compiles_nothing(
    tiny_model, tmp_path, monkeypatch, caplog
):
    """`compile_unet=True`: the UNet's denoising call and the VAE's decoder go through torch.compile and draw the
    uncompiled pictures; a strength change is read in place (nothing compiled again); what is compiled is kept in
    the user's cache folder unless TORCHINDUCTOR_CACHE_DIR names another; a running studio turns it on and off
    without a reload; a backend that fails leaves generation uncompiled, with a warning. The backend here only
    counts the graphs it is given (inductor is what users get)."""
    from adapters import runtime

    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", counting)
    caplog.set_level(logging.WARNING, logger="torch.__trace")  # pytest's capture would take dynamo's trace log
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch._dynamo.reset()
    ours, plain = Studio(str(tiny_model), device="cpu", compile_unet=True), Studio(str(tiny_model), device="cpu")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "lora-studio" / "torchinductor")
    for studio in (ours, plain):
        studio.add(random_lora(studio.pipe.unet, scale=0.1), "a")
        studio.add(random_lora(studio.pipe.unet, scale=0.1, seed=1), "b")
    assert np.abs(render(ours, {"a": 0.8}) - render(plain, {"a": 0.8})).max() < 1e-4
    compiled = len(graphs)
    assert compiled_parts(graphs) == {"unet", "vae decoder"}
    # other strengths and other sets of adapters reuse what was compiled
    for strengths in ({"a": 0.3}, {"a": -0.5}, {"a": 0.5, "b": 0.5}, {"b": 1.2}):
        assert np.abs(render(ours, strengths) - render(plain, strengths)).max() < 1e-4, strengths
    assert len(graphs) == compiled
    assert np.array_equal(render(ours, {}), render(plain, {}))  # the base model: compiled once more, then reused
    compiled = len(graphs)
    for strengths in ({"a": 1.0}, {}, {"a": 0.2, "b": 0.7}):
        assert np.abs(render(ours, strengths) - render(plain, strengths)).max() < 1e-4, strengths
    assert len(graphs) == compiled

    # turned on, off and on again in a running studio (the Generate tab's checkbox): nothing reloaded, nothing
    # compiled twice
    before = render(plain, {"a": 0.8})
    assert not plain.compile_unet
    plain.use_compile(True)
    assert plain.compile_unet
    assert np.abs(render(plain, {"a": 0.8}) - before).max() < 1e-4 and len(graphs) > compiled
    compiled = len(graphs)
    plain.use_compile(False)
    assert not plain.compile_unet and np.array_equal(render(plain, {"a": 0.8}), before)
    plain.use_compile(True)
    assert np.abs(render(plain, {"a": 0.8}) - before).max() < 1e-4 and len(graphs) == compiled
    plain.use_compile(False)

    def failing(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", failing)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    torch._dynamo.reset()
    broken = Studio(str(tiny_model), device="cpu", compile_unet=True)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    broken.add(random_lora(broken.pipe.unet, scale=0.1), "a")
    with pytest.warns(UserWarning, match="without torch.compile .BackendCompilerFailed.*no compiler here"):
        picture = render(broken, {"a": 0.8})
    assert np.abs(picture - render(plain, {"a": 0.8})).max() < 1e-4
    torch._dynamo.reset()


def test_a_background_compile_never_makes_a_picture_wait_and_later_pictures_run_compiled(
    tiny_model, monkeypatch, caplog
):
    """`background_compile=True`: the first picture is drawn uncompiled at once and the compile runs on a worker
    thread after it; once it is done, pictures run through the compiled code, the same pictures, and nothing is
    ever compiled on the drawing thread. New adapters make the compiled code stale: the next picture is drawn
    uncompiled and the worker compiles again. A failing compiler leaves pictures uncompiled, with a warning."""
    import threading

    from adapters import runtime

    compiles, compiled_runs = [], []

    def counting(gm, example_inputs):
        compiles.append(threading.current_thread() is threading.main_thread())

        def run(*args):
            compiled_runs.append(threading.current_thread() is threading.main_thread())
            return gm.forward(*args)

        return run

    def draw(studio, strengths):
        return np.asarray(studio.generate("a red circle", seed=3, sampling_steps=4, strengths=strengths)[0], float)

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", counting)
    caplog.set_level(logging.WARNING, logger="torch.__trace")
    torch._dynamo.reset()
    ours = Studio(str(tiny_model), device="cpu", compile_unet=True, background_compile=True)
    plain = Studio(str(tiny_model), device="cpu")
    for studio in (ours, plain):
        studio.add(random_lora(studio.pipe.unet, scale=0.1), "a")
    assert np.array_equal(draw(ours, {"a": 0.8}), draw(plain, {"a": 0.8}))
    assert True not in compiled_runs and ours.compiling  # drawn uncompiled; the compile starts after it
    assert ours.wait_for_compile(timeout=300) and not ours.compiling
    assert compiles and True not in compiles  # on the worker thread only
    for strengths in ({"a": 0.8}, {"a": 0.3}):  # a strength change is read in place: still compiled
        runs = len(compiled_runs)
        assert np.abs(draw(ours, strengths) - draw(plain, strengths)).max() <= 1, strengths
        assert compiled_runs[runs:].count(True) >= 2, strengths  # the UNet's steps and the decoder, compiled

    # another set of adapters: drawn uncompiled until the worker has compiled for it
    for studio in (ours, plain):
        studio.add(random_lora(studio.pipe.unet, scale=0.1, seed=1), "b")
    runs = len(compiled_runs)
    both = {"a": 0.5, "b": 0.5}
    assert np.array_equal(draw(ours, both), draw(plain, both))
    assert compiled_runs[runs:].count(True) == 1  # only the decoder (no adapter in it) ran compiled
    assert ours.wait_for_compile(timeout=300)
    runs = len(compiled_runs)
    assert np.abs(draw(ours, both) - draw(plain, both)).max() <= 1
    assert compiled_runs[runs:].count(True) >= 2 and True not in compiles

    def failing(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", failing)
    torch._dynamo.reset()
    broken = Studio(str(tiny_model), device="cpu", compile_unet=True, background_compile=True)
    broken.add(random_lora(broken.pipe.unet, scale=0.1), "a")
    with pytest.warns(UserWarning, match="without torch.compile .BackendCompilerFailed.*no compiler here"):
        assert np.array_equal(draw(broken, {"a": 0.8}), draw(plain, {"a": 0.8}))
        assert broken.wait_for_compile(timeout=300)
    assert "no compiler here" in broken.compile_failed
    assert np.array_equal(draw(broken, {"a": 0.8}), draw(plain, {"a": 0.8})) and not broken.compiling
    torch._dynamo.reset()


def test_a_picture_drawn_while_the_background_compile_traces_waits_for_the_trace(tiny_model, monkeypatch, caplog):
    """torch.fx's tracer (AOTAutograd's make_fx, in a compile from an empty cache) takes over every module call in
    the process while it runs. A picture asked for while the worker is inside such a trace waits for it to end and
    comes out right, instead of failing inside the tracer. Here the compiler traces a module that stays in its
    forward until the test lets it go. A compile that fails once (the module may have been changing under it) is
    tried again before compiling is given up."""
    import threading

    from adapters import runtime

    inside, release, tries = threading.Event(), threading.Event(), []

    class Held(torch.nn.Module):
        def forward(self, x):
            inside.set()
            assert release.wait(timeout=300)
            return x + 1

    def tracing(gm, example_inputs):
        tries.append(gm)
        if len(tries) == 1:
            raise RuntimeError("the first try fails")
        torch.fx.symbolic_trace(Held())
        return gm.forward

    def draw(studio):
        return np.asarray(studio.generate("a red circle", seed=3, sampling_steps=2, strengths={})[0], float)

    monkeypatch.setattr(runtime, "COMPILE_BACKEND", tracing)
    caplog.set_level(logging.WARNING, logger="torch.__trace")
    torch._dynamo.reset()
    ours = Studio(str(tiny_model), device="cpu", compile_unet=True, background_compile=True)
    plain = draw(Studio(str(tiny_model), device="cpu"))
    assert np.array_equal(draw(ours), plain)
    assert inside.wait(timeout=300)  # the worker is in the trace now, after a first try that failed
    second = []
    drawing = threading.Thread(target=lambda: second.append(draw(ours)))
    drawing.start()
    drawing.join(timeout=2)
    assert drawing.is_alive() and not second  # the picture waits for the trace
    release.set()
    drawing.join(timeout=300)
    assert np.array_equal(second[0], plain)
    assert ours.wait_for_compile(timeout=300) and not ours.compile_failed and len(tries) >= 2
    torch._dynamo.reset()


def test_automatic_lora_forward_merges_when_the_copies_fit_and_packs_when_they_do_not(tiny_model, monkeypatch):
    """ "auto" merges while a copy of the adapted layers' weights takes at most a quarter of the spare memory; with
    too little spare memory it packs, and draws the same picture."""
    import adapters.runtime as runtime

    studio = Studio(str(tiny_model), device="cpu")
    studio.add(random_lora(studio.pipe.unet, scale=0.1), "a")
    merged = render(studio, {"a": 0.7})
    assert studio.lora_forward_now == "merged" and studio._packs.merged_bytes > 0
    copies = studio._packs.merged_bytes
    monkeypatch.setattr(runtime, "spare_memory", lambda device: 4 * copies - 4)
    studio.use_lora_forward("auto")
    packed = render(studio, {"a": 0.7})
    assert studio.lora_forward_now == "packed"
    assert np.abs(merged - packed).max() < 1e-4
    with pytest.raises(UserError, match="lora_forward must be one of auto, merged, packed, peft, got 'fast'"):
        studio.use_lora_forward("fast")


def test_unknown_adapter_name_is_an_error(tiny_model):
    studio = Studio(str(tiny_model), device="cpu")
    with pytest.raises(UserError, match="not loaded"):
        studio.set_strengths({"nope": 1.0})


def test_generate_checks_size(tiny_model):
    """A size the pipeline cannot draw is named as such: diffusers takes multiples of 8 even where the VAE would
    take multiples of 4 (the tiny model's), so 100 is refused here, not by a diffusers traceback."""
    studio = Studio(str(tiny_model), device="cpu")
    assert studio.pipe.vae_scale_factor == 4
    for width in (30, 100):
        with pytest.raises(UserError, match=rf"width must be a positive multiple of 8, got {width}"):
            studio.generate("x", width=width)


def test_generate_refuses_a_side_far_above_the_models_own(tiny_model):
    """A side above 4x the model's native size is refused before any step (the built-in model's 64 px at 4096 ran
    for minutes): the tiny model's 32 px allow 128, and the message says the largest side."""
    studio = Studio(str(tiny_model), device="cpu")
    assert studio.native_size == 32
    for field in ("width", "height"):
        said = rf"^{field} 136 is more than 4x the model's native 32 px; .* repeat their subject .*; use at most 128$"
        with pytest.raises(UserError, match=said):
            studio.generate("x", sampling_steps=1, **{field: 136})
    assert studio.generate("x", sampling_steps=1, width=128)[0].size == (128, 32)


def test_adapter_argument_parsing():
    assert parse_adapter_arg("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert parse_adapter_arg("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_adapter_arg("C:/x/style.safetensors:-0.5") == ("C:/x/style.safetensors", -0.5)
    assert parse_adapter_arg("C:/x/style.safetensors") == ("C:/x/style.safetensors", 1.0)
    for typo in ("style.safetensors:abc", "style.safetensors:0,8"):  # named as a strength, not a missing file
        with pytest.raises(UserError, match=r"adapter strength '.*' in .* is not a number: give FILE:STRENGTH"):
            parse_adapter_arg(typo)
    for endless in ("nan", "inf"):  # a strength that would draw a black picture
        with pytest.raises(UserError, match="must be a finite number"):
            parse_adapter_arg(f"style.safetensors:{endless}")


def test_pickle_renamed_safetensors_is_refused_without_unpickling(tiny_model, tmp_path):
    import pickle

    marker = tmp_path / "executed"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps(Boom()))
    studio = Studio(str(tiny_model), device="cpu")
    with pytest.raises(UserError, match="evil.safetensors is not a valid safetensors file"):
        studio.load(bad)
    assert not marker.exists()


def test_nan_weights_are_refused(tiny_model, tmp_path):
    studio = Studio(str(tiny_model), device="cpu")
    name = "lora_unet_" + attention_targets(studio.pipe.unet, "both")[0].replace(".", "_")
    save_file(
        {f"{name}.lora_down.weight": torch.full((4, 32), float("nan")), f"{name}.lora_up.weight": torch.zeros(32, 4)},
        tmp_path / "nan.safetensors",
    )
    with pytest.raises(UserError, match="NaN or Inf"):
        studio.load(tmp_path / "nan.safetensors")


def test_a_batch_draws_each_picture_from_its_own_seed_and_a_stop_interrupts(tiny_model):
    """Picture k of a batch is the picture seed + k draws alone (A1111's rule: any picture can be made again from
    the seed it is saved with); `after_step` sees every step and stops the pictures when it says so."""
    from adapters.runtime import Interrupted

    studio = Studio(str(tiny_model), device="cpu")
    batch = studio.generate("a red circle", seed=7, sampling_steps=3, num_images=3)
    alone = [studio.generate("a red circle", seed=s, sampling_steps=3)[0] for s in (7, 8, 9)]
    assert [np.asarray(p).tolist() for p in batch] == [np.asarray(p).tolist() for p in alone]
    assert np.asarray(alone[0]).tolist() != np.asarray(alone[1]).tolist()
    seen = []
    with pytest.raises(Interrupted, match="stopped after step 2 of 5"):
        studio.generate(
            "a red circle", sampling_steps=5, after_step=lambda step, steps: seen.append(step) or step == 2
        )
    assert seen == [1, 2]  # the steps after it were skipped


def test_token_count_names_what_the_text_encoder_cuts(tiny_model):
    """The count is the text encoder's own (start and end marks left out), and past 75 the words cut are named."""
    studio = Studio(str(tiny_model), device="cpu")
    tokenizer = studio.pipe.tokenizer
    count, limit, cut = studio.count_tokens("a red circle")
    assert (count, limit, cut) == (len(tokenizer("a red circle").input_ids) - 2, 75, "")
    long = "a red circle, " * 40
    count, limit, cut = studio.count_tokens(long)
    assert count == len(tokenizer(long, truncation=False).input_ids) - 2 == 160 and limit == 75
    assert "a red circle" in cut
