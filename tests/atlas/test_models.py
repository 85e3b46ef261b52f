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
