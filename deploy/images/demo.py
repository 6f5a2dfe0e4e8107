"""Run the CPU images built by build_images.sh and show they work (heavy: minutes, not part of `make test`).

    python deploy/images/demo.py silo-round       a silo container trains a federated round against a coordinator
                                                  started on the host (CURVE keys, enrolment), prints the round record
    python deploy/images/demo.py operator-chat    starts the all-in-one image (`appliance up`), creates an API key
                                                  inside it, chats through its router with the openai client
    python deploy/images/demo.py compose-chat     deploy/compose.yaml up (router, worker, coordinator, console on the
                                                  host's network), a chat through its router, then down -v
    python deploy/images/demo.py sizes            each image's size

Run it with the operator's virtualenv (the host side uses `appliance` from the interpreter running this script and
the openai client). The embedded model is not baked into an image: the host's prepared model store (`appliance model
prepare` into $FEDLLM_IMAGE_CACHE/model-home, done here when missing) is mounted read-only at
/var/lib/fedllm/models. Containers use podman with runc and the ulimits this host needs (deploy/images/containers.conf).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
CACHE = Path(os.environ.get("FEDLLM_IMAGE_CACHE", "/var/cache/fedllm-images"))
PODMAN = ["podman", "--runtime", "runc"]
RUN = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
IMAGES = {"silo": "localhost/fedllm-silo:cpu", "worker": "localhost/fedllm-worker:cpu", "operator": "localhost/fedllm-operator:cpu"}
MODEL = "smollm2-135m-instruct"


def host_appliance(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "fedllm.appliance", *args], env=env, text=True, capture_output=True, **kwargs)


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*PODMAN, *args], text=True, capture_output=True)
    if check and done.returncode:
        raise SystemExit(f"podman {' '.join(args[:3])} ... failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done


def model_store() -> Path:
    """The host's prepared model store (prepared once with this interpreter's `appliance model prepare`)."""
    home = CACHE / "model-home"
    models = home / "models"
    if not (models / MODEL / "store.json").exists():
        done = host_appliance("--home", str(home), "model", "prepare")
        if done.returncode:
            raise SystemExit(f"appliance model prepare failed:\n{done.stdout}{done.stderr}")
    for path in [home, models, *models.rglob("*")]:  # readable by the images' user (uid 10001)
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return models


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def silo_round(args: argparse.Namespace) -> int:
    from fedllm.federation.demo import data as demo_data

    models = model_store()
    work = Path(tempfile.mkdtemp(prefix="silo-round.", dir=CACHE))
    coord_home = work / "coordinator"
    (coord_home).mkdir(parents=True)
    (coord_home / "models").symlink_to(models)
    data = demo_data.write(work / "data")
    org = sorted(data)[0]
    data_dir = data[org]["train"].parent
    data_dir.chmod(0o755)
    for f in data_dir.iterdir():
        f.chmod(0o644)
    volume = f"fedllm-silo-demo-{os.getpid()}"
    port, status_port = free_port(), free_port()
    coordinator = None
    try:
        done = host_appliance("--home", str(coord_home), "federation", "init")
        coord_key = done.stdout.split("coordinator public key:")[1].split()[0]
        podman("volume", "create", volume)
        keygen = podman("run", "--rm", *RUN, "-v", f"{volume}:/var/lib/fedllm", IMAGES["silo"], "silo", "keygen")
        silo_key = keygen.stdout.split("silo public key:")[1].split()[0]
        print(f"silo key pair made in the container's volume {volume}; public key {silo_key[:8]}...", flush=True)
        done = host_appliance("--home", str(coord_home), "federation", "enroll", "--examples", "100", "--", "image-silo", silo_key)
        print(done.stdout.strip().splitlines()[0], flush=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "APPLIANCE_FEDERATION__STATUS_PORT": str(status_port),
               "APPLIANCE_FEDERATION__MAX_SILO_SHARE": "1.0"}
        log = open(work / "coordinator.log", "w")
        coordinator = subprocess.Popen(
            [sys.executable, "-m", "fedllm.appliance", "--home", str(coord_home), "coordinator", "start", "--rounds", "1",
             "--min-silos", "1", "--local-steps", str(args.local_steps), "--round-deadline", "600", "--host", "0.0.0.0",
             "--port", str(port), "--run", "image-demo"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        print(f"coordinator on the host: tcp://0.0.0.0:{port} (pid {coordinator.pid})", flush=True)
        time.sleep(5)
        started = time.monotonic()
        silo = subprocess.run(
            [*PODMAN, "run", "--rm", *RUN, "--name", volume, "-v", f"{volume}:/var/lib/fedllm",
             "-v", f"{models}:/var/lib/fedllm/models:ro", "-v", f"{data_dir}:/data:ro",
             "-e", f"APPLIANCE_FEDERATION__COORDINATOR_KEY={coord_key}", IMAGES["silo"], "silo", "join",
             "--coordinator", f"tcp://host.containers.internal:{port}", "--name", "image-silo", "--data", "/data/train.jsonl",
             "--eval", "/data/eval.jsonl"], text=True, capture_output=True, timeout=args.timeout)
        print(f"silo container exited {silo.returncode} after {time.monotonic() - started:.0f} s; its last lines:")
        print("\n".join((silo.stdout + silo.stderr).strip().splitlines()[-6:]), flush=True)
        coordinator.wait(timeout=120)
        print(f"coordinator exited {coordinator.returncode}; its last lines:")
        print("\n".join((work / "coordinator.log").read_text().strip().splitlines()[-6:]))
        records = sorted(coord_home.rglob("round*.json")) + sorted(coord_home.rglob("rounds.jsonl"))
        for record in records[:2]:
            print(f"round record {record.relative_to(coord_home)}:\n{record.read_text()[:1500]}")
        ok = silo.returncode == 0 and coordinator.returncode == 0
        print("RESULT:", "the silo image completed a round" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if coordinator and coordinator.poll() is None:
            coordinator.terminate()
            coordinator.wait(timeout=30)
        podman("rm", "-f", volume, check=False)
        podman("volume", "rm", "-f", volume, check=False)


def operator_chat(args: argparse.Namespace) -> int:
    from openai import OpenAI

    models = model_store()
    name = f"fedllm-operator-demo-{os.getpid()}"
    port = free_port()
    volume = name
    try:
        podman("volume", "create", volume)
        # `up` without the Ray head and the console keeps this 2-core host's load down; both are in the image.
        cmd = ["run", "-d", *RUN, "--shm-size", "1g", "--name", name, "-v", f"{volume}:/var/lib/fedllm", "-v", f"{models}:/var/lib/fedllm/models:ro",
               "-p", f"127.0.0.1:{port}:8000", IMAGES["operator"], "up", *args.up_args]
        podman(*cmd)
        print(f"started {IMAGES['operator']} as {name}: appliance up {' '.join(args.up_args)}; router published at "
              f"127.0.0.1:{port}", flush=True)
        key = podman("exec", name, "appliance", "keys", "create", "--name", "demo").stdout
        api_key = next(word for word in key.split() if word.startswith("sk-")) if "sk-" in key else key.strip().split()[-1]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, timeout=60, max_retries=0)
        deadline = time.monotonic() + args.timeout
        started = time.monotonic()
        last = ""
        while time.monotonic() < deadline:
            try:
                reply = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0,
                                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
                print(f"chat through the container's router after {time.monotonic() - started:.0f} s: "
                      f"{reply.choices[0].message.content!r} (model {reply.model})")
                print("RESULT: the all-in-one image served chat through its router")
                return 0
            except Exception as exc:  # the workers load for a while
                last = f"{type(exc).__name__}: {exc}"
                state = podman("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
                if state != "true":
                    break
                time.sleep(5)
        print(f"FAILED: no answer ({last}); container log tail:\n" + "\n".join(
            (podman("logs", name, check=False).stdout + podman("logs", name, check=False).stderr).splitlines()[-30:]))
        return 1
    finally:
        podman("rm", "-f", "-t", "20", name, check=False)
        podman("volume", "rm", "-f", volume, check=False)


def compose_chat(args: argparse.Namespace) -> int:
    """deploy/compose.yaml up (router, worker, coordinator, console), a chat through the router, then down -v."""
    from openai import OpenAI

    compose = [str(Path(__file__).with_name("compose.sh"))]
    env = {**os.environ, "FEDLLM_MODELS": str(model_store())}
    up = subprocess.run([*compose, "up"], text=True, capture_output=True, env=env)
    print(f"compose.sh up -> exit {up.returncode}", flush=True)
    try:
        if up.returncode:
            print(up.stdout[-2000:], up.stderr[-3000:])
            return 1
        client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused-on-loopback", timeout=60, max_retries=0)
        started, last = time.monotonic(), ""
        while time.monotonic() - started < args.timeout:
            try:
                reply = client.chat.completions.create(model=MODEL, max_tokens=30, temperature=0,
                                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
                print(f"chat through the compose stack's router after {time.monotonic() - started:.0f} s: "
                      f"{reply.choices[0].message.content!r}")
                time.sleep(10)  # a part that crash-loops shows in its restart count
                restarts = {}
                for service in ("router", "worker", "coordinator", "console"):
                    state = podman("inspect", "-f", "{{.State.Status}} {{.RestartCount}}", f"fedllm_{service}_1", check=False)
                    restarts[service] = state.stdout.strip() or state.stderr.strip()
                print("containers (status, restarts):", restarts)
                ok = all(value.startswith("running") for value in restarts.values())
                print("RESULT:", "the compose stack served chat" if ok else "FAILED: not every part is running")
                return 0 if ok else 1
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(5)
        logs = subprocess.run([*compose, "logs", "worker"], text=True, capture_output=True, env=env)
        print(f"FAILED: {last}\n" + "\n".join((logs.stdout + logs.stderr).splitlines()[-30:]))
        return 1
    finally:
        down = subprocess.run([*compose, "down", "-v", "-t", "20"], text=True, capture_output=True, env=env)
        print(f"compose.sh down -v -> exit {down.returncode}")


def sizes(_: argparse.Namespace) -> int:
    for role, image in IMAGES.items():
        done = podman("image", "inspect", "-f", "{{.Size}}", image, check=False)
        size = f"{int(done.stdout) / 1e9:.2f} GB" if done.returncode == 0 else "not built"
        print(f"{role:9} {image:34} {size}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("silo-round")
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=420)
    p.set_defaults(fn=silo_round)
    p = sub.add_parser("operator-chat")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("up_args", nargs="*", default=["--without", "cluster", "--without", "console"])
    p.set_defaults(fn=operator_chat)
    p = sub.add_parser("compose-chat")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(fn=compose_chat)
    sub.add_parser("sizes").set_defaults(fn=sizes)
    args = parser.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
