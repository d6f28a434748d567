"""The CPU fp8 decoder's numpy table stays out of torch.compile: traced under inference_mode (as
ComfyUI samples) it used to fail dynamo's own guard ("Guard failed on the same frame it was
created") and now is torch's cast, giving the same bits. Found by the GPU check's dynamo.explain
over a real Wan forward."""

import torch
import torch._dynamo as dynamo

from wanquant.ops.formats._common import fp8_decode


def test_fp8_decode_traces_without_breaks():
    w = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    eager = fp8_decode(w, torch.float32)
    dynamo.reset()
    with torch.inference_mode():  # as ComfyUI samples
        ex = dynamo.explain(lambda t: fp8_decode(t, torch.float32) * 2)(w)
    assert ex.graph_break_count == 0 and ex.graph_count == 1
    compiled = torch.compile(lambda t: fp8_decode(t, torch.float32), backend="eager")(w)
    # the same bits, NaN included, as torch's own cast
    assert torch.equal(compiled.view(torch.int32), eager.view(torch.int32))
    assert torch.equal(eager.view(torch.int32), w.to(torch.float32).view(torch.int32))

