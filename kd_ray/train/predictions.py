"""Per-example predictions of a final student and its teacher, as one Parquet file per trial.

With ``TrialConfig.save_predictions`` and a predictions directory, ``run_trial`` and ``run_pack`` write
``<predictions_dir>/<trial_id>.parquet`` once per student, at its final evaluation (not at every
evaluation: a file holds the student that the trial's row describes). A student that diverged writes none.

One row per example of each evaluation split, the splits stacked (``split``: ``test``, ``val``, ``train``;
``train`` is the clean distillation set, extra inputs included; ``val`` is absent without validation
examples). Flat columns, one value a cell, so that pandas compares them directly::

    trial_id, seed, split, example, label,
    teacher_top1_class .. teacher_top{k}_class, teacher_top1_prob .. teacher_top{k}_prob,
    student_top1_class .. student_top{k}_class, student_top1_prob .. student_top{k}_prob

``example`` is the row's index within its split (the order of the split's tensors in ``TrialData``),
``label`` the split's label (-1 for an unlabelled extra input), k = min(5, classes). Classes are sorted by
probability, highest first; among equal scores the lower class comes first, so ``teacher_top1_class`` and
``student_top1_class`` are exactly the argmax that the agreement metrics take. Probabilities are at
temperature 1, float32 like every metric.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from kd_ray.atomic import write_atomic
from kd_ray.config import TrialConfig, content_hash

TOP_K = 5  # the classes kept per example: min(TOP_K, classes)
SPLITS = ("test", "val", "train")  # the order of the splits in a file


def predictions_path(predictions_dir: str, trial_id: str) -> str:
    """Where the predictions of trial ``trial_id`` go: ``<predictions_dir>/<trial_id>.parquet``."""
    return f"{str(predictions_dir).rstrip('/')}/{trial_id}.parquet"


def default_trial_id(cfg: TrialConfig) -> str:
    """The id of a trial run outside a study (``kd-ray trial``): from its config, so that running the same
    config again replaces its file rather than adding one."""
    return f"trial_{content_hash(cfg.to_dict())}"


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, k]`` classes and probabilities of the k highest ``scores`` (logits or log-probabilities) per row.
    A stable sort of the scores themselves keeps the lower class first among equal ones, as argmax does."""
    scores = scores.float()
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    probs = F.log_softmax(scores, dim=-1).exp().gather(-1, order)
    return order, probs


def prediction_table(teacher: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, *, split: str,
                     trial_id: str, seed: int) -> pa.Table:
    """One split's rows (see the module's docstring) from the teacher's log-probabilities and the student's
    logits (or log-probabilities) on it, ``[N, classes]`` each, and its ``[N]`` labels."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: allowed: {', '.join(SPLITS)}")
    n, classes = teacher.shape
    k = min(TOP_K, classes)
    columns: dict[str, pa.Array] = {
        "trial_id": pa.array([trial_id] * n, pa.string()),
        "seed": pa.array([seed] * n, pa.int64()),
        "split": pa.array([split] * n, pa.string()),
        "example": pa.array(range(n), pa.int64()),
        "label": pa.array(labels.detach().cpu().long().numpy(), pa.int64()),
    }
    for who, scores in (("teacher", teacher), ("student", student)):
        top_classes, top_probs = (t.detach().cpu().numpy() for t in top_k(scores, k))
        for rank in range(k):
            columns[f"{who}_top{rank + 1}_class"] = pa.array(top_classes[:, rank].astype("int64"), pa.int64())
        for rank in range(k):
            columns[f"{who}_top{rank + 1}_prob"] = pa.array(top_probs[:, rank], pa.float32())
    return pa.table(columns)


def write_predictions(predictions_dir: str, trial_id: str, seed: int,
                      splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]) -> str:
    """Write one trial's predictions atomically (``kd_ray.atomic``); the path written.

    ``splits``: by split name, (teacher log-probabilities, student logits, labels), or None for a split
    without examples (no validation split), which is left out."""
    tables = [prediction_table(*splits[name], split=name, trial_id=trial_id, seed=seed)
              for name in SPLITS if splits.get(name) is not None]
    table = pa.concat_tables(tables)
    return write_atomic(predictions_path(predictions_dir, trial_id), lambda stream: pq.write_table(table, stream))
