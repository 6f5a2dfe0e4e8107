"""The container images' sources (deploy/images/, deploy/compose.yaml) are consistent with the package: every image
starts a real `appliance` command, installs extras that exist, runs as a non-root user with the home on a volume, and
carries no secret or index configuration. Building and running the images is deploy/images/build_images.sh and
demo.py (minutes; not part of the test suite)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest
import typer
import yaml

from fedllm.appliance.cli import app

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "deploy" / "images"
CONTAINERFILES = {
    "silo": "silo", "worker": "worker,cpu", "operator": "all,cpu", "worker.cuda": "worker,gpu", "operator.cuda": "all,gpu",
}
SECRET = re.compile(r"(TOKEN|PASSWORD|SECRET|API_KEY|_KEY=)", re.I)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def resolves(words: list[str]) -> bool:
    """Whether `appliance WORDS...` names an existing (sub)command."""
    command: click.Command = typer.main.get_command(app)
    for word in words:
        if word.startswith("-") or not isinstance(command, click.Group):
            break
        sub = command.commands.get(word)
        if sub is None:
            return False
        command = sub
    return not isinstance(command, click.Group)


def extras_declared() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.parametrize("suffix, extras", sorted(CONTAINERFILES.items()))
def test_containerfile_installs_its_role_and_runs_an_appliance_command(suffix: str, extras: str) -> None:
    steps = instructions(IMAGES / f"Containerfile.{suffix}")
    kinds = [kind for kind, _ in steps]
    assert kinds[0] in {"ARG", "FROM"} and any(kind == "FROM" for kind in kinds)
    runs = " ".join(args for kind, args in steps if kind == "RUN")
    assert f"/src[{extras}]" in runs
    assert set(extras.split(",")) <= extras_declared()
    # pip reads the build host's index config only from the build-time mount, never from a file in the image
    assert "COPY" not in kinds and "ADD" not in kinds
    assert "PIP_CONFIG_FILE=/run/pip-build/pip.conf" in runs and "ENV PIP_CONFIG_FILE" not in str(steps)
    user = [args for kind, args in steps if kind == "USER"]
    assert user == ["fedllm"], "the image must end as the non-root user fedllm"
    assert "useradd --system --uid 10001" in runs
    assert [args for kind, args in steps if kind == "VOLUME"] == ["/var/lib/fedllm"]
    env = " ".join(args for kind, args in steps if kind == "ENV")
    assert "APPLIANCE_HOME=/var/lib/fedllm" in env and not SECRET.search(env)
    entry = [args for kind, args in steps if kind == "ENTRYPOINT"]
    assert entry == ['["/opt/fedllm/venv/bin/appliance"]']
    cmd = [args for kind, args in steps if kind == "CMD"]
    assert len(cmd) == 1 and resolves(yaml.safe_load(cmd[0]))


def test_cpu_images_drop_the_cuda_torchvision_like_the_makefile() -> None:
    for suffix in ("worker", "operator"):
        runs = " ".join(args for kind, args in instructions(IMAGES / f"Containerfile.{suffix}") if kind == "RUN")
        assert "pip uninstall -y -q torchvision torchaudio torchcodec" in runs
    for suffix in ("silo", "operator"):  # DeepSpeed's CPU accelerator compiles its shm op: built at image build time
        steps = instructions(IMAGES / f"Containerfile.{suffix}")
        runs = " ".join(args for kind, args in steps if kind == "RUN")
        assert "g++" in runs and "ShareMemCommBuilder().load()" in runs
        assert "TORCH_EXTENSIONS_DIR=/opt/fedllm/torch_extensions" in [args for kind, args in steps if kind == "ENV"]
    for suffix in ("worker.cuda", "operator.cuda"):
        runs = " ".join(args for kind, args in instructions(IMAGES / f"Containerfile.{suffix}") if kind == "RUN")
        assert "torch.version.cuda" in runs  # a CPU torch in a CUDA image fails the build


def test_compose_services_run_appliance_commands_with_the_home_on_a_volume() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = doc["services"]
    assert set(services) == {"router", "worker", "coordinator", "console"}
    built = set(re.findall(r"localhost/fedllm-\w+:cpu", (IMAGES / "build_images.sh").read_text()))
    for name, service in services.items():
        assert service["image"] in built, name
        if service.get("entrypoint") == ["/bin/sh", "-c"]:  # `appliance A && exec appliance B`
            lines = [part.strip().removeprefix("exec ").split() for part in service["command"][0].split("&&")]
            assert all(words[0] == "appliance" and resolves(words[1:]) for words in lines), (name, lines)
        else:
            assert resolves(service["command"]), (name, service["command"])
        assert service["restart"] == "on-failure"
        mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in service["volumes"]}
        assert mounts["/var/lib/fedllm"] in doc["volumes"], name
        assert not SECRET.search(str(service.get("environment", {}))), name
    homes = {services[name]["volumes"][0] for name in ("router", "coordinator", "console")}
    assert homes == {"fedllm-home:/var/lib/fedllm"}
    worker = services["worker"]["command"]
    token = worker[worker.index("--token-file") + 1]
    assert token.startswith("/run/fedllm-router/") and "fedllm-home:/run/fedllm-router:ro" in services["worker"]["volumes"]


def test_scripts_parse_and_name_existing_containerfiles() -> None:
    for script in ("build_images.sh", "compose.sh"):
        assert subprocess.run(["bash", "-n", str(IMAGES / script)]).returncode == 0
    text = (IMAGES / "build_images.sh").read_text()
    for name in re.findall(r"Containerfile\.\w+", text):
        assert (IMAGES / name).is_file(), name
    assert "apt-get install" in text  # says what to install when a tool is missing


def test_pip_build_conf_mounts_the_local_index_and_keeps_it_out_of_the_image(tmp_path: Path) -> None:
    """The build's pip.conf carries the host's file:// indexes, find-links and constraints, and each local folder is
    listed for a read-only bind mount (an index's simple/ page needs its sibling files/ folder: the root is mounted)."""
    index = tmp_path / "pypi" / "simple"
    index.mkdir(parents=True)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=9\n")
    conf = tmp_path / "host-pip.conf"
    conf.write_text(f"[global]\nextra-index-url = file://{index}\nfind-links = {wheels}\nconstraint = {constraints}\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = str(conf)
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(IMAGES / "pip_build_conf.py"), str(out)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    mounts = done.stdout.split()
    assert f"-v={tmp_path / 'pypi'}:{tmp_path / 'pypi'}:ro" in mounts
    assert f"-v={wheels}:{wheels}:ro" in mounts and f"-v={constraints}:{constraints}:ro" in mounts
    written = (out / "pip.conf").read_text()
    assert f"extra-index-url = file://{index}" in written and f"find-links = {wheels}" in written


def test_build_script_mounts_the_pip_config_only_for_the_build() -> None:
    text = (IMAGES / "build_images.sh").read_text()
    build = text[text.index("build() {"):text.index("sizes() {")]
    assert '-v "$conf:/run/pip-build:ro"' in build and "PODMAN=(podman --runtime runc)" in text


def test_the_image_build_context_keeps_every_package_folder_pyproject_installs() -> None:
    """`pip install .` in an image needs every folder pyproject.toml maps (an ignored one fails the build)."""
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".containerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders and not folders & ignored, f"ignored by .containerignore: {sorted(folders & ignored)}"
