"""Serving a patched pipeline: requests with a schedule each, batched into one call.

- ``requests``: a request's fields, checked (``GenerationRequest``), and ``generate_batch``, which
  runs a list of them as batched pipeline calls with a schedule per image (``per_sample``); no server
  needed, any server can call it.
- ``ray_serve``: a Ray Serve deployment around it (``pip install "bypass_kernels[serve]"``).

Triton Inference Server serves exported graphs instead: ``bypass_kernels.export.triton_repo``.
"""
