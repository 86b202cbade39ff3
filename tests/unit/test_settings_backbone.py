"""Settings for bringing your own model: backbone path, dtype, device, trust_remote_code."""

import pytest
from pydantic import ValidationError

from daemon.settings import Settings


def test_own_model_settings_load_from_toml(tmp_path):
    path = tmp_path / "melo.toml"
    path.write_text('backbone = "/models/my-llama"\ndtype = "bfloat16"\ndevice = "cuda:1"\ntrust_remote_code = true\n')
    settings = Settings.load(path)
    assert (settings.backbone, settings.dtype, settings.device, settings.trust_remote_code) == (
        "/models/my-llama", "bfloat16", "cuda:1", True)


def test_defaults_keep_remote_code_off_and_the_device_automatic():
    settings = Settings()
    assert (settings.dtype, settings.device, settings.trust_remote_code) == ("auto", "auto", False)


@pytest.mark.parametrize("field, value", [("device", "tpu"), ("device", "cuda:x"), ("dtype", "int8")])
def test_unknown_device_or_dtype_is_refused_naming_the_field(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_a_classifier_checkpoint_needs_no_labels_but_a_shipped_one_does():
    assert Settings(task="classify", backbone="./my-roberta-classifier").labels == []
    with pytest.raises(ValidationError, match="needs labels"):
        Settings(task="classify", backbone="minilm-l6")
