"""Turn this host's pip configuration into what an image build needs: a pip.conf for the build's RUN steps and the
`--volume` flags that make its local paths (file:// indexes, find-links folders, a constraints file) visible there.

    python3 deploy/images/pip_build_conf.py OUT_DIR      writes OUT_DIR/pip.conf, prints one `-v SRC:DST:ro` per line

The values come from `pip config list` (files and PIP_* environment); the build mounts OUT_DIR at /run/pip-build and
sets PIP_CONFIG_FILE for its install steps only, so the host's index configuration never lands in an image.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "cert", "trusted-host", "default-timeout")
PATH_KEYS = {"index-url", "extra-index-url", "find-links", "constraint"}
MOUNT = "/run/pip-build"  # where build_images.sh mounts OUT_DIR


def host_pip_config() -> dict[str, str]:
    """`pip config list` as {key: value}; the environment (`:env:.`) wins over files, as in pip."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict[str, tuple[int, str]] = {}
    for line in out.splitlines():
        match = re.match(r"^(:env:|[a-z]+)\.([a-z-]+)='(.*)'$", line.strip())
        if not match or match.group(2) not in KEYS:
            continue
        rank = 2 if match.group(1) == ":env:" else (1 if match.group(1) == "global" else 0)
        key = match.group(2)
        if key not in found or rank >= found[key][0]:
            found[key] = (rank, match.group(3))
    return {key: value for key, (_, value) in found.items()}


def local_paths(value: str) -> list[str]:
    """The local files or folders a config value names (file:// URLs and absolute paths)."""
    paths = []
    for item in value.split():
        path = unquote(urlparse(item).path) if item.startswith("file://") else item
        if path.startswith("/") and Path(path).exists():
            paths.append(path)
    return paths


def main(out_dir: str) -> int:
    config = host_pip_config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "cert" in config and Path(config["cert"]).is_file():
        # The host's CA bundle (it may hold a proxy's CA): copied beside pip.conf, seen at /run/pip-build in the build.
        shutil.copyfile(config["cert"], out / "cert.pem")
        config["cert"] = f"{MOUNT}/cert.pem"
    else:
        config.pop("cert", None)
    lines = ["[global]"] + [f"{key} = {value}" for key, value in sorted(config.items())]
    (out / "pip.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")
    mounts: list[str] = []
    for key in sorted(PATH_KEYS & config.keys()):
        for path in local_paths(config[key]):
            # An index's simple/ page links to ../files: mount the index's root folder.
            root = str(Path(path).parent) if path.rstrip("/").endswith("/simple") else path
            if root not in mounts:
                mounts.append(root)
    for path in mounts:
        print(f"-v={path}:{path}:ro")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: pip_build_conf.py OUT_DIR")
    sys.exit(main(sys.argv[1]))
