from __future__ import annotations

import pytest
import torch

from atlas.errors import ModelError
from atlas.models import load_model
from atlas.testing import TinyNet, save_tiny_model


def test_pickled_module_loads(tmp_path):
    model = load_model(save_tiny_model(tmp_path / "tiny.pt"))
    assert isinstance(model.module, TinyNet)


def test_torchscript_file_rejected(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(TinyNet().eval()), str(path))
    with pytest.raises(ModelError, match="TorchScript file; hooks cannot read its layers"):
        load_model(f"file:{path}")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n not a model", b"plain text", b""])
def test_non_model_file_one_line_error(tmp_path, content):
    path = tmp_path / "photo.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="pass a file written by torch.save") as caught:
        load_model(f"file:{path}")
    assert "\n" not in str(caught.value)


def test_timm_uncached_weights_offline(tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    seen_offline = []
    real_create = timm.create_model

    def recording_create(*args, **kwargs):
        seen_offline.append(constants.is_offline_mode())
        return real_create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording_create)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(ModelError, match="'resnet18' are not in the Hugging Face cache") as caught:
        load_model("timm:resnet18")

    assert seen_offline == [True]
    assert constants.HF_HUB_OFFLINE == before
    assert "timm:resnet18@random" in str(caught.value)


def test_torchvision_uncached_weights_not_downloaded(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("torchvision tried to download weights")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(ModelError, match="not in the torch hub cache") as caught:
        load_model("torchvision:resnet18")

    assert str(tmp_path / "torch" / "hub" / "checkpoints") in str(caught.value)
