"""SD 2.x: the 512 epsilon and 768 v-prediction parameterisations train and generate, and the file says which."""

import numpy as np
import pytest

from adapters.base import load_pipeline
from adapters.families import SD2_EPS, SD2_V, family_of_pipeline
from adapters.formats import read_safetensors
from adapters.runtime import Studio
from trainer.config import TrainConfig
from trainer.loop import train


@pytest.mark.parametrize(
    "prediction_type,family,architecture,v",
    [
        ("epsilon", SD2_EPS, "stable-diffusion-v2-512/lora", "False"),
        ("v_prediction", SD2_V, "stable-diffusion-v2-768-v/lora", "True"),
    ],
)
def test_sd2_trains_generates_and_says_which(tmp_path, image_folder, prediction_type, family, architecture, v):
    from tests.conftest import build_tiny_sd2_pipeline

    model = tmp_path / "sd2"
    build_tiny_sd2_pipeline(prediction_type).save_pretrained(model, safe_serialization=True)
    assert family_of_pipeline(load_pipeline(str(model), device="cpu")) is family
    config = TrainConfig(
        base_model=str(model),
        data=str(image_folder),
        steps=4,
        batch_size=2,
        learning_rate=1e-2,
        run_dir=str(tmp_path / "r"),
    )
    result = train(config, device="cpu", log_to_terminal=False)
    _, metadata = read_safetensors(result.adapter)
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) == ("sd_v2", "True")
    assert (metadata["modelspec.architecture"], metadata["ss_v_parameterization"]) == (architecture, v)

    studio = Studio(str(model), device="cpu")
    studio.load(result.adapter, name="style")
    with_style = studio.generate("a red circle", seed=1, sampling_steps=2, strengths={"style": 1.0})[0]
    without = studio.generate("a red circle", seed=1, sampling_steps=2, strengths={})[0]
    assert with_style.size == (32, 32) and not np.array_equal(np.asarray(with_style), np.asarray(without))
