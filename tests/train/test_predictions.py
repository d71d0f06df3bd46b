"""Per-example predictions (save_predictions): a real trial and a real pack write them at their final
evaluation, one Parquet file per student named by its trial_id, and their top-1 columns give the row's
agreement exactly."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from kd_ray import analysis
from kd_ray.config import TrialConfig
from kd_ray.packs.run import run_pack
from kd_ray.tables import packed_trial_id
from kd_ray.train.predictions import SPLITS, default_trial_id, prediction_table, predictions_path, top_k
from kd_ray.train.setup import TrialData
from kd_ray.train.teachers import TeacherStore, load_ensemble
from kd_ray.train.trial import run_trial

TINY = dict(dataset="mnist1d", teacher_arch="mlp", student_arch="mlp", teacher_epochs=2, teacher_members=2,
            epochs=2, eval_every=1, batch_size=256, device="cpu", precision="fp32", save_predictions=True)
K = 5  # mnist1d has 10 classes: k = min(5, 10)
CLASS_COLUMNS = {who: [f"{who}_top{r}_class" for r in range(1, K + 1)] for who in ("teacher", "student")}
PROB_COLUMNS = {who: [f"{who}_top{r}_prob" for r in range(1, K + 1)] for who in ("teacher", "student")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("prediction_teachers"))


@pytest.fixture(scope="module")
def lone_trial(store, tmp_path_factory):
    """A tiny trial with save_predictions, its row and the directory it wrote into."""
    cfg = TrialConfig(**TINY)
    predictions_dir = tmp_path_factory.mktemp("lone") / "predictions"
    result = run_trial(cfg, store=store, predictions_dir=str(predictions_dir), trial_id="t0")
    assert result["status"] == "TERMINATED", result["error"]
    return cfg, result, predictions_dir


def teacher_log_probs(cfg: TrialConfig, store: str) -> dict[str, torch.Tensor]:
    """The teacher's log-probabilities on each split, as the trial's metrics take them."""
    cpu = torch.device("cpu")
    data = TrialData(cfg, cpu, None)
    ensemble = load_ensemble(cfg, TeacherStore(store), cpu)
    test, train = data.teacher_log_probs(ensemble)
    return {"test": test, "val": data.teacher_val_log_probs(ensemble), "train": train}


def agreement_of(frame: pd.DataFrame) -> float:
    """The agreement the file gives: top-1 matches over the split's rows, as the metric (float32) computes it."""
    matches = (frame["teacher_top1_class"] == frame["student_top1_class"]).to_numpy()
    return torch.tensor(matches, dtype=torch.float32).mean().item()


def test_a_trial_writes_its_final_predictions_as_one_file(lone_trial, store) -> None:
    cfg, result, predictions_dir = lone_trial
    assert sorted(p.name for p in predictions_dir.iterdir()) == ["t0.parquet"]
    frame = pq.read_table(predictions_dir / "t0.parquet").to_pandas()
    assert list(frame.columns[:5]) == ["trial_id", "seed", "split", "example", "label"]
    assert list(frame.columns[5:]) == (CLASS_COLUMNS["teacher"] + PROB_COLUMNS["teacher"]
                                       + CLASS_COLUMNS["student"] + PROB_COLUMNS["student"])
    assert set(frame["trial_id"]) == {"t0"} and set(frame["seed"]) == {cfg.seed}
    assert list(frame["split"].unique()) == list(SPLITS)
    teacher = teacher_log_probs(cfg, store)
    for split, rows in frame.groupby("split", sort=False):
        assert rows["example"].tolist() == list(range(len(teacher[split])))
        # The teacher's top-1 is the argmax the agreement metrics take.
        np.testing.assert_array_equal(rows["teacher_top1_class"].to_numpy(), teacher[split].argmax(-1).numpy())
    data = TrialData(cfg, torch.device("cpu"), None)
    test = frame[frame["split"] == "test"]
    np.testing.assert_array_equal(test["label"].to_numpy(), data.y_test.numpy())
    # The final evaluation's, exactly: the top-1 columns give the row's agreement on each split.
    assert agreement_of(test) == result["test_agreement"]
    assert agreement_of(frame[frame["split"] == "val"]) == result["val_agreement"]
    assert agreement_of(frame[frame["split"] == "train"]) == result["train_agreement"]


def test_predicted_classes_are_distinct_and_their_probabilities_sorted(lone_trial) -> None:
    _, _, predictions_dir = lone_trial
    frame = pq.read_table(predictions_dir / "t0.parquet").to_pandas()
    for who in ("teacher", "student"):
        classes = frame[CLASS_COLUMNS[who]].to_numpy()
        probs = frame[PROB_COLUMNS[who]].to_numpy(dtype=np.float64)
        assert ((classes >= 0) & (classes < 10)).all()
        assert all(len(set(row)) == K for row in classes[:500])
        assert (probs > 0).all() and (np.diff(probs, axis=1) <= 0).all()
        assert (probs.sum(axis=1) <= 1 + 1e-6).all()  # the top 5 of 10 classes: at most all of the mass


def test_top_k_breaks_ties_as_argmax_does() -> None:
    scores = torch.tensor([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    classes, probs = top_k(scores, 3)
    assert classes.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert classes[:, 0].tolist() == scores.argmax(-1).tolist()
    assert probs[1].tolist() == pytest.approx([0.25] * 3)


def test_a_table_of_three_classes_keeps_three_and_refuses_an_unknown_split() -> None:
    teacher = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]).log()
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    table = prediction_table(teacher, student, torch.tensor([1, 0]), split="test", trial_id="x", seed=3)
    frame = table.to_pandas()
    assert "teacher_top3_class" in frame and "teacher_top4_class" not in frame  # k = min(5, classes)
    assert frame[["teacher_top1_class", "teacher_top2_class", "teacher_top3_class"]].values.tolist() == [
        [1, 2, 0], [0, 1, 2]]
    assert frame["teacher_top1_prob"].tolist() == pytest.approx([0.7, 0.6])
    assert frame["student_top1_class"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="split='holdout'"):
        prediction_table(teacher, student, torch.tensor([1, 0]), split="holdout", trial_id="x", seed=3)


