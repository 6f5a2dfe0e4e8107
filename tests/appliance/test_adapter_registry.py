"""The adapter registry: versions count up, lineage in meta.json, bad names and missing files refused."""

from __future__ import annotations

import json

import pytest

from fedllm.core.adapter_registry import AdapterRegistry, parse_ref
from fedllm.core.errors import DataError, ModelNotFound


@pytest.fixture
def adapter_src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (src / "adapter_model.safetensors").write_bytes(b"weights")
    return src


def test_versions_count_up_and_latest_is_default(tmp_path, adapter_src):
    reg = AdapterRegistry(tmp_path / "adapters")

    v1 = reg.register("legal", adapter_src, {"round": 1})
    v2 = reg.register("legal", adapter_src, {"round": 2})

    assert (v1.version, v2.version) == (1, 2)
    assert reg.versions("legal") == [1, 2]
    assert reg.get("legal").version == 2 and reg.get("legal:1").meta["round"] == 1
    assert (v2.ref, v2.served_name) == ("legal:2", "legal-v2")
    assert [a.ref for a in reg.list()] == ["legal:1", "legal:2"]
    assert (v2.path / "adapter_model.safetensors").read_bytes() == b"weights"


def test_meta_records_lineage(tmp_path, adapter_src):
    reg = AdapterRegistry(tmp_path / "adapters")
    v = reg.register("med", adapter_src, {"base_model": "smollm2-135m-instruct", "federation_run": "r1", "round": 3})

    meta = json.loads((v.path / "meta.json").read_text())
    assert meta["name"] == "med" and meta["version"] == 1 and meta["base_model"] == "smollm2-135m-instruct"
    assert meta["federation_run"] == "r1" and "created_at" in meta


@pytest.mark.parametrize("name", ["../evil", "", "has space", "-lead", "x" * 65, "a/b", "name.tmp"])
def test_bad_names_are_refused(tmp_path, adapter_src, name):
    with pytest.raises(DataError, match="invalid adapter name"):
        AdapterRegistry(tmp_path / "adapters").register(name, adapter_src)


def test_bad_version_reference():
    with pytest.raises(DataError, match="whole number"):
        parse_ref("legal:latest")


def test_missing_files_are_named(tmp_path, adapter_src):
    (adapter_src / "adapter_model.safetensors").unlink()
    reg = AdapterRegistry(tmp_path / "adapters")
    with pytest.raises(DataError, match="missing adapter_model.safetensors"):
        reg.register("legal", adapter_src)
    assert reg.versions("legal") == []


def test_unknown_adapter_or_version(tmp_path, adapter_src):
    reg = AdapterRegistry(tmp_path / "adapters")
    with pytest.raises(ModelNotFound, match="unknown adapter 'nope'"):
        reg.get("nope")
    reg.register("legal", adapter_src)
    with pytest.raises(ModelNotFound, match=r"no version 7 \(versions: \[1\]\)"):
        reg.get("legal:7")


def test_register_takes_the_next_number_when_another_writer_took_its_version(tmp_path, adapter_src, monkeypatch):
    reg = AdapterRegistry(tmp_path / "adapters")
    reg.register("legal", adapter_src, {"round": 1})
    counted = iter([1])  # this writer counted before the other one registered version 1
    real_next = AdapterRegistry._next_version
    monkeypatch.setattr(AdapterRegistry, "_next_version", lambda self, name: next(counted, None) or real_next(self, name))

    v = reg.register("legal", adapter_src, {"round": 2})

    assert v.version == 2 and reg.get("legal:1").meta["round"] == 1 and reg.get("legal:2").meta["round"] == 2
    assert sorted(p.name for p in (tmp_path / "adapters" / "legal").iterdir()) == ["1", "2"]  # no staging left


def test_concurrent_registrations_get_distinct_versions(tmp_path, adapter_src):
    import threading

    reg = AdapterRegistry(tmp_path / "adapters")
    got, errors = [], []

    def register(i: int) -> None:
        try:
            got.append(reg.register("legal", adapter_src, {"i": i}).version)
        except Exception as exc:  # noqa: BLE001 - collected and asserted empty
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == [] and sorted(got) == list(range(1, 9))
