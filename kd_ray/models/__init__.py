"""Models: the networks by name, and the ensemble rule.

- ``archs``: ``build_model(name, input_shape, classes, norm)`` and the stages CKA compares;
- ``ensembles``: ``ensemble_log_probs`` (the definition of a teacher's prediction) and two ways to run
  the members of an ensemble.

This face imports nothing itself: both submodules import torch.
"""
