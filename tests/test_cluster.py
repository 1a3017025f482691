"""The RL loop across Ray nodes (ray.cluster_utils.Cluster on this machine): the learner on one node, sampler
replicas on two others, placed by custom resources in one placement group per run."""

import json
import subprocess
import sys
from pathlib import Path

SCENARIO = Path(__file__).with_name("cluster_scenario.py")


def test_learner_and_samplers_on_separate_nodes_and_weights_reach_both(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(SCENARIO), str(tiny_model_dir), str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    nodes = report["node_ids"]
    assert report["steps"] == [0, 1, 2, 3] and report["weights_steps"][:3] == [0, 1, 2]
    assert report["learner_node"] == nodes["A"]
    assert sorted(report["replica_nodes"]) == sorted([nodes["B"], nodes["C"]]), "one replica on each sampler node"
    assert report["served_hashes"] == [report["published_hash"]] * 2, "both nodes serve the published weights"
    assert report["served_tokens"][0] == report["served_tokens"][1]


def test_scripts_start_a_head_and_run_a_recipe_as_a_ray_job(tmp_path):
    scripts = Path(__file__).resolve().parents[1] / "scripts" / "cluster"
    started = subprocess.run([str(scripts / "start_head.sh"), "--num-cpus", "2"], capture_output=True, text=True,
                             timeout=300)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        job = subprocess.run([str(scripts / "submit.sh"), "rl-train", "recipe=arithmetic_rl", "cluster=ray",
                              "model=tiny", "steps=1", "eval_prompts=2", "algo.prompts_per_step=2",
                              "algo.max_tokens=4", f"hydra.run.dir={tmp_path / 'run'}"],
                             capture_output=True, text=True, timeout=600)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-3000:]
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == [0, 1]
    finally:
        subprocess.run([str(scripts / "stop.sh")], capture_output=True, timeout=120)


def test_a_run_survives_a_killed_sampler_a_killed_learner_a_lost_node_and_a_killed_driver(tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(SCENARIO.with_name("cluster_faults.py")), str(tiny_model_dir),
                             str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    events, nodes = report["events"], report["node_ids"]
    assert "error" not in events, events
    # The sampler killed mid-step 1 was replaced and the step completed; the learner killed after step 2 was
    # restarted from the checkpoint of step 2, which redid step 2: every step is logged once, none lost.
    assert events["sampler_killed_on"] in (nodes["B"], nodes["C"], nodes["D"])
    assert events["learner_killed_after"][-1] == 2
    assert "restart 1 of 3, from step 2" in result.stderr
    assert report["logged_steps"] == report["history_steps"] == [0, 1, 2, 3, 4, 5, 6]
    assert report["bucket"] == ["step-2", "step-4", "step-6"], "checkpoints reached the storage URI"
    # The replica of the removed node runs again on a remaining sampler node.
    after = events["replica_nodes_after"]
    assert events["removed_node"] not in after and len(after) == 2
    assert set(after) <= {nodes["B"], nodes["C"], nodes["D"]} - {events["removed_node"]}
    # The driver SIGKILLed after its checkpoint of step 2: resume=true continued from there to the end.
    driver = report["driver"]
    assert driver["killed_at_checkpoint"] >= 2 and driver["resume_returncode"] == 0, driver["resume_output"]
    assert f"at step {driver['killed_at_checkpoint']}" in driver["resume_output"]
    assert driver["steps"] == [0, 1, 2, 3, 4, 5], "steps logged before the kill are kept once, the rest redone"
    # A sweep of two runs on the cluster: both ran, and each gave its placement group back.
    sweep = report["sweep"]
    assert sweep["returncode"] == 0, sweep["output"]
    assert sweep["runs"] == {"0": [0, 1], "1": [0, 1]} and sweep["placement_groups_left"] == []
