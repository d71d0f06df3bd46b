"""Training: the losses and metrics, teacher members, and one distillation trial end to end.

Submodules, each importing only those listed before it:

- ``losses``, ``metrics``, ``cka``: what a step minimises and what an evaluation measures;
- ``fastpath``: the execution of a trial's steps (precision, layout) chosen by timing;
- ``distill``: the one training loop (``fit``) and its schedule;
- ``teachers``: the content-addressed teacher store and the training of its members;
- ``setup``: what a trial and a pack share: the data (``TrialData``), the checks (``check_runnable``), the fast
  path, the student's recipe, the convergence rule and the result row (``result_row``);
- ``predictions``: a final student's per-example top-k predictions beside its teacher's, as Parquet;
- ``trial``: ``run_trial``, one teacher -> student trial, in named steps.

This face imports nothing itself: every submodule imports torch.
"""
