"""The reference model's building blocks, registered by role and kind (edgemm.blocks.registry).

Roles and the modules that register them (importing a module registers its blocks):

- `vision`: the vision towers, under the config's `vision.arch` (edgemm.blocks.vision,
  edgemm.blocks.internvit, edgemm.blocks.resampler: Qwen-VL's, edgemm.blocks.dinov2: DINOv2, OmniFusion's two);
- `connector`: projectors, adapters and resamplers, under `adapter.kind` (edgemm.blocks.connectors,
  edgemm.blocks.qformer, edgemm.blocks.resampler: Qwen-VL's, edgemm.blocks.omnifusion: OmniFusion's);
- `layer`: the decoder layer kinds: the vision branch of a routed layer (edgemm.blocks.layers), the MoE FFN
  (edgemm.blocks.moe) and the gated cross-attention layer (edgemm.blocks.cross); edgemm.blocks.decoder composes
  them into DecoderLayer / Decoder.

edgemm.model.EdgeMM picks its tower, connector and layers from the registry. This package's __init__ imports
nothing: edgemm.blocks.registry, edgemm.blocks.params and edgemm.blocks.support are read without torch.
The block modules import edgemm.config and edgemm.errors only, never the layers above them (model, bundle,
checkpoint, info).
"""
