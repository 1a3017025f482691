"""Runs the RL loop on a `ray.cluster_utils.Cluster` (several Ray nodes on this machine) and prints what a test
checks, as JSON. A script of its own because Ray allows one `ray.init` per process and the test session has
its own local Ray.

    python tests/cluster_scenario.py MODEL_DIR OUTPUT_DIR
"""

import asyncio
import json
import sys

import ray
from ray.cluster_utils import Cluster

from rl.config import AlgoConfig, ClusterConfig, LearnerConfig, LoggerConfig, ModelConfig, SamplerConfig, TrainConfig
from rl.driver import rl as rl_loop
from rl.driver.run import Run
from rl.tasks import Digits
from rl.types import ModelInput, SampleRequest, SamplingParams


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def main(model_dir: str, output_dir: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = {"A": cluster.add_node(num_cpus=1, resources={"learner_node": 1}, object_store_memory=200 * 2**20),
             "B": cluster.add_node(num_cpus=1, resources={"sampler_node": 1}, object_store_memory=200 * 2**20),
             "C": cluster.add_node(num_cpus=1, resources={"sampler_node": 1}, object_store_memory=200 * 2**20)}
    ray.init(address=cluster.address, log_to_driver=False)
    config = TrainConfig(
        steps=3, eval_every=10, eval_prompts=4, output_dir=output_dir,
        model=ModelConfig(name=model_dir, dtype="float32", lora_rank=8, max_model_len=256),
        algo=AlgoConfig(prompts_per_step=4, group_size=4, max_tokens=8, learning_rate=1e-2),
        learner=LearnerConfig(resources={"learner_node": 1}),
        sampler=SamplerConfig(replicas=2, resources={"sampler_node": 1}, threads=1),
        cluster=ClusterConfig(placement_strategy="SPREAD"), logger=LoggerConfig(wandb_mode="disabled"))
    history = rl_loop.train(config, Digits())

    # The same placement again, kept open to look inside: where each actor runs, and what each replica serves.
    with Run(config) as run:
        version = asyncio.run(run.publish("inspect"))
        replicas = run.pool._replicas
        request = SampleRequest(prompt=ModelInput.from_ints([1, 2, 3]), model_path=version.tinker_path,
                                sampling_params=SamplingParams(max_tokens=4, temperature=0.0))
        served = [ray.get(replica.actor.sample.remote(request, version)) for replica in replicas]
        report = {
            "steps": [record["step"] for record in history],
            "weights_steps": [record.get("sampler/weights_step") for record in history],
            "node_ids": {name: node.node_id for name, node in nodes.items()},
            "learner_node": node_of(run.learner),
            "replica_nodes": [node_of(replica.actor) for replica in replicas],
            "served_hashes": [response.content_hash for response in served],
            "published_hash": version.weights.content_hash,
            "served_tokens": [response.sequences[0].tokens for response in served],
        }
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