def test_without_save_predictions_or_a_directory_nothing_is_written(store, tmp_path) -> None:
    cfg = TrialConfig(**{**TINY, "epochs": 1})
    run_trial(cfg.replace(save_predictions=False), store=store, predictions_dir=str(tmp_path / "off"))
    assert not (tmp_path / "off").exists()
    # Without a trial_id, the file is named by the config: the same trial run again replaces it.
    run_trial(cfg, store=store, predictions_dir=str(tmp_path / "on"))
    assert [p.name for p in (tmp_path / "on").iterdir()] == [f"{default_trial_id(cfg)}.parquet"]
    assert predictions_path(str(tmp_path / "on"), default_trial_id(cfg)).endswith(f"{default_trial_id(cfg)}.parquet")


def test_without_a_validation_split_the_file_has_test_and_train_rows(store, tmp_path) -> None:
    cfg = TrialConfig(**{**TINY, "epochs": 1, "teacher_members": 1, "val_fraction": 0.0})
    result = run_trial(cfg, store=store, predictions_dir=str(tmp_path), trial_id="noval")
    assert math.isnan(result["val_agreement"])
    frame = pq.read_table(tmp_path / "noval.parquet").to_pandas()
    assert list(frame["split"].unique()) == ["test", "train"]


def test_a_pack_writes_one_file_per_student_under_its_row_id(store, tmp_path) -> None:
    configs = [TrialConfig(**{**TINY, "temperature": 1.0}), TrialConfig(**{**TINY, "temperature": 4.0, "epochs": 1})]
    results = run_pack(configs, store=store, pack_id="p7", predictions_dir=str(tmp_path))
    assert all(r["status"] == "TERMINATED" for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{packed_trial_id('p7', i)}.parquet" for i in (0, 1)]
    for index in (0, 1):
        frame = pq.read_table(tmp_path / f"p7_{index}.parquet").to_pandas()
        assert set(frame["trial_id"]) == {f"p7_{index}"}
        # Each student at its own last epoch (the second stops after one): its row's agreement, exactly.
        assert agreement_of(frame[frame["split"] == "test"]) == results[index]["test_agreement"]
        assert agreement_of(frame[frame["split"] == "val"]) == results[index]["val_agreement"]
    # The ids a study gives the rows (a Ray Tune trial's id and the student's index) name the files.
    named = tmp_path.parent / "named"
    run_pack(configs, store=store, pack_id="pack0000", predictions_dir=str(named), trial_ids=["abc_0", "abc_1"])
    assert sorted(p.name for p in named.iterdir()) == ["abc_0.parquet", "abc_1.parquet"]
    with pytest.raises(ValueError, match="1 trial_ids for 2 students"):
        run_pack(configs, store=store, predictions_dir=str(named), trial_ids=["abc_0"])
    # A study's predictions, read back with pandas alone, join the trials table on trial_id.
    study = tmp_path.parent / "study"
    (study / "predictions").mkdir(parents=True)
    for path in tmp_path.iterdir():
        (study / "predictions" / path.name).write_bytes(path.read_bytes())
    loaded = analysis.load_predictions(study)
    assert sorted(loaded["trial_id"].unique()) == ["p7_0", "p7_1"]
    assert len(loaded) == sum(len(pq.read_table(p)) for p in tmp_path.iterdir())
    assert len(analysis.load_predictions(tmp_path)) == len(loaded)  # a predictions folder itself


def test_load_predictions_names_a_study_without_predictions(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no predictions here"):
        analysis.load_predictions(tmp_path)
    (tmp_path / "predictions").mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "predictions" / "x.parquet")
    with pytest.raises(analysis.TableError, match="column 'trial_id' is missing"):
        analysis.load_predictions(tmp_path)


def test_kd_ray_trial_writes_predictions_to_its_directory(store, tmp_path, monkeypatch, capsys) -> None:
    from kd_ray.cli import main

    monkeypatch.chdir(tmp_path)
    settings = [item for key, value in {**TINY, "epochs": 1}.items() for item in ("--set", f"{key}={value}")]
    assert main(["trial", *settings, "--store", store, "--quiet"]) == 0
    cfg = TrialConfig(**{**TINY, "epochs": 1})
    # By default into ./predictions, named by the config.
    assert [p.name for p in (tmp_path / "predictions").iterdir()] == [f"{default_trial_id(cfg)}.parquet"]
    assert main(["trial", *settings, "--store", store, "--predictions-dir", "elsewhere"]) == 0
    assert (tmp_path / "elsewhere" / f"{default_trial_id(cfg)}.parquet").is_file()
    assert f"per-example predictions: elsewhere/{default_trial_id(cfg)}.parquet" in capsys.readouterr().err


def test_kd_ray_trial_refuses_a_predictions_dir_it_would_not_use(tmp_path, capsys) -> None:
    from kd_ray.cli import main

    assert main(["trial", "--predictions-dir", str(tmp_path), "--quiet"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"kd-ray: error: --predictions-dir {tmp_path}: predictions are written only with "
                     "--set save_predictions=true"]
    (tmp_path / "file").write_text("")
    assert main(["trial", "--set", "save_predictions=true", "--predictions-dir", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--predictions-dir {tmp_path / 'file'}: a file, not a directory")
