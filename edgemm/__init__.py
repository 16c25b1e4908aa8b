"""edgemm: deploy multimodal LLMs with a routed visual expert decoder to edge machines.

`import edgemm` is cheap: torch, onnxruntime, tensorrt and llama_cpp load only where used.
"""
__version__ = "0.1.0"
