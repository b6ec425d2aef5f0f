"""GPU smoke tests, marked `gpu`: `make test` deselects them and bench/gpu_check.sh runs them on a CUDA machine.

They import only flows.core, flows.gateways.gpus and flows.run.runjoin (torch, timm, pydantic, psutil, nvidia-ml-py):
a GPU image without Prefect, DVC or Textual can run them.
"""
