"""The fast path computes what the reference path computes: vectorized vs looped ensembles,
batched vs per-sample augmentation, and the measured choice of bf16 / layout / teacher execution."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from kd_ray.data.augment import augment
from kd_ray.models.archs import build_model
from kd_ray.models.ensembles import LoopEnsemble, StackedEnsemble
from kd_ray.train import fastpath
from kd_ray.train.distill import AugmentSpec, Recipe, TrainState, fit, make_optimizer

CASES = [("mlp", (1, 40)), ("conv1d", (1, 40)), ("smallcnn", (1, 8, 8)), ("preresnet8", (3, 16, 16))]


def _members(arch: str, shape: tuple[int, ...], m: int = 3, norm: str = "batch") -> list[torch.nn.Module]:
    members = []
    for seed in range(m):
        torch.manual_seed(seed)
        model = build_model(arch, shape, 10, norm)
        model.train()
        with torch.no_grad():
            model(torch.rand(32, *shape) * 2)  # move BatchNorm running statistics off their defaults
        members.append(model.eval())
    return members


@pytest.mark.parametrize("arch, shape", CASES)
def test_vectorized_ensemble_equals_loop(arch, shape):
    members = _members(arch, shape)
    x = torch.rand(17, *shape)
    stacked = StackedEnsemble(members)
    looped = LoopEnsemble(members)
    torch.testing.assert_close(stacked.logits(x), looped.logits(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stacked.log_probs(x), looped.log_probs(x), rtol=1e-5, atol=1e-5)


def test_bf16_cast_is_a_copy_and_close():
    members = _members("smallcnn", (1, 8, 8))
    x = torch.rand(8, 1, 8, 8)
    stacked = StackedEnsemble(members)
    half = stacked.cast(torch.bfloat16)
    assert stacked.dtype == torch.float32 and half.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in stacked.params.values())
    torch.testing.assert_close(half.log_probs(x), stacked.log_probs(x), rtol=0.05, atol=0.05)


def _per_sample_baseline(x: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """The standard pipeline's transform, one sample at a time, with the given random draws."""
    out = []
    for i in range(x.shape[0]):
        sample = F.pad(x[i], [pad, pad] * (x.dim() - 2))
        if x.dim() == 4:
            h, w = x.shape[2:]
            sample = sample[:, offsets[0, i] : offsets[0, i] + h, offsets[1, i] : offsets[1, i] + w]
        else:
            length = x.shape[2]
            sample = sample[:, offsets[0, i] : offsets[0, i] + length]
        if flips[i]:
            sample = sample.flip(-1)
        out.append(sample)
    return torch.stack(out)


@pytest.mark.parametrize(
    "shape, kind, hflip", [((3, 8, 8), "rgb", True), ((1, 8, 8), "gray", False), ((1, 40), "signal", False)]
)
def test_batched_baseline_equals_per_sample(shape, kind, hflip):
    pad = 2
    x = torch.rand(12, *shape)
    generator = torch.Generator().manual_seed(3)
    replay = torch.Generator().manual_seed(3)
    batched = augment("baseline", x, generator, kind=kind, crop_pad=pad, hflip=hflip).x
    # The batched policy draws the per-sample offsets first, then the flips: replay those draws.
    offsets = torch.randint(0, 2 * pad + 1, (len(shape) - 1, x.shape[0]), generator=replay)
    flips = torch.rand(x.shape[0], generator=replay) < 0.5 if hflip else torch.zeros(x.shape[0], dtype=torch.bool)
    torch.testing.assert_close(batched, _per_sample_baseline(x, offsets, flips, pad), rtol=0, atol=0)


