"""Packs across streams: students of other seeds, augmentation policies and extra inputs, each fed its own
batches and labelled by its own teacher in one wide network, against the same students trained alone; a
diverging student that leaves the others bit-identical; an exact resume; and what the planner groups."""

from __future__ import annotations

import pytest
import torch
from pack_runs import pack_weights, recorded, same, tiny

from kd_ray.config import TrialConfig
from kd_ray.packs.plan import plan_packs
from kd_ray.packs.run import FUSED, run_pack
from kd_ray.packs.streams import across_shape, fused_steps_pay
from kd_ray.study import Study
from kd_ray.tables import CKA_METRICS, TEACHER_METRICS
from kd_ray.train.setup import FINAL_METRICS, data_sizes
from kd_ray.train.trial import run_trial

# One stream per student: other seeds (other teachers), other policies, mixup, other label weights.
ACROSS = [dict(seed=0), dict(seed=1, augmentation="noise", temperature=4.0), dict(seed=0, augmentation="mixup"),
          dict(seed=2, alpha=0.5, teacher_members=1)]
EXTRAS = dict(extra_data=500, extra_source="gmm", extra_ratio=0.25)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("across_teachers"))


def assert_first_steps_alone(configs: list[TrialConfig], store: str) -> None:
    _, pack_checkpoints = recorded(configs, store)
    weights = pack_weights(pack_checkpoints[1])
    for k, cfg in enumerate(configs):
        checkpoints: dict[int, dict] = {}
        run_trial(cfg, lambda metrics, state, c=checkpoints: c.update({metrics["epoch"]: state}), store=store)
        for name, value in checkpoints[1]["train_state"]["model"].items():
            scale = max(1.0, float(value.abs().max()))
            torch.testing.assert_close(weights[k][name], value, rtol=1e-4, atol=1e-4 * scale,
                                       msg=f"student {k}: {name}")


def test_over_the_first_steps_students_of_other_streams_are_their_students_trained_alone(store):
    assert_first_steps_alone([tiny(steps=3, **changes) for changes in ACROSS], store)


def test_streams_with_extra_inputs_in_every_batch_draw_them_as_alone(store):
    assert_first_steps_alone([tiny(steps=3, seed=seed, **EXTRAS) for seed in (0, 1)], store)


def test_a_pack_across_streams_ends_where_its_students_trained_alone_end(store):
    configs = [tiny(**changes) for changes in ACROSS]
    packed = run_pack(configs, store=store)
    for cfg, result in zip(configs, packed):
        lone = run_trial(cfg, store=store)
        assert result["status"] == lone["status"] == "TERMINATED"
        assert result["teacher_key"] == lone["teacher_key"] == cfg.teacher_key()
        for name in ("epochs_completed", "student_steps", "teacher_steps", "distill_size"):
            assert result[name] == lone[name], name
        for metric in TEACHER_METRICS:
            assert result[metric] == pytest.approx(lone[metric], abs=1e-6), metric
        for metric in ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement", "val_agreement"):
            assert result[metric] == pytest.approx(lone[metric], abs=0.03), metric
        assert result["fast_path"] == f"fp32, {FUSED} across 4 streams (feature-major)"


def test_a_diverging_student_leaves_the_other_streams_bit_identical(store):
    healthy = [tiny(seed=0, temperature=1.0), tiny(seed=1, augmentation="noise")]
    diverging = tiny(seed=2, lr=1e6, lr_schedule="constant")
    with_it = run_pack([healthy[0], diverging, healthy[1]], store=store)
    without = run_pack(healthy, store=store)
    assert with_it[1]["status"] == "DIVERGED" and "non-finite" in with_it[1]["error"]
    for mine, theirs in zip([with_it[0], with_it[2]], without):
        assert mine["status"] == "TERMINATED"
        for metric in (*FINAL_METRICS, *CKA_METRICS, "convergence_delta"):
            assert same(mine[metric], theirs[metric]), metric


@pytest.mark.parametrize("epoch", [1, 2])
def test_a_resumed_pack_across_streams_ends_as_an_uninterrupted_one(store, epoch):
    configs = [tiny(seed=0), tiny(seed=1, augmentation="mixup", epochs=2), tiny(seed=0, augmentation="noise")]
    straight, checkpoints = recorded(configs, store)
    resumed = run_pack(configs, resume=checkpoints[epoch], store=store)
    for a, b in zip(straight, resumed):
        for metric in (*FINAL_METRICS, *CKA_METRICS, "epochs_completed", "convergence_delta"):
            assert same(a[metric], b[metric]), metric


