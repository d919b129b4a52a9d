"""A Stable Diffusion directory as [diffusion].path (docs/configuration.md's production
example): diffusers' StableDiffusionPipeline, whose text encoder and tokenizer are
transformers' (the ``stable-diffusion`` extra, which ``make test`` installs through
``dev``). The directory here is a tiny randomly initialised one in the same format."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import write_config
from explaind import logs
from explaind.config import DiffusionSection, load_config, unusable_model_path
from explaind.engine.core import Engine
from explaind.engine.models import ComponentStatus, load_diffusion
from explaind.metrics import Metrics
from explaind.store import SQLiteStore

pytest.importorskip("transformers", reason="the stable-diffusion extra: pip install -e '.[stable-diffusion]'")

NO_CLIP = ComponentStatus("clip", False, "", "not configured")  # a Stable Diffusion directory brings its own text encoder


@pytest.fixture(scope="module")
def stable_diffusion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A StableDiffusionPipeline saved as diffusers saves sd-turbo's: model_index.json, unet/,
    vae/, text_encoder/, tokenizer/ and scheduler/ (1.x's safety checker and feature
    extractor left out, as in sd-turbo), every width 4 to 32 so it builds in well under a second."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=16, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=16)
    # A byte-pair vocabulary of "red" alone, with CLIP's start and end tokens.
    vocab = ["r", "e", "d</w>", "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: index for index, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=8, bos_token_id=5, eos_token_id=6, pad_token_id=6))
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(directory / "pipeline")
    return directory / "pipeline"


def test_a_stable_diffusion_directory_loads_as_its_pipeline_and_generates_on_the_cpu(stable_diffusion_dir):
    index = json.loads((stable_diffusion_dir / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"] and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    status = load_diffusion(DiffusionSection(path=str(stable_diffusion_dir)), NO_CLIP, required=True)
    assert (status.loaded, status.source, status.detail) == (True, str(stable_diffusion_dir), "StableDiffusionPipeline")
    # What it was loaded for: a 16 x 16 image from a prompt, in one step of its scheduler.
    images = status.model("red", num_inference_steps=1, height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and images.min() >= 0 and images.max() <= 1


def test_a_server_configured_with_a_stable_diffusion_directory_reports_it_loaded(tmp_path, classifier_dir, stable_diffusion_dir):
    # The service's only use of the pipeline today: `explaind info`'s components and the
    # explaind_component_loaded gauge. Named in a config file, it must load for the server to start.
    config = load_config(write_config(tmp_path / "explaind.toml", classifier_dir, diffusion={"path": str(stable_diffusion_dir)},
                                      server={"data_dir": str(tmp_path / "data")}))
    assert unusable_model_path(config) is None  # the pre-bind check asks for the files diffusers saved, no other
    engine = Engine(config, SQLiteStore(tmp_path / "data"), Metrics())
    engine.load()
    try:
        diffusion = engine.components["diffusion"]
        assert (diffusion.loaded, diffusion.detail) == (True, "StableDiffusionPipeline")
        assert engine.metrics.registry.get_sample_value("explaind_component_loaded", {"component": "diffusion"}) == 1
    finally:
        engine.close()


def test_a_stable_diffusion_load_s_warnings_reach_the_server_s_log_handler(stable_diffusion_dir, tmp_path, monkeypatch):
    # diffusers' logger had a stderr handler of its own and did not propagate: with JSON logs
    # its "You have disabled the safety checker" (a 1.x directory saved without one) was a plain
    # line, which the root's handler (the server's, configure_logging's) never saw.
    directory = tmp_path / "pipeline"
    shutil.copytree(stable_diffusion_dir, directory)
    index = json.loads((directory / "model_index.json").read_text())
    (directory / "model_index.json").write_text(json.dumps({**index, "requires_safety_checker": True}))
    seen: list[logging.LogRecord] = []
    monkeypatch.setattr(logs, "_routing_libraries", True)  # as serve's configure_logging sets it, with its handler (this one)
    server_handler = logging.Handler(logging.WARNING)
    server_handler.emit = seen.append  # type: ignore[method-assign]
    logging.getLogger().addHandler(server_handler)
    try:
        assert load_diffusion(DiffusionSection(path=str(directory)), NO_CLIP, required=True).loaded
    finally:
        logging.getLogger().removeHandler(server_handler)
    assert any(record.name.startswith("diffusers.") and "disabled the safety checker" in record.getMessage() for record in seen), seen