def test_training_with_vectorized_and_looped_teacher_is_the_same():
    members = _members("mlp", (1, 40), m=2)
    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 40), torch.randint(0, 10, (256,))
    torch.manual_seed(1)
    student = build_model("mlp", (1, 40), 10)
    recipe = Recipe(epochs=2, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=1e-4, lr_schedule="cosine",
                    augmentation="baseline", temperature=4.0)
    spec = AugmentSpec("signal", 4, False)
    finals = []
    for runner in (StackedEnsemble(members), LoopEnsemble(members)):
        model = copy.deepcopy(student)
        state = TrainState(model, make_optimizer(model, recipe), torch.Generator().manual_seed(0))
        fit(state, x, y, recipe, spec, teacher=runner.log_probs)
        finals.append(model.state_dict())
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-5)


def test_choose_respects_forced_precision_and_leaves_the_rng_alone():
    before = torch.random.get_rng_state()
    forced_fp32 = fastpath.choose("mlp", "mlp", (1, 40), 10, "batch", 2, 64, "cpu", "fp32", repeats=1)
    forced_bf16 = fastpath.choose("mlp", "mlp", (1, 40), 10, "batch", 2, 64, "cpu", "bf16", repeats=1)
    assert forced_fp32.bf16 is False and forced_bf16.bf16 is True
    assert forced_fp32.channels_last is False  # 1-D data has no channels_last layout
    # A fixed precision fixes the whole path, by no timing: every replicate gets the same arithmetic.
    for precision in ("fp32", "bf16"):
        fixed = fastpath.choose("smallcnn", "smallcnn", (1, 8, 8), 10, "batch", 5, 64, "cpu", precision, repeats=1)
        assert (fixed.channels_last, fixed.stacked_teacher) == (False, True)
    assert torch.equal(torch.random.get_rng_state(), before)
    image = fastpath.choose("smallcnn", "smallcnn", (1, 8, 8), 10, "batch", 2, 64, "cpu", "auto", repeats=1)
    assert isinstance(image.channels_last, bool) and "teacher" in image.describe()
    # Cached per process: a second call returns the very same decision without measuring again.
    assert fastpath.choose("smallcnn", "smallcnn", (1, 8, 8), 10, "batch", 2, 64, "cpu", "auto", repeats=1) is image


def test_bf16_training_step_stays_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("smallcnn", (1, 8, 8), 10)
    x = torch.rand(64, 1, 8, 8)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference, rtol=0.05, atol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_trial_uses_the_measured_fast_path(base_cfg):
    from kd_ray.train.trial import run_trial

    result = run_trial(base_cfg.replace(device="cuda", epochs=2, eval_every=1))
    assert result["status"] == "TERMINATED"
    assert result["device_name"] != "cpu"
    assert result["precision_used"] in ("bf16", "fp32") and "teacher" in result["fast_path"]
    assert 0.0 <= result["test_agreement"] <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_vectorized_ensemble_equals_loop():
    members = [m.cuda() for m in _members("preresnet8", (3, 16, 16))]
    x = torch.rand(9, 3, 16, 16, device="cuda")
    torch.testing.assert_close(
        StackedEnsemble(members).logits(x), LoopEnsemble(members).logits(x), rtol=1e-4, atol=1e-4
    )


def _counted(seconds: float) -> tuple[list[int], Callable[[], None]]:
    """A candidate step that does real torch work and takes at least ``seconds``; and its call count."""
    calls = [0]
    a = torch.rand(64, 64)

    def step() -> None:
        calls[0] += 1
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ a

    return calls, step


def test_a_candidate_slower_than_the_best_is_cut_short():
    cpu = torch.device("cpu")
    fast_calls, fast = _counted(0.002)
    best = fastpath.time_candidate(fast, 5, cpu)
    assert fast_calls[0] == 6  # a warm-up and every repeat: nothing to beat
    slow_calls, slow = _counted(0.05)
    measured = fastpath.time_candidate(slow, 5, cpu, within=best * 5)
    assert slow_calls[0] == 2  # its warm-up and one repeat, already slower than all of the best's repeats
    assert measured > best  # what it reports still loses to the best
    # A candidate that keeps up is timed in full.
    even_calls, even = _counted(0.002)
    fastpath.time_candidate(even, 5, cpu, within=1.0)
    assert even_calls[0] == 6

