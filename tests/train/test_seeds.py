"""Independent random streams: no two draws of a study coincide.

Teacher members, control members, students and control students each take their own streams
(initial weights, batch order, augmentation draws); per-seed teachers give every replicate its own
ensemble; a step budget fixes the optimizer steps whatever the data size.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kd_ray.config import STREAM_KINDS, network_streams, seed_stream
from kd_ray.tables import TRIALS_SCHEMA, to_table
from kd_ray.train import teachers
from kd_ray.train import trial as trial_module
from kd_ray.train.distill import batches_per_epoch
from kd_ray.train.setup import CONVERGED_WITHIN, TrialData, student_recipe
from kd_ray.train.teachers import ensure_members, load_ensemble, member_key, member_streams
from kd_ray.train.trial import build_student_state, run_trial

CPU = torch.device("cpu")
SEEDS = range(5)
MEMBERS = range(5)


# --- seed_stream ---------------------------------------------------------------------------------


def test_seed_stream_is_distinct_across_kinds_and_keys() -> None:
    keys = [(), (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 2), (2, 1, 0), (2**32 - 1,)]
    values = [seed_stream(kind, *key) for kind in STREAM_KINDS for key in keys]
    assert len(set(values)) == len(values)
    assert all(isinstance(v, int) and 0 <= v < 2**63 for v in values)
    # numpy's SeedSequence alone maps [a] and [a, 0] to one state; the streams keep them apart.
    assert np.random.SeedSequence([5]).generate_state(1) == np.random.SeedSequence([5, 0]).generate_state(1)
    assert seed_stream("student_init", 5) != seed_stream("student_init", 5, 0)
    assert seed_stream("student_init", 3) == seed_stream("student_init", 3)


def test_seed_stream_is_stable_across_processes() -> None:
    code = "from kd_ray.config import seed_stream; print(seed_stream('member_init', 0, 3, 1))"
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert int(out.stdout) == seed_stream("member_init", 0, 3, 1)


@pytest.mark.parametrize(("kind", "key", "match"), [
    ("student", (0,), "unknown stream kind"),
    ("student_init", (-1,), r"\[0, 2\*\*32\)"),
    ("student_init", (2**32,), r"\[0, 2\*\*32\)"),
    ("student_init", (True,), r"\[0, 2\*\*32\)"),
    ("student_init", (1.0,), r"\[0, 2\*\*32\)"),
])
def test_seed_stream_refuses_bad_kinds_and_keys(kind: str, key: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        seed_stream(kind, *key)


def test_network_streams_take_one_kind_per_draw() -> None:
    student = network_streams("student", 0)
    assert student == (seed_stream("student_init", 0), seed_stream("student_batches", 0),
                       seed_stream("student_augment", 0))
    assert len(set(student)) == 3
    with pytest.raises(ValueError, match="unknown stream kind"):
        network_streams("teacher", 0)


# --- who draws what: the actual initial weights and generators ---------------------------------


def _random_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a network's seed draws (weight matrices); norm scales and counters start fixed."""
    return {k: v for k, v in state.items() if v.is_floating_point() and v.dim() > 1}


