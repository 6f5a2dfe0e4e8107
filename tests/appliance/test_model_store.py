"""The model store: clear errors for missing or corrupt sources, unknown names; HF folders prepared once."""

from __future__ import annotations

import json

import pytest

from fedllm.core.errors import DataError, ModelNotFound
from fedllm.core.model_store import (
    drop_gguf_quantization,
    list_models,
    prepare_model,
    resolve_model,
    sha256_of,
    verify_gguf,
)


def test_missing_source_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_model(tmp_path / "models", tmp_path / "nope.gguf")


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(DataError, match="not a GGUF file"):
        prepare_model(tmp_path / "models", fake)
    assert list_models(tmp_path / "models") == []  # nothing half-prepared is left behind


def test_wrong_sha256_says_corrupt(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    assert verify_gguf(f, sha256_of(f)) == f
    with pytest.raises(DataError, match="corrupt: sha256"):
        verify_gguf(f, "0" * 64)


def test_a_folder_without_config_json(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="config.json is missing"):
        prepare_model(tmp_path / "models", tmp_path / "src")


def test_unknown_model_name_lists_what_is_prepared(tmp_path):
    with pytest.raises(ModelNotFound, match=r"unknown model 'nope'.*prepared: none.*appliance model prepare"):
        resolve_model(tmp_path / "models", "nope")


def test_leftover_gguf_quantization_config_is_dropped(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "gguf"}}))
    drop_gguf_quantization(tmp_path)
    drop_gguf_quantization(tmp_path)  # idempotent
    assert json.loads((tmp_path / "config.json").read_text()) == {"model_type": "llama"}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    drop_gguf_quantization(tmp_path)  # other methods are real quantisation and stay
    assert "quantization_config" in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.slow
def test_an_hf_folder_is_prepared_once_and_resolved_by_name(tmp_path, tiny_model_dir):
    models = tmp_path / "models"

    m = prepare_model(models, tiny_model_dir, name="tiny")

    assert m.name == "tiny" and (m.path / "model.safetensors").exists() and m.parameters > 0
    assert [x.name for x in list_models(models)] == ["tiny"]
    assert resolve_model(models, "tiny") == m.path
    mtime = (m.path / "model.safetensors").stat().st_mtime_ns
    assert prepare_model(models, tiny_model_dir, name="tiny").path == m.path  # reused, not converted again
    assert (m.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_the_embedded_model_is_ready_for_vllm(embedded_model_dir):
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (embedded_model_dir / "chat_template.jinja").exists() or "chat_template" in (embedded_model_dir / "tokenizer_config.json").read_text()


def test_the_embedded_model_carries_its_recommended_sampling(embedded_model_dir) -> None:
    # Arrange / Act: the session fixture prepared (or reused and repaired) the embedded model.
    config = json.loads((embedded_model_dir / "generation_config.json").read_text())

    # Assert: vLLM's default sampling for requests that set none is the model card's, not temperature 1.
    assert config["temperature"] == 0.2 and config["top_p"] == 0.9 and config["do_sample"] is True
    assert config["eos_token_id"] == 2
