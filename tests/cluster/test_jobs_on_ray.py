"""Jobs on a real Ray cluster (head + nodes on loopback, token auth): placement by group, logs that stream, the
group's only slot taken in turn, refusal beyond the group's capacity, stop of the whole process tree, node death
with and without retries, a node with a wrong token refused, and a training job that registers its adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.conftest import where_it_ran
from fedllm.testing.factories import REPO
from tests.integration.conftest import pids_with

pytestmark = pytest.mark.slow


def _state(cluster, job: str) -> dict:
    return cluster.cli_json("job", "show", job)


def _wait_state(cluster, job: str, states: tuple[str, ...], timeout_s: float = 90) -> dict:
    return cluster.wait(lambda: (v := _state(cluster, job))["state"] in states and v, timeout_s, f"job {job} in {states}")


def _submit(cluster, *args, check: bool = True) -> subprocess.CompletedProcess:
    return cluster.cli("job", "submit", *args, check=check)


def test_nodes_are_listed_by_group_with_their_resources(cluster) -> None:
    nodes = {n["labels"]["node"]: n for n in cluster.cli_json("node", "ls")}

    assert {k: (v["group"], v["alive"]) for k, v in nodes.items()} == {
        "head": ("head", True), "a1": ("a", True), "b1": ("b", True), "b2": ("b", True)}
    assert nodes["b1"]["total"]["slot"] == 1 and nodes["b1"]["total"]["CPU"] == 1 and nodes["head"]["is_head"]
    assert (Path(cluster.token_file).stat().st_mode & 0o777) == 0o600


def test_a_job_runs_on_a_node_of_its_group_with_threads_of_its_cpus_and_its_logs_stream(cluster) -> None:
    code = ("import os, time\n"
            "print('threads', os.environ['OMP_NUM_THREADS'], len(os.sched_getaffinity(0)), flush=True)\n"
            "for i in range(6):\n    print('tick', i, flush=True); time.sleep(0.5)\n")
    _submit(cluster, "--group", "b", "--slots", "1", "--cpus", "1", "--name", "where", "--program", "--", sys.executable, "-c", code)
    follow = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "job", "logs", "-f", "where"], env=cluster.env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_tick = next(line for line in follow.stdout if line.startswith("tick"))
        state_at_first_tick = _state(cluster, "where")["state"]
        rest = follow.stdout.read()
    finally:
        follow.kill()
        follow.wait()
    logs = cluster.cli("job", "logs", "where").stdout
    ran = where_it_ran(logs)

    assert first_tick.strip() == "tick 0" and state_at_first_tick == "RUNNING"  # the log streamed while it ran
    assert "tick 5" in rest
    assert len(ran) == 1 and ran[0]["group"] == "b" and ran[0]["node_name"] in ("b1", "b2")
    assert ran[0]["threads"] == 1 and "threads 1 1" in logs
    final = _wait_state(cluster, "where", ("SUCCEEDED", "FAILED"))
    assert final["state"] == "SUCCEEDED" and final["node_id"] == cluster.node_id(ran[0]["node_name"])


def test_a_job_asking_more_than_its_group_has_is_refused_naming_the_capacity(cluster) -> None:
    too_big = _submit(cluster, "--group", "a", "--slots", "2", "--program", "--", "true", check=False)
    no_group = _submit(cluster, "--group", "nosuch", "--program", "--", "true", check=False)

    assert too_big.returncode == 2 and "node of group 'a' has" in " ".join(too_big.stderr.split())
    assert "1 slot" in too_big.stderr and "asks 1 CPU, 2 slot" in " ".join(too_big.stderr.split())
    assert no_group.returncode == 2 and "group 'nosuch' has no live node" in " ".join(no_group.stderr.split())


def test_two_jobs_needing_the_groups_only_slot_run_one_after_the_other(cluster, tmp_path: Path) -> None:
    code = ("import sys, time\n"
            "open(sys.argv[1], 'w').write(str(time.time()) + '\\n'); time.sleep(3)\n"
            "open(sys.argv[1], 'a').write(str(time.time()) + '\\n')\n")
    for name in ("first", "second"):
        _submit(cluster, "--group", "a", "--slots", "1", "--name", name, "--program", "--", sys.executable, "-c", code,
                tmp_path / name)
    _wait_state(cluster, "first", ("RUNNING",))
    waiting = _state(cluster, "second")
    done = [_wait_state(cluster, n, ("SUCCEEDED", "FAILED")) for n in ("first", "second")]
    first, second = ([float(x) for x in (tmp_path / n).read_text().split()] for n in ("first", "second"))

    assert waiting["state"] in ("QUEUED", "PENDING") and "slot" in waiting["reason"] or "behind" in waiting["reason"]
    assert [d["state"] for d in done] == ["SUCCEEDED", "SUCCEEDED"]
    assert second[0] >= first[1]  # the second started only after the first had ended


def test_the_groups_limit_of_concurrent_jobs_holds_a_job_that_would_fit(cluster, tmp_path: Path) -> None:
    code = "import sys, time; open(sys.argv[1], 'w').write(str(time.time())); time.sleep(3); open(sys.argv[1], 'a').write(' ' + str(time.time()))"
    for name in ("lim1", "lim2"):
        _submit(cluster, "--group", "b", "--name", name, "--program", "--", sys.executable, "-c", code, tmp_path / name)
    _wait_state(cluster, "lim1", ("RUNNING",))
    held = _state(cluster, "lim2")
    for name in ("lim1", "lim2"):
        _wait_state(cluster, name, ("SUCCEEDED",))
    first, second = ([float(x) for x in (tmp_path / n).read_text().split()] for n in ("lim1", "lim2"))

    assert held["state"] == "QUEUED" and "its limit" in held["reason"]
    assert second[0] >= first[1]


def test_job_stop_ends_the_jobs_whole_process_tree(cluster, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; sh -c 'sleep 301 & echo $! >> {pids}; wait' & echo $$ >> {pids}; wait"
    _submit(cluster, "--group", "a", "--name", "tree", "--program", "--", "sh", "-c", script)
    cluster.wait(lambda: pids.exists() and len(pids.read_text().split()) == 3, 60, "the job's three processes")
    started = [int(p) for p in pids.read_text().split()]
    assert all(os.path.exists(f"/proc/{p}") for p in started)

    stopped = cluster.cli("job", "stop", "tree")

    assert "STOPPED" in stopped.stdout
    assert cluster.wait(lambda: not any(os.path.exists(f"/proc/{p}") for p in started), 30, "every process of the job gone")
    assert _state(cluster, "tree")["reason"] == "stopped by `appliance job stop`"


def test_a_node_with_a_wrong_token_is_refused(cluster, tmp_path: Path) -> None:
    bad = tmp_path / "bad_token"
    bad.write_text("not-the-token\n")
    bad.chmod(0o600)

    joined = subprocess.run([sys.executable, "-m", "fedllm.appliance", "node", "join", "--head", cluster.head_address, "--token-file",
                             str(bad), "--group", "a", "--cpus", "1", "--name", "intruder", "--node-ip", "127.0.0.9"],
                            env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)

    assert joined.returncode == 1 and "refused this node's token" in " ".join(joined.stderr.split())
    assert "intruder" not in {n["labels"].get("node") for n in cluster.cli_json("node", "ls")}
    assert not pids_with("127.0.0.9")


def _once_then_sleep(marker: Path) -> list[str]:
    """A job that sleeps on its first attempt (to be killed) and ends at once on a later one."""
    code = ("import os, sys, time\n"
            "m = sys.argv[1]\n"
            "if os.path.exists(m): print('second attempt'); sys.exit(0)\n"
            "open(m, 'w').close(); print('first attempt', flush=True); time.sleep(120)\n")
    return [sys.executable, "-c", code, str(marker)]


def test_a_node_killed_mid_job_fails_it_naming_the_node_and_with_retries_it_completes_on_another(cluster, tmp_path: Path) -> None:
    # Without retries: FAILED, naming the node.
    _submit(cluster, "--group", "b", "--slots", "1", "--name", "doomed", "--program", "--", *_once_then_sleep(tmp_path / "m1"))
    cluster.wait(lambda: (tmp_path / "m1").exists(), 60, "the first attempt to start")
    node = where_it_ran(cluster.cli("job", "logs", "doomed").stdout)[0]["node_name"]
    node_id = cluster.node_id(node)
    cluster.kill(node)
    failed = _wait_state(cluster, "doomed", ("FAILED", "SUCCEEDED"), timeout_s=90)
    assert failed["state"] == "FAILED" and node_id[:12] in failed["reason"] and "died" in failed["reason"]
    cluster.join(node)  # the machine comes back as a new node of group b
    cluster.wait(lambda: sum(n["group"] == "b" for n in cluster.alive_nodes()) == 2, 90, "group b to have two nodes again")

    # With --retries 1: the job runs again on the other node of the group and completes.
    _submit(cluster, "--group", "b", "--slots", "1", "--retries", "1", "--name", "survivor", "--program", "--",
            *_once_then_sleep(tmp_path / "m2"))
    cluster.wait(lambda: (tmp_path / "m2").exists(), 60, "the first attempt to start")
    first = where_it_ran(cluster.cli("job", "logs", "survivor").stdout)[0]["node_name"]
    first_id = cluster.node_id(first)
    cluster.kill(first)
    done = _wait_state(cluster, "survivor", ("SUCCEEDED", "FAILED"), timeout_s=120)
    ran = where_it_ran(cluster.cli("job", "logs", "survivor").stdout)

    assert done["state"] == "SUCCEEDED" and done["attempts"] == 2
    # The first attempt's output died with its node; the second one's record says where it ran.
    assert ran[-1]["group"] == "b" and ran[-1]["node_name"] != first
    assert first_id[:12] in done["node_failures"][0] and "second attempt" in cluster.cli("job", "logs", "survivor").stdout


def test_a_training_job_registers_its_adapter_and_show_names_run_adapter_and_node(cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.train.conftest import arithmetic_records, write_jsonl

    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_records(8))
    _submit(cluster, "--group", "a", "--cpus", "1", "--name", "train-a", "--", "train", "--data", data, "--model", tiny_model_dir,
            "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "64", "--output", "jobbed")
    done = _wait_state(cluster, "train-a", ("SUCCEEDED", "FAILED"), timeout_s=240)
    logs = cluster.cli("job", "logs", "train-a").stdout

    assert done["state"] == "SUCCEEDED", logs[-3000:]
    assert done["adapter"] and done["adapter"].startswith("jobbed") and done["run"]
    assert where_it_ran(logs)[0]["node_name"] == "a1" and done["node_id"] == cluster.node_id("a1")
    assert (cluster.home / "adapters" / "jobbed").is_dir() and (cluster.home / "runs" / done["run"]).is_dir()


def _group_b_whole(cluster) -> None:
    """Both nodes of group b alive again (an earlier test may have killed one)."""
    for name in ("b1", "b2"):
        if cluster.procs[name].poll() is not None:
            cluster.join(name)
    cluster.wait(lambda: sum(n["group"] == "b" for n in cluster.alive_nodes()) == 2, 90, "group b to have two nodes")


def test_a_retried_training_job_resumes_its_run_from_the_last_checkpoint(cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.train.conftest import arithmetic_records, write_jsonl

    _group_b_whole(cluster)
    data = write_jsonl(tmp_path / "arith.jsonl", arithmetic_records(16))
    config = tmp_path / "often.yaml"
    config.write_text("train:\n  checkpoint_every_steps: 2\n")
    _submit(cluster, "--group", "b", "--slots", "1", "--cpus", "1", "--retries", "1", "--name", "train-r", "--",
            "--config", config, "train", "--data", data, "--model", tiny_model_dir, "--max-steps", "150", "--batch-size", "2",
            "--max-seq-len", "64", "--output", "resumed")
    run_dir = cluster.home / "runs" / "job-train-r"
    cluster.wait(lambda: (run_dir / "checkpoints" / "latest").is_file(), 180, "the first attempt's first checkpoint")
    first = where_it_ran(cluster.cli("job", "logs", "train-r").stdout)[0]["node_name"]
    cluster.kill(first)
    done = _wait_state(cluster, "train-r", ("SUCCEEDED", "FAILED"), timeout_s=300)
    logs = cluster.cli("job", "logs", "train-r").stdout
    resumed_at = [int(line.rsplit(" ", 1)[1]) for line in (run_dir / "train.log").read_text().splitlines() if "resumed from step" in line]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line]

    assert done["state"] == "SUCCEEDED" and done["attempts"] == 2, logs[-3000:]
    assert "resuming run job-train-r from its last checkpoint" in logs
    assert len(resumed_at) == 1 and 2 <= resumed_at[0] < 150  # the second attempt started where the first one saved
    assert steps == sorted(set(steps)) and steps[-1] == 150  # one metric row per step, none repeated
    assert done["run"] == "job-train-r" and done["adapter"].startswith("resumed") and where_it_ran(logs)[-1]["node_name"] != first


def test_the_consoles_jobs_client_lists_groups_and_a_submitted_training_job_with_its_log(cluster, tmp_path: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from fedllm.ui.jobs_client import JobsClient
    from fedllm.ui.tabs.jobs import job_rows, node_rows

    for key, value in cluster.env.items():
        if key.startswith("APPLIANCE_CLUSTER__"):
            monkeypatch.setenv(key, value)
    client = JobsClient(cluster.home)
    missing = tmp_path / "nowhere.jsonl"

    answer = client.submit_training("a", str(missing), 2, 1, 0, "from-console")
    job = answer.split()[1]
    _wait_state(cluster, job, ("FAILED", "SUCCEEDED"))
    rows = {r[0]: r for r in job_rows(client.jobs())}

    assert {r[0] for r in node_rows(client.nodes())} == {"a", "b", "head"}
    assert rows[job][1] == "FAILED" and rows[job][2] == "a"
    assert str(missing) in client.log_tail(job)  # the training command names the file it could not read


def test_a_worker_join_job_serves_chat_through_the_router_and_stopping_it_drains_then_removes_the_worker(cluster, tmp_path: Path) -> None:
    import threading

    import httpx

    from fedllm.appliance.cluster.ray_env import spare_port
    from fedllm.core.secrets import ensure_token

    router_home = tmp_path / "router"
    join_token, admin = ensure_token(router_home / "keys", "join_token"), ensure_token(router_home / "keys", "admin_token")
    key_file = tmp_path / "worker_key"
    key_file.write_text("job-worker-key-0123456789\n")
    key_file.chmod(0o600)
    router_port, backend_port = spare_port(), spare_port()
    router_url = f"http://127.0.0.1:{router_port}"
    router = subprocess.Popen([sys.executable, "-m", "fedllm.appliance", "serve", "--port", str(router_port)], cwd=REPO,
                              env={**cluster.env, "APPLIANCE_HOME": str(router_home), "APPLIANCE_SERVE__ALLOW_UNVERIFIED": "true"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # The job: a (fake) vLLM worker on its node, 8 tokens 0.5 s apart, and `appliance worker join` registering it;
    # secrets come from files.
    script = (f"export VLLM_API_KEY=$(cat {key_file}); "
              f"{sys.executable} -m fedllm.testing.fake_vllm --port {backend_port} --model joined-model --chunks 8 --chunk-delay-s 0.5 & "
              f"exec {sys.executable} -m fedllm.appliance worker join --router {router_url} --token-file {router_home / 'keys' / 'join_token'} "
              f"--url http://127.0.0.1:{backend_port} --region eu --heartbeat-s 1")
    headers = {"Authorization": f"Bearer {admin}"}
    streamed: list[str] = []
    first_token = threading.Event()
    seen: list[dict] = []

    def long_request() -> None:  # a stream in flight when the job is stopped
        with httpx.stream("POST", f"{router_url}/v1/chat/completions", timeout=60, json={
                "model": "joined-model", "stream": True, "messages": [{"role": "user", "content": "a long answer"}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    streamed.append(line[6:])
                    if len(streamed) == 2:
                        first_token.set()

    try:
        cluster.wait(lambda: _http_ok(f"{router_url}/health"), 60, "the router")
        _submit(cluster, "--group", "a", "--name", "worker", "--program", "--", "sh", "-c", script)
        cluster.wait(lambda: httpx.get(f"{router_url}/admin/workers", headers=headers, timeout=5).json(), 90, "the worker to join")
        answer = httpx.post(f"{router_url}/v1/chat/completions", timeout=30,
                            json={"model": "joined-model", "messages": [{"role": "user", "content": "hi"}]})
        in_flight = threading.Thread(target=long_request)
        in_flight.start()
        assert first_token.wait(30)
        watcher = threading.Thread(target=lambda: seen.extend(_fleet_until_empty(router_url, headers, 90)))
        watcher.start()  # what the router's fleet looks like from the stop until the worker has left
        cluster.cli("job", "stop", "worker")
        in_flight.join(60)
        watcher.join(100)
    finally:
        router.terminate()
        router.wait(timeout=30)

    assert join_token and answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    draining = [row["outstanding"] for row in seen if row and row["draining"]]
    assert draining and draining[0] == 1  # stopped: first no new requests while the stream is in flight ...
    assert streamed[-1] == "[DONE]" and sum('"content"' in c for c in streamed) >= 8  # ... which finished ...
    assert seen[-1] == {} and _state(cluster, "worker")["state"] == "STOPPED"  # ... then it left
    assert not pids_with(f"--port {backend_port}")


def _fleet_until_empty(router_url: str, headers: dict, timeout_s: float) -> list[dict]:
    """The router's one worker row, polled every 0.1 s until the fleet is empty ({} then) or `timeout_s` passed."""
    import time

    import httpx

    rows: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fleet = httpx.get(f"{router_url}/admin/workers", headers=headers, timeout=5).json()
        rows.append(fleet[0] if fleet else {})
        if not fleet:
            break
        time.sleep(0.1)
    return rows


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_drained_node_leaves_once_idle_and_a_removed_one_leaves_too(cluster) -> None:
    a1 = cluster.node_id("a1")
    b_nodes = [n["node_id"] for n in cluster.alive_nodes() if n["group"] == "b"]  # which ones survived the node deaths varies
    dead = [n for n in ("b1", "b2") if cluster.procs[n].poll() is not None]
    if dead:  # a node killed earlier rejoins, so that group b keeps a node after the removal
        cluster.join(dead[0])
        cluster.wait(lambda: sum(n["group"] == "b" for n in cluster.alive_nodes()) == len(b_nodes) + 1, 90, "a node of b to rejoin")
    b2 = b_nodes[0]

    drained = cluster.cli("node", "drain", a1[:12])
    cluster.wait(lambda: not any(n["node_id"] == a1 for n in cluster.alive_nodes()), 60, "the drained (idle) node to leave")
    refused = _submit(cluster, "--group", "a", "--program", "--", "true", check=False)
    removed = cluster.cli("node", "remove", b2[:12])
    cluster.wait(lambda: not any(n["node_id"] == b2 for n in cluster.alive_nodes()), 60, "the removed node to leave")

    assert "drained" in drained.stdout and "removed" in removed.stdout
    assert refused.returncode == 2 and "group 'a' has no live node" in " ".join(refused.stderr.split())
    assert any(n["group"] == "b" for n in cluster.alive_nodes())  # the other node of group b stays
