"""TrainConfig: one place for every knob, with errors that name the field and the fix."""

import argparse
import json

import pytest

from adapters.errors import UserError
from trainer.config import TrainConfig, add_arguments, from_args


def parse(argv, config=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return from_args(args, args.config)


def test_flags_are_kebab_case_field_names():
    cfg = parse(
        [
            "--base-model",
            "builtin",
            "--data",
            "d",
            "--output",
            "o.safetensors",
            "--resolution",
            "64",
            "--batch-size",
            "3",
            "--steps",
            "7",
            "--learning-rate",
            "2e-4",
            "--rank",
            "4",
            "--alpha",
            "2",
            "--attention",
            "cross",
            "--seed",
            "5",
            "--mixed-precision",
            "bf16",
            "--trigger-word",
            "tw",
            "--default-caption",
            "a thing",
        ]
    )
    assert (cfg.resolution, cfg.batch_size, cfg.steps, cfg.rank, cfg.alpha) == (64, 3, 7, 4, 2.0)
    assert (cfg.learning_rate, cfg.attention, cfg.seed, cfg.mixed_precision) == (2e-4, "cross", 5, "bf16")
    assert (cfg.trigger_word, cfg.default_caption, cfg.output) == ("tw", "a thing", "o.safetensors")


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: imgs\nsteps: 50\nrank: 16\n")
    cfg = parse(["--config", str(path), "--steps", "9"])
    assert (cfg.data, cfg.steps, cfg.rank) == ("imgs", 9, 16)


def test_config_files_as_editors_save_them_are_read(tmp_path):
    """YAML's 1e-4 (read as text by YAML 1.1) is a number; UTF-8 with a byte-order mark and UTF-16 (Windows
    Notepad) are read; other bytes, and a folder given as the file, are named with what to do."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("data: imgs\nlearning_rate: 1e-4\nweight_decay: 1e-2\nsteps: 10\n")
    cfg = parse(["--config", str(yaml_file)])
    assert (cfg.learning_rate, cfg.weight_decay, cfg.steps) == (1e-4, 1e-2, 10)
    text = json.dumps({"data": "imgs", "rank": 4})
    for name, raw in (("bom.json", "\ufeff".encode() + text.encode()), ("u16.json", text.encode("utf-16"))):
        (tmp_path / name).write_bytes(raw)
        assert parse(["--config", str(tmp_path / name)]).rank == 4
    (tmp_path / "latin.yaml").write_bytes("data: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"config file .*latin.yaml is not UTF-8 text .*save it as UTF-8"):
        parse(["--config", str(tmp_path / "latin.yaml")])
    with pytest.raises(UserError, match=r"config file .* is a folder; give the .json or .yaml file in it"):
        parse(["--config", str(tmp_path)])
    yaml_file.write_text("data: imgs\nlearning_rate: fast\n")
    with pytest.raises(UserError, match=r"learning_rate \(--learning-rate\) must be a number, got 'fast'"):
        parse(["--config", str(yaml_file)])


def test_json_config_round_trips(tmp_path):
    cfg = TrainConfig(data="x", steps=3, rank=2, alpha=1.0)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.from_file(tmp_path / "c.json") == cfg


def test_unknown_key_in_file_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data": "x", "learning_rte": 1e-4}))
    with pytest.raises(UserError, match=r"learning_rte.*did you mean 'learning_rate'"):
        TrainConfig.from_file(path)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("rank", 0, r"rank \(--rank\) must be at least 1"),
        ("learning_rate", -1e-4, r"learning_rate \(--learning-rate\) must be a positive number"),
        ("steps", 0, r"steps \(--steps\) must be at least 1"),
        ("batch_size", 0, r"batch_size \(--batch-size\) must be at least 1"),
        ("resolution", 50, r"resolution \(--resolution\) must be 0 \(native\) or a multiple of 8"),
        ("attention", "all", r"attention \(--attention\) must be one of self, cross, both"),
        ("mixed_precision", "fp8", r"mixed_precision \(--mixed-precision\) must be one of"),
        ("steps", "200", r"steps \(--steps\) must be a whole number"),
        ("steps", 2.5, r"steps \(--steps\) must be a whole number, got 2.5"),
        ("steps", 10**12, r"steps \(--steps\) must be at least 1 and at most 1000000; got 1000000000000"),
        ("name", "..", r"name \(--name\): adapter name '..' has no usable characters"),
        ("output", "x.ckpt", r"output \(--output\) must end in .safetensors"),
        ("optimizer", "adam", r"optimizer \(--optimizer\) must be one of adamw, adamw8bit, prodigy"),
        ("lr_scheduler", "cosine_annealing", r"lr_scheduler \(--lr-scheduler\) must be one of constant, "),
        ("lr_scheduler_num_cycles", 0, r"lr_scheduler_num_cycles \(--lr-scheduler-num-cycles\) must be at least 1"),
        ("lr_scheduler_power", 0.0, r"lr_scheduler_power \(--lr-scheduler-power\) must be above 0"),
        ("gradient_accumulation_steps", 0, r"gradient_accumulation_steps \(--gradient-accumulation-steps\) must be"),
        ("max_grad_norm", -1.0, r"max_grad_norm \(--max-grad-norm\) must be 0 \(no clipping\) or a positive"),
        ("weight_decay", -0.01, r"weight_decay \(--weight-decay\) must be at least 0"),
        ("loss", "l1", r"loss \(--loss\) must be one of l2, huber"),
        ("huber_c", 0.0, r"huber_c \(--huber-c\) must be above 0"),
        ("min_snr_gamma", float("nan"), r"min_snr_gamma \(--min-snr-gamma\) must be 0 \(off\) or positive"),
        ("noise_offset", 1.5, r"noise_offset \(--noise-offset\) must be at least 0 and below 1"),
        ("input_perturbation", -0.1, r"input_perturbation \(--input-perturbation\) must be at least 0 and below 1"),
        (
            "text_encoder_lr",
            -1e-5,
            r"text_encoder_lr \(--text-encoder-lr\) must be 0 \(the same as --learning-rate\)",
        ),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})


def test_cli_command_rebuilds_the_same_config():
    cfg = TrainConfig(data="my images", steps=12, rank=4, trigger_word="zz", overwrite=True)
    argv = __import__("shlex").split(cfg.cli_command())[2:]
    assert parse(argv) == cfg


def test_a_kohya_style_recipe_is_spelled_as_flags():
    cfg = parse(
        "--data d --optimizer prodigy --learning-rate 1 --weight-decay 0.01 --lr-scheduler cosine_with_restarts "
        "--lr-warmup-steps 50 --lr-scheduler-num-cycles 3 --gradient-accumulation-steps 4 --max-grad-norm 1 "
        "--loss huber --huber-c 0.2 --min-snr-gamma 5 --noise-offset 0.05".split()
    )
    assert (cfg.optimizer, cfg.learning_rate, cfg.weight_decay) == ("prodigy", 1.0, 0.01)
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.lr_scheduler_num_cycles) == ("cosine_with_restarts", 50, 3)
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm) == (4, 1.0)
    assert (cfg.loss, cfg.huber_c, cfg.min_snr_gamma, cfg.noise_offset) == ("huber", 0.2, 5.0, 0.05)
    assert parse(__import__("shlex").split(cfg.cli_command())[2:]) == cfg


@pytest.mark.parametrize(
    "values,message",
    [
        (dict(optimizer="prodigy"), r"with --optimizer prodigy multiplies the step size Prodigy finds: use 1"),
        (dict(learning_rate=1.0), r"learning_rate \(--learning-rate\) must be a positive number below 1"),
        (
            dict(lr_warmup_steps=10),
            r"no effect with --lr-scheduler constant: use --lr-scheduler constant_with_warmup",
        ),
        (dict(lr_scheduler="cosine", lr_warmup_steps=400), r"lr_warmup_steps \(--lr-warmup-steps\) must be .*below"),
        (dict(text_encoder_lr=1e-5), r"text_encoder_lr \(--text-encoder-lr\) has no effect without --train-text"),
        (
            dict(train_text_encoder=True, text_encoder_lr=2.0),
            r"text_encoder_lr \(--text-encoder-lr\) must be 0 .* below 1",
        ),
        (
            dict(train_text_encoder=True, optimizer="prodigy", learning_rate=1.0, text_encoder_lr=1e-5),
            r"text_encoder_lr \(--text-encoder-lr\) with --optimizer prodigy multiplies the step size",
        ),
    ],
)
def test_settings_that_do_not_go_together_are_named(values, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**values)
