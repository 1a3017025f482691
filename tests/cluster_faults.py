"""An RL run on a `ray.cluster_utils.Cluster` (several Ray nodes on this machine) and the faults it survives,
printed as JSON for a test to check. A script of its own because Ray allows one `ray.init` per process and the
test session has its own local Ray.

The run (learner on node A, two sampler replicas spread over nodes B, C and D) suffers, in order: a sampler
replica's process SIGKILLed during step 1; the learner's process SIGKILLed after step 2 is logged (restarted by
`rl-train` from the checkpoint of step 2); the node of a replica removed during step 4. Then a sweep of two runs
(`rl-train -m`, one driver process, algo=ppo, wandb offline) on two nodes added for it, SIGKILLed once each run has
saved a checkpoint; the same command with `resume=true` finishes it.

    python tests/cluster_faults.py MODEL_DIR OUTPUT_DIR
"""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from waiting import wait_until  # tests/, this script's folder

from rl import train
from rl.config import (
    AlgoConfig,
    ClusterConfig,
    LearnerConfig,
    LoggerConfig,
    ModelConfig,
    SamplerConfig,
    TaskConfig,
    TrainConfig,
)
from rl.driver.state import read_state


def logged_steps(folder: Path) -> list[int]:
    metrics = folder / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def alive(class_name: str) -> list:
    return list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])


def sigkill(actor) -> None:
    os.kill(actor.pid, signal.SIGKILL)


def inject_faults(cluster: Cluster, nodes: dict, folder: Path, events: dict) -> None:
    try:
        wait_until(lambda: 0 in logged_steps(folder))
        events["learner_node"] = alive("Learner")[0].node_id
        events["replica_nodes"] = [actor.node_id for actor in alive("Sampler")]
        victim = alive("Sampler")[0]
        sigkill(victim)
        events["sampler_killed_on"] = victim.node_id

        wait_until(lambda: 2 in logged_steps(folder))
        sigkill(alive("Learner")[0])
        events["learner_killed_after"] = logged_steps(folder)

        wait_until(lambda: 3 in logged_steps(folder))  # logged again after the restart
        replica = alive("Sampler")[0]
        name = next(name for name, node in nodes.items() if node.node_id == replica.node_id)
        cluster.remove_node(nodes[name])
        events["removed_node"] = replica.node_id
        events["replica_nodes_after"] = wait_until(
            lambda: len(found := [a.node_id for a in alive("Sampler") if a.node_id != replica.node_id]) == 2 and found)
    except Exception as error:  # reported, so the test shows what went wrong rather than a hang
        events["error"] = repr(error)


def rl_train(address: str, model_dir: str, *overrides: str, multirun: bool = False) -> list[str]:
    return [sys.executable, "-m", "rl.train", *(["-m"] if multirun else []), "recipe=arithmetic_rl", "task=digits",
            f"model.name={model_dir}",
            "model.dtype=float32", "model.lora_rank=8", "model.max_model_len=256", "eval_every=100", "eval_prompts=4",
            "algo.prompts_per_step=4", "algo.max_tokens=8", "cluster=ray",
            f"cluster.address={address}", *overrides]


