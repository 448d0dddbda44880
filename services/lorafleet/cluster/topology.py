"""Which processes make up a local cluster, and how they find each other."""

from __future__ import annotations

import json

from lorafleet.api.scheduler.v1 import scheduler_pb2
from lorafleet.cluster.local import LocalCluster, ServiceSpec

SCHEDULER_SERVICE = scheduler_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name

# Start order matters: everyone resolves adapters through the registry, and the
# scheduler is told about nodes that already serve.


def start_local_mesh(
    cluster: LocalCluster,
    *,
    nodes: int = 1,
    slots_per_node: int = 8,
    max_rank: int = 16,
    base_model: str = "tiny",
    scheduler_replicas: int = 1,
) -> dict[str, str]:
    """Start registry, `nodes` x (trainer + rollout) and the scheduler (as
    `scheduler_replicas` replicas: "scheduler" leads, "scheduler-1"... stand by);
    wait for each to report SERVING. Returns name -> address."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    if scheduler_replicas < 1:
        raise ValueError(f"scheduler_replicas must be >= 1, got {scheduler_replicas}")
    # The registry reads by-reference publishes only inside each node's own
    # cache directory (relative paths resolve against the run directory).
    file_roots = {f"node-{i}": f"var/node-{i}" for i in range(nodes)}
    registry = cluster.start_and_wait(
        ServiceSpec(
            "registry", "registry", {"LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps(file_roots)}
        )
    )
    shared = {"REGISTRY_ADDRESS": registry}
    node_specs = []
    for index in range(nodes):
        cache = f"var/node-{index}/adapters"
        capacity = {
            "trainer": {"MAX_ADAPTERS": slots_per_node, "MAX_RANK": max_rank},
            "rollout": {"MAX_LORAS": slots_per_node, "MAX_LORA_RANK": max_rank},
        }
        for service in ("trainer", "rollout"):
            prefix = f"LORAFLEET_{service.upper()}_"
            env = {
                f"{prefix}REGISTRY_ADDRESS": shared["REGISTRY_ADDRESS"],
                f"{prefix}ADAPTER_CACHE_DIR": cache,
                f"{prefix}NODE_ID": f"node-{index}",
            }
            env.update({f"{prefix}{k}": str(v) for k, v in capacity[service].items()})
            node_specs.append(ServiceSpec(f"{service}-{index}", service, env))
    # Nodes start (their engines load concurrently) and stop in parallel: no
    # node service calls another.
    cluster.start_together(node_specs)
    for spec in node_specs:
        cluster.wait_serving(spec.name)
    nodes_config = [
        {
            "node_id": f"node-{index}",
            "rollout_address": cluster.services[f"rollout-{index}"].address,
            "trainer_address": cluster.services[f"trainer-{index}"].address,
            "base_model": base_model,
            "slots": slots_per_node,
            "max_rank": max_rank,
        }
        for index in range(nodes)
    ]
    scheduler_env = {
        "LORAFLEET_SCHEDULER_REGISTRY_ADDRESS": shared["REGISTRY_ADDRESS"],
        "LORAFLEET_SCHEDULER_NODES": json.dumps(nodes_config),
    }
    for index in range(scheduler_replicas):
        # Fixed replica names: a replica restarted while the lease still names
        # it takes the lease back at once instead of waiting out its own.
        env = {**scheduler_env, "LORAFLEET_SCHEDULER_REPLICA_ID": f"scheduler-{index}"}
        if index == 0:  # the first leads: the cluster is ready when it does
            cluster.start_and_wait(
                ServiceSpec("scheduler", "scheduler", env, ready_when=SCHEDULER_SERVICE)
            )
        else:  # the others stand by: ready when alive
            cluster.start_and_wait(ServiceSpec(f"scheduler-{index}", "scheduler", env))
    cluster.write_manifest()
    return cluster.addresses()


def scheduler_replicas(cluster: LocalCluster) -> list[str]:
    """The names of the cluster's scheduler replicas, "scheduler" first."""
    return sorted(n for n, s in cluster.services.items() if s.spec.service == "scheduler")
