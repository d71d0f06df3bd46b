"""Analysis of trial tables with pandas alone: no torch, no Ray, so tables produced on a cluster can
be analysed on a laptop.

    from kd_ray import analysis
    df = analysis.load_trials("results/augmentation_ablation")      # one study, several, or a glob
    analysis.summarize(df, by=["augmentation", "temperature"])      # mean, sd, n, 95% CI per arm
    analysis.correlate(df, x="test_agreement", y="test_acc", by="augmentation")
    analysis.pareto_front(df, maximize=["test_agreement", "test_acc"])
    analysis.report("results/augmentation_ablation")                # report.md + figures/*.png
    analysis.load_predictions("results/augmentation_ablation")      # per-example predictions, if saved

Failed trials are never dropped on load: every row carries ``usable`` (status TERMINATED and finite
metrics) and ``excluded_reason``. The statistics functions leave unusable rows out unless
``include_failed=True`` and print how many they left out and why. A table without a column the
analysis needs, or with a known column of the wrong type, raises TableError; a trial read twice
counts once, and text cells beyond MAX_TEXT_CHARS are shortened, both said on stderr.

The submodules are layers, listed here bottom to top; each imports only those before it in the list:
_columns (the column names, derived from kd_ray.tables), _load, _predictions, _arms, _stats, _correlate,
_text, _figures, _report.
"""

# Layer order, bottom to top, rather than alphabetical: the imports read as the package is built.
# isort: off
from kd_ray.tables import (
    CKA_METRICS,
    CONTROL_METRICS,
    EPOCHS_FILE,
    FIDELITY_METRICS,
    GENERALIZATION_METRICS,
    METRICS,
    STATUSES,
    TEACHER_METRICS,
    TRIALS_FILE,
    VALIDATION_METRICS,
)
from kd_ray.analysis._columns import CONFIG_COLUMNS, FRACTION_METRICS
from kd_ray.analysis._load import (
    MAX_TEXT_CHARS,
    NONFINITE,
    TableError,
    flag_usable,
    load_epochs,
    load_trials,
    study_dirs,
)
from kd_ray.analysis._predictions import load_predictions
from kd_ray.analysis._arms import arm_columns
from kd_ray.analysis._stats import control_gap, mean_ci, pareto_front, present_metrics, summarize
from kd_ray.analysis._correlate import (
    BOOTSTRAP_MAX_N,
    CORRELATION_METHODS,
    correlate,
    resample_correlations,
)
from kd_ray.analysis._text import format_summary
from kd_ray.analysis._figures import figures
from kd_ray.analysis._report import FIGURES_DIR, REPORT_FILE, report
# isort: on

__all__ = [
    # names of the tables (kd_ray.tables) and of their columns
    "METRICS",
    "FIDELITY_METRICS",
    "GENERALIZATION_METRICS",
    "VALIDATION_METRICS",
    "TEACHER_METRICS",
    "CONTROL_METRICS",
    "CKA_METRICS",
    "FRACTION_METRICS",
    "CONFIG_COLUMNS",
    "STATUSES",
    "TRIALS_FILE",
    "EPOCHS_FILE",
    # loading
    "NONFINITE",
    "MAX_TEXT_CHARS",
    "TableError",
    "study_dirs",
    "load_trials",
    "load_epochs",
    "flag_usable",
    "load_predictions",
    # arms
    "arm_columns",
    # statistics
    "mean_ci",
    "present_metrics",
    "summarize",
    "pareto_front",
    "control_gap",
    # correlations
    "CORRELATION_METHODS",
    "BOOTSTRAP_MAX_N",
    "correlate",
    "resample_correlations",
    # text, figures, report
    "format_summary",
    "figures",
    "REPORT_FILE",
    "FIGURES_DIR",
    "report",
]
