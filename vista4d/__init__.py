"""Vista4D (Eyeline-Labs, CVPR 2026) reshoot math in plain torch, without ComfyUI.

Vista4D re-renders a source video from a new camera path: the source frames are lifted to a
point cloud with per-frame depth and cameras, splatted into the target cameras, and the
finetuned Wan2.1-T2V-14B DiT fills in what the render lacks. This room holds the parts that
need no ComfyUI: the renderer (``render``), cameras and Plücker ray maps (``camera``) and the
token-stream layout the DiT expects (``streams``). ``nodes/`` builds the model and the nodes on it.
"""
