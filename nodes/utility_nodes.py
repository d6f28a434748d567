"""Hardware probe node: what runs fast on this ComfyUI's machine and why (ops/probe.py does the work)."""

from __future__ import annotations

from comfy_api.latest import io


class WanQuantProbe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="WanQuantProbe",
            display_name="Hardware probe (wanquant)",
            category="wanquant/utils",
            description="Reports, for this machine, which path each quantized Wan format runs (fp8 tensor cores, "
                        "NVFP4/MXFP8 kitchen kernels or dequantize) and why, with what to change to make it "
                        "faster, then runs a short benchmark (at most about 10 s) of each path at a Wan-14B FFN "
                        "shape as a ratio to bf16.",
            inputs=[io.Boolean.Input("benchmark", default=True,
                                     tooltip="Also run the short micro-benchmark (at most about 10 s; a 1/16 "
                                             "row slice of the shape on CPU). Off: only the capability report.")],
            outputs=[io.String.Output(display_name="report",
                                      tooltip="The probe report as text (also shown on the node).")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, benchmark=True):
        return float("nan")  # always rerun: the answer is about the machine now

    @classmethod
    def execute(cls, benchmark=True):
        import comfy.model_management as mm

        from ..ops.probe import probe, render

        text = render(probe(mm.get_torch_device(), bench=benchmark))
        return io.NodeOutput(text, ui={"text": [text]})


NODES = [WanQuantProbe]
