"""The RL loop across Ray nodes (ray.cluster_utils.Cluster on this machine): the learner on one node, sampler
replicas on others, placed by custom resources in one placement group per run; the faults it survives; and the
cluster scripts a user runs."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import tinker
from tinker import types

from rl.service.app import free_port

FAULTS = Path(__file__).with_name("cluster_faults.py")
BIN = Path(sys.executable).parent


def test_scripts_start_a_head_and_run_a_recipe_as_a_ray_job_and_rl_serve_on_it(tmp_path):
    scripts = Path(__file__).resolve().parents[1] / "scripts" / "cluster"
    # A head of its own (ports, temp dir) beside any other Ray on this machine, this pytest's included. The temp
    # dir is short, not tmp_path: Ray's socket paths under it must fit Unix's 107 characters.
    ray_dir, port, dashboard = tempfile.mkdtemp(prefix="rl-head-"), free_port(), free_port()
    environment = {**os.environ, "RL_RAY_PORT": str(port), "RL_JOB_ADDRESS": f"http://127.0.0.1:{dashboard}",
                   "RAY_ADDRESS": f"127.0.0.1:{port}"}
    started = subprocess.run([str(scripts / "start_head.sh"), "--num-cpus", "2", "--resources", '{"serve_node": 2}',
                              f"--temp-dir={ray_dir}", f"--dashboard-port={dashboard}",
                              f"--ray-client-server-port={free_port()}",
                              f"--dashboard-agent-listen-port={free_port()}"],
                             capture_output=True, text=True, timeout=300, env=environment)
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        job = subprocess.run([str(scripts / "submit.sh"), "rl-train", "recipe=arithmetic_rl", "cluster=ray",
                              "model=tiny", "steps=1", "eval_prompts=2", "algo.prompts_per_step=2",
                              "algo.max_tokens=4", f"hydra.run.dir={tmp_path / 'run'}"],
                             capture_output=True, text=True, timeout=600, env=environment)
        assert job.returncode == 0 and "succeeded" in job.stdout + job.stderr, (job.stdout + job.stderr)[-3000:]
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == [0, 1]
        serve_on_the_cluster(tmp_path, environment)
    finally:
        stop_head(ray_dir, port)
        shutil.rmtree(ray_dir, ignore_errors=True)


def stop_head(ray_dir: str, port: int) -> None:
    """Stops the head that ray_dir and port name, with every process it started, and nothing else: `ray stop`
    (scripts/cluster/stop.sh) would stop every Ray on the machine, and a process whose own Ray loses its GCS
    exits a minute later."""
    marks = (ray_dir, f":{port}")
    family = set()
    for process in psutil.process_iter(["cmdline"]):
        if process.pid != os.getpid() and any(mark in part for part in process.info["cmdline"] or ()
                                              for mark in marks):
            with contextlib.suppress(psutil.NoSuchProcess):
                family |= {process, *process.children(recursive=True)}
    for signal in ("terminate", "kill"):
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(member, signal)()
        _, family = psutil.wait_procs(family, timeout=30)


def serve_on_the_cluster(tmp_path: Path, environment: dict[str, str]) -> None:
    """`rl-serve address=auto` on the head: its learner and sampler are the cluster's actors (not a Ray of its
    own), placed by the custom resources they were given, and the SDK trains, saves (to learner_storage and
    storage_uri) and samples through them."""
    port, environment = free_port(), {**environment, "RAY_AUTH_MODE": "token", "TINKER_TELEMETRY": "0"}
    process = subprocess.Popen([str(BIN / "rl-serve"), "address=auto", f"port={port}", "models=[tiny]",
                                f"storage={tmp_path / 'serve'}", f"learner_storage={tmp_path / 'learner'}",
                                f"storage_uri=file://{tmp_path / 'bucket'}",
                                "+context.tiny=256", "max_lora_rank=8", "learner_resources={serve_node:1}",
                                "sampler_resources={serve_node:1}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    try:
        output = []
        while not (output and output[-1].startswith("rl-serve:")):
            assert process.poll() is None, "rl-serve exited: " + "".join(output)[-3000:]
            output.append(process.stdout.readline())
        listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--filter", "state=ALIVE", "--detail", "--format",
                                 "json"], capture_output=True, text=True, timeout=60, env=environment)
        assert listed.returncode == 0 and listed.stdout.startswith("["), listed.stdout + listed.stderr
        actors = json.loads(listed.stdout)
        assert sorted(actor["class_name"] for actor in actors) == ["Learner", "Sampler"], actors
        assert all(actor["required_resources"].get("serve_node") == 1.0 for actor in actors), actors
        service = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key="tml-anyone")
        try:
            trainer = service.create_lora_training_client(base_model="tiny", rank=8, seed=7).result()
            tokens = [5, 17, 33, 17, 33, 9]
            datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 5})
            losses = [trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]]
            trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            losses.append(trainer.forward([datum], "cross_entropy").result().metrics["loss:sum"])
            assert losses[1] < losses[0], losses
            trainer.save_state("kept").result()
            sampler = trainer.save_weights_and_get_sampling_client("kept-sampler")
            sampled = sampler.sample(types.ModelInput.from_ints(tokens[:3]), 2,
                                     types.SamplingParams(max_tokens=4, temperature=0)).result()
            assert [len(sequence.tokens) for sequence in sampled.sequences] == [4, 4]
            assert sampled.sequences[0].tokens == sampled.sequences[1].tokens, "greedy"
        finally:
            service.close("success").result()
        for home in ("learner", "bucket"):  # the learner's own folder, and the home every node reaches
            assert [path.name for path in (tmp_path / home).glob("*/weights/*")] == ["kept"], home
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_run_on_three_nodes_survives_faults_and_a_sweep_spreads_its_runs_over_nodes(
        tiny_model_dir, tmp_path):
    result = subprocess.run([sys.executable, str(FAULTS), str(tiny_model_dir), str(tmp_path)], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))[7:])
    events, nodes = report["events"], report["node_ids"]
    # The learner on the node with the learner resource, one replica on each of two sampler nodes; each step's
    # samples, from both nodes, have the logprobs the learner computes for them: both serve its weights.
    assert events["learner_node"] == nodes["A"]
    replica_nodes = events["replica_nodes"]
    assert len(set(replica_nodes)) == 2 and set(replica_nodes) <= {nodes["B"], nodes["C"], nodes["D"]}
    trained = [gap for gap in report["sampler_vs_learner"] if gap is not None]
    assert len(trained) >= 3 and max(trained) < 1e-6, report["sampler_vs_learner"]  # measured: ~1e-13
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
    # A sweep submitted as one driver (algo=ppo through rl-train's config group, wandb offline) ran its two runs at
    # once, one on each node that has room for a run, and was SIGKILLed once each run had saved a checkpoint; the
    # same command with resume=true continued each unfinished run from its checkpoint, in its folder.
    sweep = report["sweep"]
    assert sweep["returncode"] == 0 and sweep["status"] == ["done", "done"], sweep["output"]
    assert sweep["output_dirs"] == sweep["runs"], "each run continued in the first sweep's folder"
    # (Killed once both had saved one: the slower one at least was unfinished; a run that had finished is not run
    # again.)
    assert all(step is not None and 1 <= step <= 3 for step in sweep["killed_at"]), sweep["killed_at"]
    assert min(sweep["killed_at"]) < 3, sweep["killed_at"]
    for run, step in zip(sweep["runs"], sweep["killed_at"], strict=True):
        resumed = [line for line in sweep["resuming"] if f"resuming {run} at step" in line]
        if step == 3:
            assert not resumed, sweep["resuming"]
        else:
            assert len(resumed) == 1 and f"resuming {run} at step {step}" in resumed[0], sweep["resuming"]
    assert sweep["steps"] == [[0, 1, 2, 3], [0, 1, 2, 3]], "steps logged before the kill are kept once, the rest redone"
    assert "algo.learning_rate=0.01 | done" in sweep["output"] and "algo.learning_rate=0.003 | done" in sweep["output"]
    assert sweep["learners_at_once"] == 2, sweep
    placed = list(sweep["placed"].values())
    assert sorted(run["learner"] for run in placed) == sweep["node_ids"], sweep
    assert all(run["samplers"] == [run["learner"]] for run in placed), placed  # each run's actors on its node
    assert sweep["algo"]["loss_fn"] == "ppo" and sweep["algo"]["loss_fn_config"] == {
        "clip_low_threshold": 0.8, "clip_high_threshold": 1.2}, "the ppo config group, through rl-train"
    for wandb_runs, step in zip(sweep["wandb_runs"], sweep["killed_at"], strict=True):  # one more if resumed
        assert len(wandb_runs) == (1 if step == 3 else 2), wandb_runs
        assert len({name.rsplit("-", 1)[1] for name in wandb_runs}) == 1, "one wandb run id"
    assert sweep["placement_groups_left"] == [], "each run gave its placement group back"
