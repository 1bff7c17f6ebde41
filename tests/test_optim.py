"""Optimisation options: each schedule, accumulation, clipping, each optimiser and each loss option does what it says,
and each one changes what a run trains (a setting that went nowhere would leave the adapter as the default's)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from adapters.errors import UserError
from adapters.families import SD1
from adapters.lora import attach, attention_targets, train_in_fp32
from trainer.config import TrainConfig
from trainer.loop import BatchDrawer, train
from trainer.optim import Loss, check_optimizer, diffusion_loss, make_lr_schedule, make_optimizer, min_snr_weights
from trainer.step import make_step

# -- learning-rate schedules ---------------------------------------------------------------------------------------

STEPS, WARMUP, LR = 10, 2, 1e-3


def _expected_factor(name: str, s: int) -> float:
    """The learning rate at step s as a share of --learning-rate, written out from each schedule's definition."""
    if name == "constant":
        return 1.0
    if s < WARMUP:
        return s / WARMUP
    if name == "constant_with_warmup":
        return 1.0
    done = (s - WARMUP) / (STEPS - WARMUP)
    if name == "linear":
        return 1 - done
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * done))
    if name == "cosine_with_restarts":  # two cycles: back to the full rate half-way
        return 0.5 * (1 + math.cos(math.pi * ((2 * done) % 1)))
    if name == "polynomial":  # power 2, down to 1e-7
        return (1e-7 + (LR - 1e-7) * (1 - done) ** 2) / LR
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
)
def test_each_lr_schedule_follows_its_curve(name):
    config = TrainConfig(
        steps=STEPS,
        learning_rate=LR,
        lr_scheduler=name,
        lr_warmup_steps=0 if name == "constant" else WARMUP,
        lr_scheduler_num_cycles=2,
        lr_scheduler_power=2.0,
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedule = make_lr_schedule(optimizer, config)
    got = []
    for _ in range(STEPS):
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert got == pytest.approx([LR * _expected_factor(name, s) for s in range(STEPS)], rel=1e-6, abs=1e-12)


def test_a_resumed_schedule_is_where_the_uninterrupted_one_was():
    config = TrainConfig(steps=STEPS, learning_rate=LR, lr_scheduler="cosine", lr_warmup_steps=WARMUP)
    for start in (1, 5, 9):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
        make_lr_schedule(optimizer, config, start_step=start)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(LR * _expected_factor("cosine", start), rel=1e-9)


# -- one step: accumulation and clipping ------------------------------------------------------------------------


@pytest.fixture
def tiny_unet():
    from tests.conftest import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    attach(unet, attention_targets(unet, "both"), 4, 4)
    params = train_in_fp32(unet)
    with torch.no_grad():  # LoRA B starts at zero; give it weights so that every LoRA tensor has a gradient
        for p in params:
            p.normal_(0, 0.05)
    from diffusers import DDPMScheduler

    return unet, params, DDPMScheduler.from_config(pipe.scheduler.config)


def _batch(n: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(n, 4, 8, 8, generator=gen),
        "noise": torch.randn(n, 4, 8, 8, generator=gen),
        "timesteps": torch.randint(0, 1000, (n,), generator=gen),
        "cond": {"text_embeds": torch.randn(n, 7, 32, generator=gen)},
    }


def _joined(a: dict, b: dict) -> dict:
    return {
        **{k: torch.cat([a[k], b[k]]) for k in ("latents", "noise", "timesteps")},
        "cond": {k: torch.cat([a["cond"][k], b["cond"][k]]) for k in a["cond"]},
    }


def _one_step(unet, params, scheduler, batches, max_grad_norm=0.0, lr=1.0) -> list[torch.Tensor]:
    """LoRA weights after one plain-SGD step on `batches` (the update is the gradient itself), then put back."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    start = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=lr)
    step = make_step(
        unet,
        optimizer,
        accelerator=Accelerator(cpu=True),
        noise_scheduler=scheduler,
        family=SD1,
        dtype=torch.float32,
        max_grad_norm=max_grad_norm,
    )
    step(*batches)
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, start):
            p.copy_(s)
    return [a - s for a, s in zip(after, start)]


def _norm(tensors) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors)))


def test_accumulating_two_batches_is_one_step_on_both(tiny_unet):
    """Two batches of 2 accumulated give the update of one batch of 4 (the mean loss over the same 4 examples)."""
    unet, params, scheduler = tiny_unet
    a, b = _batch(2, 1), _batch(2, 2)
    accumulated = _one_step(unet, params, scheduler, [a, b])
    together = _one_step(unet, params, scheduler, [_joined(a, b)])
    only_last = _one_step(unet, params, scheduler, [b])
    assert _norm(together) > 0
    assert _norm([x - y for x, y in zip(accumulated, together)]) < 1e-5 * _norm(together)
    assert _norm([x - y for x, y in zip(only_last, together)]) > 0.1 * _norm(together)


def test_max_grad_norm_clips_the_gradient(tiny_unet):
    unet, params, scheduler = tiny_unet
    batch = _batch(2, 3)
    free = _norm(_one_step(unet, params, scheduler, [batch]))
    clipped = _one_step(unet, params, scheduler, [batch], max_grad_norm=free / 10)
    assert _norm(clipped) == pytest.approx(free / 10, rel=1e-3)  # SGD at lr 1: the update is the gradient
    assert _norm(_one_step(unet, params, scheduler, [batch], max_grad_norm=free * 10)) == pytest.approx(free)


# -- the loss ----------------------------------------------------------------------------------------------------


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)


TIMESTEPS = torch.tensor([10, 300, 600, 990])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights_each_image_by_its_timestep(prediction_type):
    """min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR + 1) for v, SNR = abar / (1 - abar) written out."""
    scheduler, gamma = _scheduler(prediction_type), 5.0
    abar = scheduler.alphas_cumprod[TIMESTEPS].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64)) / (
        snr if prediction_type == "epsilon" else snr + 1
    )
    weights = min_snr_weights(scheduler, TIMESTEPS, gamma)
    assert torch.allclose(weights.double(), expected, rtol=1e-5)
    assert weights.min() < 0.5  # the low-noise timestep counts less: the weighting does something here

    # each image's error is a constant e_i: the loss is the weighted mean of e_i^2
    errors = torch.tensor([0.5, 1.0, 1.5, 2.0])
    prediction = errors.view(4, 1, 1, 1).expand(4, 4, 8, 8)
    loss = diffusion_loss(prediction, torch.zeros(4, 4, 8, 8), TIMESTEPS, scheduler, Loss(min_snr_gamma=gamma))
    assert loss.item() == pytest.approx(float((errors.double() ** 2 * expected).mean()), rel=1e-5)
    plain = diffusion_loss(prediction, torch.zeros(4, 4, 8, 8), TIMESTEPS, scheduler)
    assert plain.item() == pytest.approx(float((errors**2).mean()), rel=1e-6)


def test_huber_loss_is_kohyas_pseudo_huber():
    """2c(sqrt(e^2 + c^2) - c): about e^2 for small errors, about 2c|e| for large ones (an outlier pulls less)."""
    c = 0.1
    huber = Loss(kind="huber", huber_c=c)
    for e in (0.003, 0.5, 20.0):
        prediction, target = torch.full((2, 4, 8, 8), e), torch.zeros(2, 4, 8, 8)
        loss = diffusion_loss(prediction, target, TIMESTEPS[:2], _scheduler("epsilon"), huber).item()
        assert loss == pytest.approx(2 * c * (math.sqrt(e * e + c * c) - c), rel=1e-5)
    assert loss < 0.02 * e * e  # the large error costs ~2c|e| = 4, not e^2 = 400


def test_noise_offset_adds_a_constant_per_image_and_channel():
    """The same draws as without it, plus noise_offset x N(0, 1) per (image, channel), flat over the picture."""
    plain = BatchDrawer(8, 64, 1000, (4, 8, 8), seed=5)
    offset = BatchDrawer(8, 64, 1000, (4, 8, 8), seed=5, noise_offset=0.1)
    a, b = plain.draw(), offset.draw()
    for key in ("index", "latent_noise", "timesteps", "drop_caption"):
        assert torch.equal(a[key], b[key])
    shift = b["noise"] - a["noise"]
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    assert float(shift[:, :, 0, 0].std()) == pytest.approx(0.1, rel=0.2)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_input_perturbation_noises_the_unets_input_and_not_its_target(prediction_type):
    """The same draws as without it, plus the noise the input is noised with: the training noise plus
    input_perturbation x N(0, 1); the UNet sees the latents noised with that, and is still scored against the
    target of the training noise (a UNet answering that target exactly has no loss)."""
    from trainer.step import batch_loss, training_target

    plain = BatchDrawer(8, 64, 1000, (4, 8, 8), seed=5, noise_offset=0.05)
    perturbed = BatchDrawer(8, 64, 1000, (4, 8, 8), seed=5, noise_offset=0.05, input_perturbation=0.1)
    a, b = plain.draw(), perturbed.draw()
    assert set(b) == set(a) | {"input_noise"} and all(torch.equal(a[k], b[k]) for k in a)
    assert float((b["input_noise"] - b["noise"]).std()) == pytest.approx(0.1, rel=0.05)
    scheduler = _scheduler(prediction_type)
    timesteps = b["timesteps"][:4]
    batch = {
        "latents": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)),
        "noise": b["noise"][:4],
        "input_noise": b["input_noise"][:4],
        "timesteps": timesteps,
        "cond": {"text_embeds": torch.zeros(4, 2, 3)},
    }
    seen = []

    class Oracle(torch.nn.Module):  # answers the training noise's target, and keeps what it was shown
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, noisy, *args, **kwargs):
            from types import SimpleNamespace

            seen.append(noisy)
            return SimpleNamespace(sample=training_target(scheduler, batch))

    assert batch_loss(Oracle(), batch, scheduler, SD1).item() < 1e-10
    assert torch.equal(seen[0], scheduler.add_noise(batch["latents"], batch["input_noise"], timesteps))
    assert not torch.allclose(seen[0], scheduler.add_noise(batch["latents"], batch["noise"], timesteps))


# -- optimisers --------------------------------------------------------------------------------------------------


def test_missing_optimiser_packages_and_devices_are_named(monkeypatch):
    with pytest.raises(UserError, match=r"adamw8bit needs a CUDA GPU .*this run is on cpu: use --optimizer adamw"):
        check_optimizer(TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    import trainer.optim

    monkeypatch.setattr(trainer.optim.importlib.util, "find_spec", lambda name: None)  # as where none is installed
    with pytest.raises(UserError, match=r"needs the bitsandbytes package, which is not installed: pip install"):
        check_optimizer(TrainConfig(optimizer="adamw8bit"), torch.device("cuda"))
    with pytest.raises(UserError, match=r"prodigy needs the prodigyopt package.*pip install prodigyopt"):
        check_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0), torch.device("cpu"))


def test_an_8bit_run_on_the_cpu_is_refused_before_anything_loads(tiny_model, image_folder, tmp_path):
    config = TrainConfig(
        base_model=str(tiny_model), data=str(image_folder), optimizer="adamw8bit", run_dir=str(tmp_path / "run")
    )
    with pytest.raises(UserError, match="adamw8bit needs a CUDA GPU"):
        train(config, device="cpu", log_to_terminal=False)
    assert not (tmp_path / "run").exists()


def test_prodigy_estimates_its_own_step_size():
    """From its tiny starting estimate d0, Prodigy raises d as it goes: the step size is found, not given; its
    --prodigy-d-coef scales what it finds, and the betas reach it."""

    def run(**knobs):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(16, 16))
        optimizer = make_optimizer([weight], TrainConfig(optimizer="prodigy", learning_rate=1.0, **knobs))
        first = (weight - 3).pow(2).mean().item()
        for _ in range(150):
            (weight - 3).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return optimizer.param_groups[0], first, (weight - 3).pow(2).mean().item()

    group, first, last = run()
    assert group["d"] > 1e4 * group["d0"]  # measured: 1e-6 -> 0.41
    assert last < 0.01 * first
    gentle, _, _ = run(prodigy_d_coef=0.25, adam_beta2=0.99)
    assert (gentle["d_coef"], gentle["betas"]) == (0.25, (0.9, 0.99))
    assert gentle["d"] < 0.8 * group["d"]  # measured: 0.30 against 0.41


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
def test_adamw_runs_torchs_fused_kernels_on_a_cuda_gpu():
    weight = torch.nn.Parameter(torch.zeros(4, device="cuda"))
    assert make_optimizer([weight], TrainConfig()).defaults["fused"] is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
def test_the_cuda_graph_step_accumulates_what_the_eager_step_accumulates(tiny_unet):
    """A graph hands out its gradients in buffers the next replay overwrites; accumulated, it must still add up."""
    from trainer.step import compare_with_eager

    unet, params, scheduler = tiny_unet
    unet.cuda()
    batches = [
        {k: (v.cuda() if k != "cond" else {c: t.cuda() for c, t in v.items()}) for k, v in _batch(2, s).items()}
        for s in range(8)
    ]
    result = compare_with_eager(
        unet, params, batches, family=SD1, noise_scheduler=scheduler, dtype=torch.float32, lr=1e-3, accumulation=2
    )
    print(result)
    assert result["fast_kind"] == "cuda graph" and result["moved"] > 1e-3
    assert result["fast_vs_eager"] <= max(2 * result["eager_vs_eager"], 1e-2 * result["moved"])


# -- each option reaches the run -----------------------------------------------------------------------------------

OPTIONS = {
    "cosine schedule with warm-up": dict(lr_scheduler="cosine", lr_warmup_steps=1),
    "gradient accumulation": dict(gradient_accumulation_steps=2),
    "max grad norm": dict(max_grad_norm=1e-4),
    "weight decay": dict(weight_decay=0.5),
    "adam betas": dict(adam_beta1=0.5, adam_beta2=0.9),
    "adam epsilon": dict(adam_epsilon=1e-2),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0),
    "huber loss": dict(loss="huber"),
    "huber c": dict(loss="huber", huber_c=0.5),
    "min-SNR-gamma": dict(min_snr_gamma=1.0),
    "noise offset": dict(noise_offset=0.1),
    "input perturbation": dict(input_perturbation=0.1),
}
BASELINE = {"huber c": "huber loss"}  # a knob of another option: against that option


@pytest.fixture(scope="module")
def default_adapter(tiny_model, tmp_path_factory):
    from tests.conftest import write_scene_folder

    root = tmp_path_factory.mktemp("options")
    data = write_scene_folder(root / "data")
    config = TrainConfig(base_model=str(tiny_model), data=str(data), steps=3, seed=2, run_dir=str(root / "default"))
    return data, load_file(train(config, device="cpu", log_to_terminal=False).adapter)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_changes_what_a_run_trains(option, tiny_model, default_adapter, tmp_path):
    data, default = default_adapter
    common = dict(base_model=str(tiny_model), data=str(data), steps=3, seed=2)
    if option in BASELINE:
        baseline = TrainConfig(**common, run_dir=str(tmp_path / "baseline"), **OPTIONS[BASELINE[option]])
        default = load_file(train(baseline, device="cpu", log_to_terminal=False).adapter)
    config = TrainConfig(**common, run_dir=str(tmp_path / "run"), **OPTIONS[option])
    trained = load_file(train(config, device="cpu", log_to_terminal=False).adapter)
    assert trained.keys() == default.keys()
    assert any(not torch.equal(trained[k], default[k]) for k in trained), f"{option} left the adapter unchanged"


def test_under_autocast_the_step_skips_peft_input_casts_and_trains_the_same_adapter():
    """With a bf16 base under autocast, the step runs each plain LoRA layer without peft's cast of its input to
    fp32 (which autocast casts straight back): the adapter is the same to the bit, with fewer copies in each step.
    DoRA and dropout layers keep the cast; so does fp32, where no autocast casts back."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers import DDPMScheduler
    from torch.profiler import profile

    from tests.conftest import build_tiny_pipeline
    from trainer.step import uncast_lora_layers

    pipe = build_tiny_pipeline()
    unet = pipe.unet.to(torch.bfloat16).requires_grad_(False)
    torch.manual_seed(0)
    attach(unet, attention_targets(unet, "both"), 4, 4, conv=["down_blocks.0.resnets.0.conv1"], conv_rank=4,
           conv_alpha=4)  # fmt: skip
    params = train_in_fp32(unet)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    start = [p.detach().clone() for p in params]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    batches = [_batch(2, seed) for seed in range(3)]

    def train(skip_casts: bool) -> tuple[list[torch.Tensor], int, int]:
        AcceleratorState._reset_state()
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        step = make_step(
            unet,
            torch.optim.AdamW(params, lr=1e-3),
            accelerator=Accelerator(cpu=True, mixed_precision="bf16"),
            noise_scheduler=scheduler,
            family=SD1,
            dtype=torch.bfloat16,
        )
        skipped = len(step.uncast)
        if not skip_casts:
            step.uncast = []  # peft's own way
        with profile() as prof:
            step(batches[0])
        copies = sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy")
        for batch in batches[1:]:
            step(batch)
        return [p.detach().clone() for p in params], copies, skipped

    fast, fast_copies, layers = train(True)
    peft_way, peft_copies, _ = train(False)
    from peft.tuners.lora import LoraLayer

    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    assert layers == len(lora_layers) and any(isinstance(m.base_layer, torch.nn.Conv2d) for m in lora_layers)
    assert all(torch.equal(a, b) for a, b in zip(fast, peft_way))
    assert max(float((a - s).abs().max()) for a, s in zip(fast, start)) > 1e-4  # it trained
    print(json.dumps({"layers": layers, "to_copy_per_step": {"skipped": fast_copies, "peft": peft_copies}}))
    assert fast_copies <= peft_copies - 2 * layers  # at least the two casts of each layer's forward
    assert uncast_lora_layers(unet, torch.float32) == []

    # where no autocast runs (accelerate has none for fp16 on the CPU), peft's casts stay: the step still trains
    AcceleratorState._reset_state()
    half = build_tiny_pipeline().unet.to(torch.float16).requires_grad_(False)
    attach(half, attention_targets(half, "both"), 4, 4)
    half_params = train_in_fp32(half)
    step = make_step(half, torch.optim.SGD(half_params, lr=1.0), accelerator=Accelerator(cpu=True,
                     mixed_precision="fp16"), noise_scheduler=scheduler, family=SD1, dtype=torch.float16)  # fmt: skip
    assert step.uncast and not torch.is_autocast_enabled("cpu")
    step(batches[0])
    assert all(layer.cast_input_dtype_enabled for layer in step.uncast)  # and every layer casts again after it

    dora = build_tiny_pipeline().unet.to(torch.bfloat16)
    attach(dora, attention_targets(dora, "both"), 4, 4, use_dora=True)
    dropped = build_tiny_pipeline().unet.to(torch.bfloat16)
    attach(dropped, attention_targets(dropped, "both"), 4, 4, dropout=0.1)
    assert uncast_lora_layers(dora, torch.bfloat16) == [] and uncast_lora_layers(dropped, torch.bfloat16) == []
