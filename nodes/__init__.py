"""Everything that imports ComfyUI lives under this package (thin V3 nodes and the bridge)."""

from comfy_api.latest import ComfyExtension


class WanquantExtension(ComfyExtension):
    """Collects the node classes of every wanquant node module."""

    async def get_node_list(self):
        from . import registry

        return registry.all_nodes()


async def comfy_entrypoint() -> ComfyExtension:
    return WanquantExtension()
