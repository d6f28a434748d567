"""The list of node classes the extension registers; each node module adds its own."""

import importlib
import logging

log = logging.getLogger(__name__)

# Modules (relative to this package) that define a module-level NODES list.
NODE_MODULES = ("loader_nodes", "pose_nodes", "lora_nodes", "utility_nodes")


def all_nodes():
    nodes = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f".{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(name):
                continue  # that node module is not part of this build
            raise
        nodes.extend(module.NODES)
    return nodes
