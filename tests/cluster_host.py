"""A real multi-node Ray cluster on this machine, in a process of its own, driven over stdin.

``python cluster_host.py TEMP_DIR NODES`` starts ``ray.cluster_utils.Cluster``: a head with no
CPUs (no worker lands on it, as on KubeRay) and NODES worker nodes of 1 CPU each, then prints
``address <gcs address>`` and one ``ok ...`` line per command it reads:

- ``add``: a worker node joins (prints its index and Ray node id);
- ``remove I``: worker node I is lost (its processes killed, not drained); ``remove_id ID``: the
  worker node whose Ray node id starts with ID;
- ``kill_head``: the head is lost (its GCS server killed; its raylet goes on, as a head pod's
  processes may, but the cluster has no GCS any more);
- ``nodes``: the Ray node ids of the worker nodes alive;
- ``shutdown``: every process of this cluster stops (and only of this cluster: never ``ray stop``).

Token authentication is on when the environment has ``RAY_AUTH_MODE=token`` and a token
(``RAY_AUTH_TOKEN_PATH``). It runs apart from pytest so that Ray's process-wide state (the
address file of ``ray.init()``, the auth mode) never mixes with the test session's own Ray.
"""

from __future__ import annotations

import sys


def main() -> None:
    from ray.cluster_utils import Cluster

    temp_dir, count = sys.argv[1], int(sys.argv[2])
    head = {"num_cpus": 0, "temp_dir": temp_dir, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=head, shutdown_at_exit=True)
    nodes = {}

    def add() -> int:
        index = len(nodes)
        nodes[index] = cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        return index

    for _ in range(count):
        add()
    cluster.wait_for_nodes()
    print(f"address {cluster.address}", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "add":
            index = add()
            cluster.wait_for_nodes()
            print(f"ok {index} {nodes[index].node_id}", flush=True)
        elif words[0] in ("remove", "remove_id"):
            index = int(words[1]) if words[0] == "remove" else next(
                i for i, n in nodes.items() if n.node_id.startswith(words[1]))
            cluster.remove_node(nodes.pop(index), allow_graceful=False)
            print("ok", flush=True)
        elif words[0] == "kill_head":
            cluster.head_node.kill_gcs_server()
            print("ok", flush=True)
        elif words[0] == "nodes":
            print("ok " + " ".join(nodes[i].node_id for i in sorted(nodes)), flush=True)
        elif words[0] == "shutdown":
            break
    try:
        cluster.shutdown()
    except Exception:  # a head already lost: stop the rest of its processes anyway
        for node in [*nodes.values(), cluster.head_node]:
            try:
                node.kill_all_processes(check_alive=False, allow_graceful=False)
            except Exception:
                pass
    print("ok", flush=True)


if __name__ == "__main__":
    main()
