"""Experiment and demo code, kept apart from the library's core path (schedule → patch → op → kernels → export).

shapes.py    the synthetic shapes data set and its analytic read-back
digits.py    the biased handwritten-digits data set (scikit-learn's bundled ``load_digits``) and its classifier read-out
sampling.py  the DDIM loop shared by the CLI, ``generate`` and the bias experiment
training.py  UNet configs and the resumable, quality-gated training loop of the bias experiment
metrics.py   group shares, distance to the training mix, diversity, variance, and intervals

Nothing here is imported by ``import bypass_kernels``.
"""