def test_streams_whose_steps_differ_in_shape_are_refused_before_any_training(store, tmp_path):
    with pytest.raises(ValueError, match="differ in shape"):
        run_pack([tiny(seed=0), tiny(seed=1, distill_fraction=0.5)], store=str(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_the_planner_packs_streams_of_one_step_shape_together():
    grid = [tiny(seed=seed, augmentation=policy) for policy in ("baseline", "noise", "mixup") for seed in (0, 1, 2)]
    grid += [tiny(seed=seed, **EXTRAS) for seed in (0, 1, 2)]  # another step shape: extras ride in every batch
    packs = plan_packs(grid, min_packs=2, across=across_shape)
    assert [len(p.trial_indices) for p in packs] == [5, 4, 3]
    assert sorted(i for p in packs[:2] for i in p.trial_indices) == list(range(9))
    assert packs[2].trial_indices == (9, 10, 11)
    assert {grid[i].seed for i in packs[0].trial_indices} == {0, 1, 2}  # streams of every seed in one pack
    # Convolutional students cross streams where their fused (grouped) steps measure faster on the device.
    convnets = [TrialConfig(dataset="digits", teacher_arch="smallcnn", student_arch="smallcnn", norm="none", seed=seed,
                            augmentation=policy) for policy in ("baseline", "mixup") for seed in (0, 1)]
    pays = fused_steps_pay("smallcnn", "", "digits", "none", convnets[0].batch_size, "cpu")
    assert across_shape(convnets[0]) == ((data_sizes(convnets[0]).distill, 0) if pays else None)
    assert [p.size for p in plan_packs(convnets, across=across_shape)] == ([4] if pays else [1, 1, 1, 1])


def test_convolutional_students_of_other_streams_read_their_own_channels(store):
    images = dict(dataset="digits", teacher_arch="smallcnn", student_arch="smallcnn", norm="batch", batch_size=128)
    configs = [tiny(steps=3, **images, **changes) for changes in
               (dict(seed=0), dict(seed=1, augmentation="mixup"), dict(seed=0, augmentation="vflip"))]
    _, pack_checkpoints = recorded(configs, store)
    weights = pack_weights(pack_checkpoints[1], "smallcnn", (1, 8, 8), "batch", feature_major=False)
    for k, cfg in enumerate(configs):
        checkpoints: dict[int, dict] = {}
        run_trial(cfg, lambda metrics, state, c=checkpoints: c.update({metrics["epoch"]: state}), store=store)
        for name, value in checkpoints[1]["train_state"]["model"].items():
            scale = max(1.0, float(value.abs().max()))
            torch.testing.assert_close(weights[k][name], value, rtol=1e-4,
                                       atol=1e-4 * scale, msg=f"student {k}: {name}")


def test_a_study_packs_policies_and_seeds_together_and_writes_the_tables_of_a_trial_per_config(ray_local, tmp_path):
    grid = dict(base=tiny(epochs=2), arms=[{"augmentation": "baseline"}, {"augmentation": "noise"}], seeds=[0, 1])
    packed = Study(name="across", storage=str(tmp_path), verbose=0, **grid).run()
    alone = Study(name="alone", storage=str(tmp_path), verbose=0, pack="off", **grid).run()
    trials = packed.trials
    assert (packed.partial, len(trials)) == (False, 4) and (trials["status"] == "TERMINATED").all()
    # Two CPUs: two packs of two students, each pack two streams (its students' batches and teachers their own).
    assert trials["pack_id"].nunique() == 2 and (trials["pack_size"] == 2).all()
    assert trials["fast_path"].str.contains("across 2 streams").all()
    by_arm = ["augmentation", "seed"]
    mine, theirs = trials.set_index(by_arm).sort_index(), alone.trials.set_index(by_arm).sort_index()
    assert mine.index.equals(theirs.index) and (mine["teacher_key"] == theirs["teacher_key"]).all()
    for metric in ("test_acc", "test_agreement", "train_agreement", "aug_train_agreement", "val_agreement"):
        gap = (mine[metric] - theirs[metric]).abs().max()
        assert gap < 0.03, (metric, gap)
