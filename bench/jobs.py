"""Jobs on the appliance's Ray cluster (issue 21): what scheduling through Ray costs.

A real cluster on this machine (the appliance's head, and one node of group `g` with 2 CPUs and 1 slot, each a
separate `ray start` process tree), then:

1. submit-to-running latency: `JobScheduler.submit` of a short program until Ray reports it RUNNING (median, p90);
2. a 2-step LoRA training of the embedded model, run directly (`python -m fedllm.appliance train ...`, OMP_NUM_THREADS=1)
   and as a job (`--cpus 1`: the launcher sets one thread), wall time side by side and their ratio;
3. N tiny jobs (`true`) through group `g`: all submitted at once, then throughput (jobs/s from the first submit to
   the last end) and how many did not end SUCCEEDED (lost).

    .venv/bin/python bench/jobs.py [--latency-runs 5] [--tiny-jobs 50] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedllm.testing.ray_cluster import LocalCluster  # noqa: E402

FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def scheduler_for(cluster: LocalCluster):
    from fedllm.appliance.cluster.head import connect
    from fedllm.core.settings import load_settings

    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith(("APPLIANCE_", "RAY_"))})
    return connect(load_settings())


def wait_state(sched, job_id: str, states: tuple[str, ...], timeout_s: float = 300.0, step_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rec = sched.reconcile_one(job_id)
        if rec.state in states or rec.final:
            return rec
        time.sleep(step_s)
    raise TimeoutError(f"job {job_id} not in {states} after {timeout_s} s")


def latency(sched, runs: int) -> dict[str, float]:
    from fedllm.appliance.cluster.group_resources import Resources
    from fedllm.appliance.cluster.jobs import JobRequest

    took = []
    for i in range(runs):
        t0 = time.perf_counter()
        rec = sched.submit(JobRequest(command=["sleep", "1"], group="g", program=True, name=f"lat-{i}", resources=Resources(cpus=1)))
        wait_state(sched, rec.job_id, ("RUNNING",))
        took.append(time.perf_counter() - t0)
        wait_state(sched, rec.job_id, FINAL)
    return {"median_s": statistics.median(took), "p90_s": sorted(took)[max(0, int(0.9 * len(took)) - 1)], "runs": len(took)}


def training(sched, cluster: LocalCluster, model_dir: Path, work: Path) -> dict[str, float]:
    from fedllm.appliance.cluster.group_resources import Resources
    from fedllm.appliance.cluster.jobs import JobRequest

    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "completion": str(2 * i)}) + "\n" for i in range(16)))
    args = ["train", "--data", str(data), "--model", str(model_dir), "--max-steps", "2", "--batch-size", "2", "--max-seq-len", "64"]
    env = {**cluster.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedllm.appliance", *args, "--output", "direct"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    direct = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = sched.submit(JobRequest(command=[*args, "--output", "asjob"], group="g", name="train-job", resources=Resources(cpus=1)))
    rec = wait_state(sched, rec.job_id, FINAL, timeout_s=600)
    as_job = time.perf_counter() - t0
    if rec.state != "SUCCEEDED":
        raise RuntimeError(f"the training job ended {rec.state}: {rec.reason}\n{sched.logs(rec.job_id)[-2000:]}")
    return {"direct_s": direct, "job_s": as_job, "ratio": as_job / direct}


def throughput(sched, n: int) -> dict[str, float]:
    from fedllm.appliance.cluster.group_resources import Resources
    from fedllm.appliance.cluster.jobs import JobRequest

    t0 = time.perf_counter()
    ids = [sched.submit(JobRequest(command=["true"], group="g", program=True, name=f"tiny-{i}", resources=Resources(cpus=1))).job_id
           for i in range(n)]
    submitted = time.perf_counter() - t0
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        sched.reconcile()
        states = {r.job_id: r.state for r in sched.store.all() if r.job_id in ids}
        if all(s in FINAL for s in states.values()):
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - t0
    lost = [j for j in ids if states.get(j) != "SUCCEEDED"]
    return {"jobs": n, "submit_all_s": submitted, "elapsed_s": elapsed, "jobs_per_s": n / elapsed, "lost": len(lost)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--tiny-jobs", type=int, default=50)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    from fedllm.core.model_store import prepare_model

    model_dir = prepare_model(ROOT / ".cache" / "test-home" / "models", cache_dir=ROOT / ".cache" / "wheels").path
    work = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    cluster = LocalCluster(work / "home", {"w": ("g", 2, 1)})
    results: dict[str, object] = {}
    try:
        t0 = time.perf_counter()
        cluster.start()
        results["cluster_start_s"] = time.perf_counter() - t0
        sched = scheduler_for(cluster)
        results["submit_to_running"] = latency(sched, args.latency_runs)
        print("submit -> RUNNING:", json.dumps(results["submit_to_running"]), flush=True)
        results["training_2_steps"] = training(sched, cluster, model_dir, work)
        print("2-step training, direct vs job:", json.dumps(results["training_2_steps"]), flush=True)
        results["tiny_jobs"] = throughput(sched, args.tiny_jobs)
        print(f"{args.tiny_jobs} tiny jobs through one group:", json.dumps(results["tiny_jobs"]), flush=True)
    finally:
        cluster.stop()
    print(json.dumps(results, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
