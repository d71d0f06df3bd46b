"""Linear CKA against a hand computation and numpy's HSIC, its invariances, each architecture's stage
outputs, and the CKA columns a trial reports and its row carries to trials.parquet."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from kd_ray import analysis
from kd_ray.models.archs import build_model, stage_modules
from kd_ray.study.live_tables import trial_rows
from kd_ray.tables import CKA_METRICS, EPOCHS_SCHEMA, TRIALS_SCHEMA, to_table, write_table
from kd_ray.train.cka import CKA_TEST_INPUTS, centred_gram, chosen_stages, linear_cka, stage_cka, stage_outputs
from kd_ray.train.setup import FINAL_METRICS
from kd_ray.train.trial import run_trial


def numpy_cka(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(K H L H) / (n - 1)^2 with the
    linear kernels K = X X^T, L = Y Y^T and the centring matrix H = I - 1 1^T / n."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def random(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- linear_cka -----------------------------------------------------------------------------------


def test_one_feature_by_hand() -> None:
    # Centred, x = (-1, 0, 1) and y = (-1, 1, 0): Yc^T Xc = 1, Xc^T Xc = Yc^T Yc = 2, so CKA = 1 / (2 * 2),
    # the squared correlation (1/2)^2 that CKA is for a single feature.
    x = torch.tensor([[1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [3.0], [2.0]])
    assert linear_cka(x, y) == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize(("n", "d1", "d2"), [(12, 5, 7), (12, 40, 50), (9, 3, 30)])
def test_matches_numpy_hsic(n: int, d1: int, d2: int) -> None:
    # (12, 5, 7) takes the feature form, the others the Gram form (d1 + d2 > n).
    x, y = random(n, d1, seed=1), random(n, d2, seed=2)
    y[:, 0] += 2.0 * x[:, 0]  # some shared signal, so the value is neither near 0 nor 1
    assert linear_cka(x, y) == pytest.approx(numpy_cka(x.numpy(), y.numpy()), rel=1e-10)
    assert linear_cka(x.float(), y.float()) == pytest.approx(numpy_cka(x.numpy(), y.numpy()), rel=1e-5)


def test_both_forms_agree() -> None:
    x, y = random(20, 6, seed=3), random(20, 4, seed=4) + random(20, 1, seed=3)
    gram_x, gram_y = centred_gram(x), centred_gram(y)
    by_grams = float((gram_x * gram_y).sum() / (gram_x.norm() * gram_y.norm()))
    assert linear_cka(x, y) == pytest.approx(by_grams, rel=1e-12)
    xc = x - x.mean(0)
    torch.testing.assert_close(gram_x, xc @ xc.T)


@pytest.mark.parametrize(("n", "d"), [(50, 8), (10, 64)])
def test_invariances(n: int, d: int) -> None:
    x, y = random(n, d, seed=5), random(n, d + 3, seed=6)
    y[:, :d] += x
    base = linear_cka(x, y)
    assert 0.05 < base < 0.99
    q, _ = torch.linalg.qr(random(d, d, seed=7))
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-9)  # orthogonal transform
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, rel=1e-9)  # isotropic scaling
    assert linear_cka(x + 3.0, y) == pytest.approx(base, rel=1e-9)  # a shift of every column
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, 2.0 * x @ q) == pytest.approx(1.0, abs=1e-12)
    # Not invariant to scaling one feature alone: the test above could fail.
    stretched = x.clone()
    stretched[:, 0] *= 10.0
    assert linear_cka(stretched, y) != pytest.approx(base, rel=1e-3)


def test_independent_features_give_a_small_value() -> None:
    assert linear_cka(random(2000, 10, seed=8), random(2000, 15, seed=9)) < 0.05


def test_constant_features_give_nan_and_bad_shapes_are_refused() -> None:
    assert math.isnan(linear_cka(torch.ones(10, 3), random(10, 2, seed=10)))
    with pytest.raises(ValueError, match=r"same n >= 2 rows; got \(10, 3\) and \(9, 2\)"):
        linear_cka(torch.zeros(10, 3), torch.zeros(9, 2))
    with pytest.raises(ValueError, match=r"\[n, d1\]"):
        linear_cka(torch.zeros(10), torch.zeros(10, 2))


# --- stages ---------------------------------------------------------------------------------------

STAGE_SIZES = [
    ("mlp", (1, 40), [256, 256]),
    ("mlp4-w0.5", (1, 40), [128] * 4),
    ("mlp", (1, 8, 8), [256, 256]),
    ("conv1d", (1, 40), [32 * 40, 64 * 20, 64 * 20, 128 * 10]),
    ("smallcnn", (1, 8, 8), [32 * 64, 32 * 64, 64 * 16, 64 * 16]),
    ("lenet5", (1, 28, 28), [6 * 14 * 14, 16 * 5 * 5]),
    ("vgg16", (3, 32, 32), [64 * 256, 128 * 64, 256 * 16, 512 * 4, 512]),
    ("preresnet20", (3, 32, 32), [16 * 1024, 32 * 256, 64 * 64]),
    ("preresnet20-w2", (3, 8, 8), [32 * 64, 64 * 16, 128 * 4]),
    ("preresnet56", (3, 8, 8), [64 * 64, 128 * 16, 256 * 4]),  # bottleneck blocks, expansion 4
]


@pytest.mark.parametrize(("arch", "shape", "sizes"), STAGE_SIZES, ids=[a for a, _, _ in STAGE_SIZES])
def test_stage_outputs_per_architecture(arch: str, shape: tuple[int, ...], sizes: list[int]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, shape, 10).train()
    outputs = stage_outputs(model, torch.rand(5, *shape), batch_size=2)  # batches of 2, 2 and 1
    assert [tuple(o.shape) for o in outputs] == [(5, size) for size in sizes]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outputs)
    assert model.training  # left in the mode it was in
    assert not any(m._forward_hooks for m in model.modules())  # the hooks are removed


def test_stage_outputs_are_the_stages_before_any_in_place_op() -> None:
    # Without norm, each block's ReLU runs in place on its input, the previous stage's output: the
    # captured layer1 output must still be the one layer1 computed (it has negative entries).
    torch.manual_seed(0)
    model = build_model("preresnet20", (3, 8, 8), 10, norm="none").eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        expected = model.layer1(model.conv(model.scale(x))).flatten(1)
    first = stage_outputs(model, x)[0]
    assert (expected < 0).any()
    torch.testing.assert_close(first, expected)


def test_stage_outputs_of_an_mlp_are_its_hidden_activations() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", (1, 40), 10).eval()
    x = torch.randn(6, 1, 40)
    with torch.no_grad():
        hidden1 = model[3](model[2](model[1](model[0](x))))
        hidden2 = model[6](model[5](model[4](hidden1)))
    outputs = stage_outputs(model, x)
    torch.testing.assert_close(outputs[0], hidden1)
    torch.testing.assert_close(outputs[1], hidden2)


def test_a_model_not_from_build_model_names_no_stages() -> None:
    with pytest.raises(ValueError, match="names no stages"):
        stage_modules(torch.nn.Linear(3, 2))


def test_chosen_stages() -> None:
    assert [chosen_stages(k) for k in range(1, 6)] == [[0], [0, 1], [0, 1, 2], [0, 2, 3], [0, 2, 4]]


def test_stage_cka_of_a_network_with_itself_and_with_another() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 40)
    conv = build_model("conv1d", (1, 40), 10)
    same = stage_cka(conv, conv, x)
    assert list(same) == list(CKA_METRICS)
    assert all(v == pytest.approx(1.0, abs=1e-9) for v in same.values())
    mlp = build_model("mlp", (1, 40), 10)
    mixed = stage_cka(conv, mlp, x)  # conv1d: stages 1, 3, 4 of 4; mlp: both of its 2
    assert all(0.0 <= mixed[k] <= 1.0 for k in CKA_METRICS[:2]) and math.isnan(mixed["cka_stage3"])
    conv_stages = stage_outputs(conv, x)
    mlp_stages = stage_outputs(mlp, x)
    assert mixed["cka_stage2"] == pytest.approx(linear_cka(conv_stages[2], mlp_stages[1]), rel=1e-9)


# --- in a trial -----------------------------------------------------------------------------------


def test_cka_columns_are_measured_once_after_training() -> None:
    assert not set(CKA_METRICS) & set(FINAL_METRICS)
    assert all(TRIALS_SCHEMA.field(name).type == pa.float64() for name in CKA_METRICS)
    assert not set(CKA_METRICS) & set(EPOCHS_SCHEMA.names)
    assert set(CKA_METRICS) <= set(analysis.METRICS)


def test_trials_report_cka_and_their_rows_carry_it(base_cfg, shared_teacher, tmp_path) -> None:
    # The default two-layer mlp has two stages; an mlp4 teacher and student have three chosen ones.
    deeper = dict(teacher_arch="mlp4", student_arch="mlp4", teacher_members=1, teacher_epochs=2)
    configs = [base_cfg.replace(epochs=1), base_cfg.replace(epochs=1, **deeper)]
    two, three = (run_trial(cfg) for cfg in configs)
    assert CKA_TEST_INPUTS < 10_000  # a subset of mnist1d's test set
    for result, finite in ((two, CKA_METRICS[:2]), (three, CKA_METRICS)):
        assert result["status"] == "TERMINATED"
        assert all(0.0 <= result[k] <= 1.0 for k in finite), {k: result[k] for k in CKA_METRICS}
    assert math.isnan(two["cka_stage3"])
    # Trained on the same data for the same task, student and teacher are alike but not identical.
    assert 0.3 < two["cka_stage2"] < 0.9999
    rows = [trial_rows("s", f"t{i}", cfg.to_dict(), {**result, "final": True}, None, None)[0]
            for i, (cfg, result) in enumerate(zip(configs, (two, three)))]
    write_table(to_table(rows, TRIALS_SCHEMA), str(tmp_path / "s" / "trials.parquet"))
    df = analysis.load_trials(tmp_path / "s")
    np.testing.assert_allclose(df[list(CKA_METRICS)].to_numpy(dtype=float),
                               [[two[k] for k in CKA_METRICS], [three[k] for k in CKA_METRICS]])
    assert df["usable"].all()  # a NaN stage is no reason to drop a trial
    summary = analysis.summarize(df, by=["student_arch"], verbose=False)
    assert set(CKA_METRICS) <= set(summary["metric"])


def test_a_diverged_trial_reports_nan_cka(base_cfg, shared_teacher) -> None:
    result = run_trial(base_cfg.replace(lr=1e6, lr_schedule="constant", epochs=2))
    assert result["status"] == "DIVERGED"
    assert all(math.isnan(result[k]) for k in CKA_METRICS)