def sweep_over_two_nodes(cluster: Cluster, address: str, model_dir: str, folder: Path) -> dict:
    """`rl-train -m` (algo=ppo, wandb offline) with two runs as one driver, on two nodes added for it that each hold
    one run (its learner and sampler packed on one node), SIGKILLed once both runs have saved a checkpoint; then the
    same command with resume=true, in a sweep folder beside the first, finishes both: where each run's actors ran,
    how many learners ran there at once, and what each run logged."""
    nodes = [cluster.add_node(num_cpus=2, resources={"sweep_node": 2}, object_store_memory=200 * 2**20)
             for _ in range(2)]
    cluster.wait_for_nodes()
    node_ids = {node.node_id for node in nodes}

    def placement() -> dict:
        """Each learner on those nodes: its node, and the nodes of its placement group's samplers."""
        found = {}
        for learner in alive("Learner"):
            if learner.node_id in node_ids:
                (detail,) = list_actors(filters=[("actor_id", "=", learner.actor_id)], detail=True)
                samplers = list_actors(filters=[("class_name", "=", "Sampler"), ("state", "=", "ALIVE"),
                                                ("placement_group_id", "=", detail.placement_group_id)])
                found[learner.actor_id] = {"learner": learner.node_id,
                                           "samplers": [actor.node_id for actor in samplers]}
        return found

    command = rl_train(address, model_dir, "algo=ppo", "algo.learning_rate=1e-2,3e-3", "steps=3",
                       "checkpoint_every=1", "learner.resources={sweep_node:1}", "sampler.resources={sweep_node:1}",
                       "cluster.placement_strategy=STRICT_PACK", "sweep.share=false", multirun=True)
    environment = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    killed = subprocess.Popen(command + [f"hydra.sweep.dir={folder / 'first'}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=environment)
    runs = [folder / "first" / str(index) for index in range(2)]
    placed, at_once = {}, 0

    def both_saved() -> bool:  # polled: where the runs' actors are is read while it waits
        nonlocal at_once
        found = placement()
        at_once = max(at_once, len(found))
        placed.update({actor: where for actor, where in found.items() if where["samplers"]})
        return all((read_state(run) or {"step": 0})["step"] >= 1 for run in runs) or killed.poll() is not None

    wait_until(both_saved)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed_at = [(read_state(run) or {"step": None})["step"] for run in runs]
    resumed = subprocess.run(command + ["resume=true", f"hydra.sweep.dir={folder / 'resumed'}"], capture_output=True,
                             text=True, timeout=600, env=environment)
    record = folder / "resumed" / "sweep.json"
    jobs = json.loads(record.read_text()) if record.exists() else []  # none: the driver's output says why
    output = resumed.stdout + resumed.stderr
    return {"node_ids": sorted(node_ids), "killed_at": killed_at, "returncode": resumed.returncode,
            "output": output[-3000:], "resuming": [line for line in output.splitlines() if "resuming " in line],
            "status": [job["status"] for job in jobs],
            "output_dirs": [job["output_dir"] for job in jobs], "runs": [str(run) for run in runs], "placed": placed,
            "learners_at_once": at_once, "steps": [logged_steps(run) for run in runs],
            "algo": json.loads((runs[0] / "config.json").read_text())["algo"],
            "wandb_runs": [sorted(path.name for path in (run / "wandb").glob("offline-run-*")) for run in runs],
            "placement_groups_left": [group["state"] for group in ray.util.placement_group_table().values()
                                      if group["state"] != "REMOVED"]}


def main(model_dir: str, output_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {"A": cluster.add_node(num_cpus=1, resources={"learner_node": 1}, object_store_memory=200 * 2**20)}
    for name in "BCD":
        nodes[name] = cluster.add_node(num_cpus=1, resources={"sampler_node": 1}, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address, log_to_driver=False)
    folder = Path(output_dir) / "faults"
    config = TrainConfig(
        steps=6, checkpoint_every=2, eval_every=100, eval_prompts=4, output_dir=str(folder),
        storage_uri=f"file://{Path(output_dir) / 'bucket'}",
        model=ModelConfig(name=model_dir, dtype="float32", lora_rank=8, max_model_len=256),
        algo=AlgoConfig(prompts_per_step=4, group_size=4, max_tokens=8, learning_rate=1e-2),
        task=TaskConfig(name="digits"), learner=LearnerConfig(resources={"learner_node": 1}),
        sampler=SamplerConfig(replicas=2, resources={"sampler_node": 1}, threads=1),
        cluster=ClusterConfig(placement_strategy="SPREAD"), logger=LoggerConfig(wandb_mode="disabled"))
    events: dict = {}
    injector = threading.Thread(target=inject_faults, args=(cluster, nodes, folder, events), daemon=True)
    injector.start()
    history = train.run(config)
    injector.join(timeout=300)
    report = {"node_ids": {name: node.node_id for name, node in nodes.items()}, "events": events,
              "history_steps": [record["step"] for record in history], "logged_steps": logged_steps(folder),
              "sampler_vs_learner": [record.get("kl/sampler_vs_learner_sq") for record in history],
              "bucket": sorted(path.name for path in (Path(output_dir) / "bucket").glob("*/weights/*")),
              "sweep": sweep_over_two_nodes(cluster, cluster.address, model_dir, Path(output_dir) / "sweep")}
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