def _same_start(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two initial states share any randomly drawn tensor."""
    a, b = _random_tensors(a), _random_tensors(b)
    assert a and a.keys() == b.keys()
    return any(torch.equal(a[k], b[k]) for k in a)


def _first_order(generator_state: torch.Tensor, n: int) -> torch.Tensor:
    generator = torch.Generator()
    generator.set_state(generator_state)
    return torch.randperm(n, generator=generator)


@pytest.fixture(scope="module")
def member_draws(base_cfg, mnist1d_arrays):
    """What ``teachers.train_member`` hands its training loop, for seeds 0..4 x members 0..4, the
    control's members too, and the shared ensemble's: the initial weights and both generators."""
    draws: dict[tuple, dict] = {}
    real_fit = teachers.fit

    def capture(state, *args, **kwargs):
        capture.seen = {
            "init": {k: v.clone() for k, v in state.model.state_dict().items()},
            "batches": state.generator.get_state(), "augment": state.augment_generator.get_state(),
        }

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teachers, "fit", capture)  # only the draws matter here: skip the training itself
        configs = [("per_seed", seed, base_cfg.replace(seed=seed)) for seed in SEEDS]
        configs.append(("shared", None, base_cfg.replace(teacher_sharing="shared")))
        for sharing, seed, cfg in configs:
            for role in ("reference", "control"):
                for member in MEMBERS:
                    weights, _, _ = teachers.train_member(cfg, member, mnist1d_arrays, CPU, role)
                    for name, value in weights["initial"].items():  # the stored initial weights are these
                        assert torch.equal(value, capture.seen["init"][name])
                    draws[(sharing, seed, role, member)] = capture.seen
    assert teachers.fit is real_fit
    return draws


@pytest.fixture(scope="module")
def student_states(base_cfg, session_store, shared_teacher):
    """The students and control students of seeds 0..4 (random init), as run_trial builds them."""
    ensemble = load_ensemble(base_cfg, session_store, CPU)  # unused by a random init, which is all it needs
    data = TrialData(base_cfg, CPU, None)
    states = {}
    for seed, network in itertools.product(SEEDS, ("student", "control_student")):
        cfg = base_cfg.replace(seed=seed)
        states[(seed, network)] = build_student_state(cfg, student_recipe(cfg), ensemble, data, CPU, None, network)
    return states, data.x.shape[0]


def test_no_student_starts_where_a_teacher_member_started(member_draws, student_states) -> None:
    states, _ = student_states
    for (seed, network), state in states.items():
        student = state.model.state_dict()
        for key, member in member_draws.items():
            assert not _same_start(student, member["init"]), (seed, network, key)
    # Nor do two students, two members, or a member of one replicate and one of another.
    starts = [s.model.state_dict() for s in states.values()] + [m["init"] for m in member_draws.values()]
    for a, b in itertools.combinations(starts, 2):
        assert not _same_start(a, b)


def test_no_student_batch_or_augmentation_stream_repeats_a_members(member_draws, student_states) -> None:
    states, n = student_states
    streams = {("student", seed, network, draw): getattr(state, attr).get_state()
               for (seed, network), state in states.items()
               for draw, attr in (("batches", "generator"), ("augment", "augment_generator"))}
    for key, member in member_draws.items():
        streams.update({("member", *key, draw): member[draw] for draw in ("batches", "augment")})
    orders = {key: _first_order(state, n) for key, state in streams.items()}
    for (key_a, a), (key_b, b) in itertools.combinations(orders.items(), 2):
        assert not torch.equal(a, b), (key_a, key_b)
    # In particular the seed-0 student's batch order is not member 0's (as it was when both were seed 0).
    assert not torch.equal(orders[("student", 0, "student", "batches")],
                           orders[("member", "per_seed", 0, "reference", 0, "batches")])


def test_the_control_is_disjoint_from_the_reference(base_cfg, member_draws, student_states) -> None:
    states, n = student_states
    for seed in SEEDS:
        cfg = base_cfg.replace(seed=seed)
        reference = {member_key(cfg, m) for m in MEMBERS}
        control = {member_key(cfg, m, "control") for m in MEMBERS}
        assert len(reference) == len(control) == len(MEMBERS) and not reference & control
        for m, other in itertools.product(MEMBERS, MEMBERS):
            ref = member_draws[("per_seed", seed, "reference", m)]
            ctl = member_draws[("per_seed", seed, "control", other)]
            assert not _same_start(ref["init"], ctl["init"])
            assert not torch.equal(_first_order(ref["batches"], n), _first_order(ctl["batches"], n))
        student, control_student = states[(seed, "student")], states[(seed, "control_student")]
        assert not _same_start(student.model.state_dict(), control_student.model.state_dict())
        assert not torch.equal(_first_order(student.generator.get_state(), n),
                               _first_order(control_student.generator.get_state(), n))


def test_member_streams_key_per_seed_and_shared_teachers(base_cfg) -> None:
    per_seed = {member_streams(base_cfg.replace(seed=s), m) for s in SEEDS for m in MEMBERS}
    assert len(per_seed) == len(SEEDS) * len(MEMBERS)
    shared = [base_cfg.replace(teacher_sharing="shared", seed=s) for s in SEEDS]
    assert len({member_streams(cfg, 0) for cfg in shared}) == 1
    assert member_streams(shared[0], 0) not in per_seed
    # The streams, and with them the member, follow the member index alone: ensembles nest.
    assert member_streams(base_cfg.replace(teacher_members=5), 1) == member_streams(base_cfg, 1)


def test_teacher_init_and_interpolate_start_where_intended(base_cfg, session_store, mnist1d_arrays) -> None:
    # A layer-normalised single-member teacher (interpolation needs norm group or none), trained for real.
    cfg = base_cfg.replace(norm="group", teacher_members=1, teacher_epochs=1, seed=2)
    [key] = ensure_members(cfg, session_store, mnist1d_arrays, CPU)
    ensemble = load_ensemble(cfg, session_store, CPU)
    stored = session_store.load(key, teachers.WEIGHTS)
    data = TrialData(cfg, CPU, None)

    def start(init: str, init_lambda: float = 0.0) -> dict[str, torch.Tensor]:
        student_cfg = cfg.replace(init=init, init_lambda=init_lambda)
        state = build_student_state(student_cfg, student_recipe(student_cfg), ensemble, data, CPU, None)
        return state.model.state_dict()

    random, teacher_init, halfway = start("random"), start("teacher_init"), start("interpolate", 0.5)
    assert not _same_start(random, stored["initial"])
    for name, value in teacher_init.items():
        assert torch.equal(value, stored["initial"][name]), name  # the member's own initial weights
    for name, value in halfway.items():
        if value.is_floating_point():  # halfway between this replicate's random student and the teacher
            torch.testing.assert_close(value, 0.5 * random[name] + 0.5 * stored["final"][name])


# --- per-seed and shared teachers in real trials -----------------------------------------------


def test_per_seed_trials_distil_from_distinct_teachers_and_shared_from_one(base_cfg, shared_teacher) -> None:
    cfg = base_cfg.replace(teacher_members=1, epochs=1, eval_every=1, precision="fp32")
    per_seed = [run_trial(cfg.replace(seed=seed)) for seed in (0, 1)]
    shared = [run_trial(cfg.replace(seed=seed, teacher_sharing="shared")) for seed in (0, 1)]
    assert per_seed[0]["teacher_key"] == cfg.teacher_key() != per_seed[1]["teacher_key"]
    assert per_seed[0]["teacher_test_nll"] != per_seed[1]["teacher_test_nll"]  # two different teachers
    assert shared[0]["teacher_key"] == shared[1]["teacher_key"] not in {r["teacher_key"] for r in per_seed}
    assert shared[0]["teacher_test_nll"] == shared[1]["teacher_test_nll"]
    # The seed-0 per-seed teacher is the session's ensemble's member 0: ensembles within a replicate nest.
    assert member_key(cfg, 0) == shared_teacher[0]


# --- a step budget -----------------------------------------------------------------------------


def test_steps_fix_the_optimizer_steps_whatever_the_data_size(base_cfg, shared_teacher, monkeypatch) -> None:
    counted: list[int] = []
    real_make_optimizer = trial_module.make_optimizer

    def counting_optimizer(model, recipe):
        optimizer = real_make_optimizer(model, recipe)
        counted.append(0)
        index = len(counted) - 1
        optimizer.register_step_post_hook(lambda *args: counted.__setitem__(index, counted[index] + 1))
        return optimizer

    monkeypatch.setattr(trial_module, "make_optimizer", counting_optimizer)
    cfg = base_cfg.replace(steps=40, epochs=50, eval_every=2, precision="fp32")
    n = len(TrialData(cfg, CPU, None).distill_idx)
    for fraction, per_epoch in ((1.0, batches_per_epoch(n, cfg.batch_size)),
                                (0.25, batches_per_epoch(round(n / 4), cfg.batch_size))):
        counted.clear()
        reports: list[int] = []
        result = run_trial(
            cfg.replace(distill_fraction=fraction), on_eval=lambda m, c, seen=reports: seen.append(m["epoch"])
        )
        assert result["status"] == "TERMINATED", result["error"]
        assert counted == [40]  # one student, exactly 40 optimizer steps
        assert result["student_steps"] == 40
        epochs = math.ceil(40 / per_epoch)
        assert result["epochs_completed"] == epochs
        # Evaluated every eval_every epochs, and once more at the last step.
        assert reports == sorted({*range(2, epochs + 1, 2), epochs})
        assert isinstance(result["converged"], bool) and math.isfinite(result["convergence_delta"])


def test_convergence_columns_reach_the_trials_table(base_cfg, shared_teacher) -> None:
    result = run_trial(base_cfg.replace(epochs=3, eval_every=3, precision="fp32"))
    assert math.isfinite(result["convergence_delta"]) and isinstance(result["converged"], bool)
    assert result["converged"] == (abs(result["convergence_delta"]) < CONVERGED_WITHIN)
    row = {"study": "s", "trial_id": "t", **base_cfg.to_dict(), **result}
    table = to_table([row], TRIALS_SCHEMA).to_pylist()[0]
    for name in ("convergence_delta", "converged", "student_steps", "teacher_steps"):
        assert table[name] == result[name], name
    assert table["teacher_sharing"] == "per_seed" and table["steps"] == 0
