"""The list of node classes the extension registers; each node module adds its own."""

import importlib

# Modules (relative to this package) that define a module-level NODES list.
NODE_MODULES = ("loader_nodes", "pose_nodes", "lora_nodes", "utility_nodes", "vista4d_nodes")


def all_nodes():
    """Every module listed must import: a missing or broken node module is an error ComfyUI
    shows at start-up, never a silently smaller node list."""
    nodes = []
    for name in NODE_MODULES:
        nodes.extend(importlib.import_module(f".{name}", __package__).NODES)
    return nodes
