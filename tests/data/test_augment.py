from __future__ import annotations

import pytest
import torch

from kd_ray.data import augment as aug
from kd_ray.data.augment import KINDS, POLICIES, AugmentedBatch, augment, check_policy

ALLOWED = [
    (name, kind)
    for name in POLICIES
    for kind in KINDS
    if kind in aug.SUPPORTED_KINDS[name]
]
REFUSED = [
    ("colorjitter", "gray"),
    ("colorjitter", "signal"),
    ("rotation", "signal"),
    ("vflip", "signal"),
    ("combaug", "signal"),
]


def make_batch(kind: str, n: int = 6, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "signal":
        return torch.randn(n, 2, 16, generator=g).to(device)
    channels = 1 if kind == "gray" else 3
    return torch.rand(n, channels, 8, 10, generator=g).to(device)


def run(name: str, x: torch.Tensor, kind: str, seed: int = 0, **kwargs: object) -> AugmentedBatch:
    options: dict = {"crop_pad": 2, "hflip": True, **kwargs}
    return augment(name, x, torch.Generator(device=x.device).manual_seed(seed), kind=kind, **options)


def test_public_names() -> None:
    assert POLICIES == ("none", "baseline", "rotation", "vflip", "colorjitter", "combaug", "mixup",
                        "cutmix", "noise")
    assert KINDS == ("signal", "gray", "rgb")
    assert set(aug.SUPPORTED_KINDS) == set(aug.ALL_POLICIES)


@pytest.mark.parametrize("name,kind", ALLOWED)
def test_allowed_combination_contract(name: str, kind: str) -> None:
    x = make_batch(kind)
    before = x.clone()
    out = run(name, x, kind)
    assert torch.equal(x, before), "input modified in place"
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and out.x.device == x.device
    assert torch.isfinite(out.x).all()
    if kind != "signal":
        assert out.x.min() >= 0.0 and out.x.max() <= 1.0
    if name in ("mixup", "cutmix"):
        assert out.mix_index is not None and out.mix_index.dtype == torch.long
        assert sorted(out.mix_index.tolist()) == list(range(x.shape[0]))
        assert 0.0 <= out.lam <= 1.0
    else:
        assert out.mix_index is None and out.lam == 1.0

    again = run(name, x, kind)
    assert torch.equal(out.x, again.x) and out.lam == again.lam
    if name != "none":
        other = run(name, x, kind, seed=1)
        assert not torch.equal(out.x, other.x)


def test_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    for name, kind in ALLOWED:
        run(name, make_batch(kind), kind)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name,kind", REFUSED)
def test_refuses_meaningless_combinations(name: str, kind: str) -> None:
    with pytest.raises(ValueError, match="supports"):
        check_policy(name, kind)
    with pytest.raises(ValueError, match="supports"):
        run(name, make_batch(kind), kind)


def test_colorjitter_message_names_rgb() -> None:
    with pytest.raises(ValueError, match="supports: rgb"):
        check_policy("colorjitter", "gray")


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="did you mean 'mixup'") as info:
        check_policy("mixpu", "rgb")
    assert "cutmix" in str(info.value)  # the allowed list is shown
    with pytest.raises(ValueError, match="unknown data kind"):
        check_policy("none", "video")


def test_rejects_bad_batches() -> None:
    with pytest.raises(ValueError, match="shape"):
        run("baseline", make_batch("rgb"), "gray")
    with pytest.raises(ValueError, match="shape"):
        run("baseline", make_batch("signal"), "rgb")
    with pytest.raises(ValueError, match="floating"):
        run("baseline", torch.zeros(2, 1, 4, 4, dtype=torch.long), "gray")
    with pytest.raises(ValueError, match="crop_pad"):
        run("baseline", make_batch("gray"), "gray", crop_pad=-1)
    with pytest.raises(ValueError, match="mixup_alpha"):
        run("mixup", make_batch("gray"), "gray", mixup_alpha=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_none_is_identity(kind: str) -> None:
    x = make_batch(kind)
    out = run("none", x, kind)
    assert torch.equal(out.x, x) and out.mix_index is None and out.lam == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_baseline_without_pad_or_flip_is_identity(kind: str) -> None:
    x = make_batch(kind)
    assert torch.equal(run("baseline", x, kind, crop_pad=0, hflip=False).x, x)


@pytest.mark.parametrize("pad", [1, 3])
def test_translation_moves_hot_pixel_by_at_most_pad(pad: int) -> None:
    n, h, w = 64, 9, 11
    image = torch.zeros(n, 1, h, w)
    image[:, 0, 4, 5] = 1.0
    out = run("baseline", image, "gray", crop_pad=pad, hflip=False).x
    hot = out[:, 0].flatten(1).argmax(1)
    assert torch.all(out[:, 0].flatten(1).amax(1) == 1.0)  # the centre pixel never leaves
    dy, dx = hot // w - 4, hot % w - 5
    assert dy.abs().max() <= pad and dx.abs().max() <= pad
    assert len(set(zip(dy.tolist(), dx.tolist()))) > 1

    signal = torch.zeros(n, 2, 20)
    signal[:, :, 10] = 1.0
    moved = run("baseline", signal, "signal", crop_pad=pad, hflip=False).x
    assert torch.equal(moved[:, 0], moved[:, 1])  # channels shift together
    shift = moved[:, 0].argmax(1) - 10
    assert shift.abs().max() <= pad and len(set(shift.tolist())) > 1


def test_translation_fills_with_zeros() -> None:
    out = run("baseline", torch.ones(32, 3, 6, 6), "rgb", crop_pad=2, hflip=False).x
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (out == 0).any()


def test_hflip_flips_some_samples() -> None:
    x = make_batch("rgb", n=32)
    out = run("baseline", x, "rgb", crop_pad=0, hflip=True).x
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same | flipped) and same.any() and flipped.any()


def test_vflip_flips_some_samples() -> None:
    x = make_batch("gray", n=32)
    out = run("vflip", x, "gray", crop_pad=0, hflip=False).x
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-2)).flatten(1).all(1)
    assert torch.all(same | flipped) and same.any() and flipped.any()


def test_rotation_keeps_centre_and_varies_angle() -> None:
    image = torch.zeros(16, 1, 9, 9)
    image[:, :, 3:6, 3:6] = 1.0
    out = run("rotation", image, "gray", crop_pad=0, hflip=False).x
    assert torch.allclose(out[:, 0, 4, 4], torch.ones(16), atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_colorjitter_keeps_gray_pixels_gray() -> None:
    x = torch.rand(16, 1, 8, 8).expand(16, 3, 8, 8).contiguous()
    out = run("colorjitter", x, "rgb", crop_pad=0, hflip=False).x
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5)
    assert torch.allclose(out[:, 0], out[:, 2], atol=1e-5)
    assert not torch.allclose(out, x)


def test_hsv_round_trip_and_hue_turn() -> None:
    x = make_batch("rgb", n=4)
    assert torch.allclose(aug.hsv_to_rgb(*aug.rgb_to_hsv(x)), x, atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    hue, sat, val = aug.rgb_to_hsv(red)
    green = aug.hsv_to_rgb(torch.remainder(hue + 1 / 3, 1.0), sat, val)
    assert torch.allclose(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_combaug_on_gray_leaves_out_colorjitter() -> None:
    # On a constant image rotation and flips change only the zero-filled border, never the
    # centre value, so any change there would come from colour jitter.
    x = torch.full((16, 1, 9, 9), 0.5)
    out = run("combaug", x, "gray", crop_pad=0, hflip=True).x
    assert torch.allclose(out[:, 0, 4, 4], torch.full((16,), 0.5), atol=1e-5)
    rgb = run("combaug", x.expand(16, 3, 9, 9), "rgb", crop_pad=0, hflip=True).x
    assert not torch.allclose(rgb[:, :, 4, 4], torch.full((16, 3), 0.5), atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_is_convex_combination_with_partner(kind: str) -> None:
    x = make_batch(kind, n=8)
    out = run("mixup", x, kind, crop_pad=0, hflip=False)
    assert out.mix_index is not None
    expected = out.lam * x + (1 - out.lam) * x[out.mix_index]
    assert torch.allclose(out.x, expected, atol=1e-6)


def test_mixup_lambda_follows_beta() -> None:
    x = make_batch("signal", n=2)
    lams = torch.tensor([run("mixup", x, "signal", seed=s, mixup_alpha=0.2).lam for s in range(300)])
    # Beta(0.2, 0.2) is U-shaped: most mass near 0 and 1, mean 1/2.
    assert abs(lams.mean().item() - 0.5) < 0.08
    assert ((lams < 0.1) | (lams > 0.9)).float().mean() > 0.5
    uniform = torch.tensor([run("mixup", x, "signal", seed=s).lam for s in range(300)])
    assert abs(uniform.mean().item() - 0.5) < 0.06 and uniform.std().item() > 0.25


@pytest.mark.parametrize("kind", KINDS)
def test_cutmix_lam_is_kept_fraction(kind: str) -> None:
    x = make_batch(kind, n=8)
    for seed in range(10):
        out = run("cutmix", x, kind, seed=seed, crop_pad=0, hflip=False)
        assert out.mix_index is not None
        moved = out.mix_index != torch.arange(x.shape[0])
        kept = (out.x == x)[moved].float().mean().item()
        assert kept == pytest.approx(out.lam, abs=1e-6)
        pasted = out.x != x
        assert torch.equal(out.x[pasted], x[out.mix_index][pasted])


@pytest.mark.parametrize("kind", KINDS)
def test_noise_replaces_about_a_fifth(kind: str) -> None:
    n = 1000
    if kind == "signal":
        x = torch.randn(n, 1, 8)
    else:
        x = torch.rand(n, 1 if kind == "gray" else 3, 4, 4)
    out = run("noise", x, kind, crop_pad=0, hflip=False)
    replaced = (out.x != x).flatten(1).any(1)
    assert 0.1 < replaced.float().mean().item() < 0.3
    assert torch.equal(out.x[~replaced], x[~replaced])
    noise = out.x[replaced]
    low, high = (0.0, 1.0) if kind != "signal" else (x.min().item(), x.max().item())
    assert noise.min() >= low and noise.max() <= high


def test_half_precision_is_kept() -> None:
    x = make_batch("rgb").to(torch.bfloat16)
    for name in ("rotation", "colorjitter", "combaug", "mixup", "cutmix", "noise"):
        assert run(name, x, "rgb").x.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,kind", ALLOWED)
def test_runs_on_cuda(name: str, kind: str) -> None:
    x = make_batch(kind, device="cuda")
    out = run(name, x, kind)
    assert out.x.device == x.device and out.x.shape == x.shape and out.x.dtype == x.dtype
    assert torch.equal(out.x, run(name, x, kind).x)
    if out.mix_index is not None:
        assert out.mix_index.device == x.device


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generator_on_other_device_is_refused() -> None:
    x = make_batch("gray", device="cuda")
    with pytest.raises(ValueError, match="generator"):
        augment("baseline", x, torch.Generator().manual_seed(0), kind="gray", crop_pad=1, hflip=False)


# --- 1-D signal policies ---------------------------------------------------------------------


def test_signal_policy_names() -> None:
    assert aug.SIGNAL_POLICIES == ("reversal", "amplitude", "jitter", "combaug1d")
    assert aug.ALL_POLICIES == POLICIES + aug.SIGNAL_POLICIES
    assert aug.policies_for("signal") == (
        "none", "baseline", "mixup", "cutmix", "noise", "reversal", "amplitude", "jitter", "combaug1d",
    )
    assert aug.policies_for("gray") == ("none", "baseline", "rotation", "vflip", "combaug", "mixup", "cutmix",
                                        "noise")
    assert aug.policies_for("rgb") == POLICIES


@pytest.mark.parametrize("name", aug.SIGNAL_POLICIES)
@pytest.mark.parametrize("crop_pad", [0, 2])
def test_signal_policy_contract(name: str, crop_pad: int) -> None:
    check_policy(name, "signal")
    x = make_batch("signal", n=32)
    before = x.clone()
    out = run(name, x, "signal", crop_pad=crop_pad, hflip=False)
    assert torch.equal(x, before), "input modified in place"
    assert out.x.shape == x.shape and out.x.dtype == x.dtype and out.x.device == x.device
    assert torch.isfinite(out.x).all()
    assert out.mix_index is None and out.lam == 1.0
    assert not torch.equal(out.x, x), "the policy changed nothing"
    assert torch.equal(out.x, run(name, x, "signal", crop_pad=crop_pad, hflip=False).x)
    assert not torch.equal(out.x, run(name, x, "signal", seed=1, crop_pad=crop_pad, hflip=False).x)


def test_signal_policies_leave_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    for name in aug.SIGNAL_POLICIES:
        run(name, make_batch("signal"), "signal")
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("name", aug.SIGNAL_POLICIES)
@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_signal_policies_refused_on_images_with_one_clear_error(name: str, kind: str) -> None:
    with pytest.raises(ValueError) as info:
        check_policy(name, kind)
    message = str(info.value)
    assert f"'{name}'" in message and f"{kind} data" in message and "supports: signal" in message
    assert f"policies for {kind} data: {', '.join(aug.policies_for(kind))}" in message
    with pytest.raises(ValueError, match="supports: signal"):
        run(name, make_batch(kind), kind)


@pytest.mark.parametrize("name", ["rotation", "vflip", "colorjitter", "combaug"])
def test_image_policy_on_signals_names_the_signal_policies(name: str) -> None:
    with pytest.raises(ValueError, match=f"'{name}' is not meaningful for signal data") as info:
        check_policy(name, "signal")
    assert "policies for signal data: none, baseline, mixup, cutmix, noise, reversal, amplitude, jitter, combaug1d" \
        in str(info.value)


def test_unknown_signal_policy_name_is_suggested() -> None:
    with pytest.raises(ValueError, match="did you mean 'reversal'") as info:
        check_policy("reversl", "signal")
    assert "combaug1d" in str(info.value)


def same_or_reversed(out: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = (out == ref).flatten(1).all(1)
    reversed_ = (out == ref.flip(-1)).flatten(1).all(1)
    return same, reversed_


def test_reversal_reverses_exactly_the_chosen_samples() -> None:
    x = make_batch("signal", n=1000)
    out = run("reversal", x, "signal", crop_pad=0, hflip=False).x
    same, reversed_ = same_or_reversed(out, x)
    assert torch.all(same ^ reversed_), "each sample is either kept or reversed, all channels together"
    assert 0.4 < reversed_.float().mean().item() < 0.6


def test_reversal_follows_the_baseline_shift() -> None:
    # Both draw the shift first from the same seed, so reversal is the shifted batch, some samples reversed.
    x = make_batch("signal", n=64)
    shifted = run("baseline", x, "signal", crop_pad=3, hflip=False).x
    assert not torch.equal(shifted, x)
    out = run("reversal", x, "signal", crop_pad=3, hflip=False).x
    same, reversed_ = same_or_reversed(out, shifted)
    assert torch.all(same ^ reversed_) and same.any() and reversed_.any()


def test_amplitude_scales_each_sample_within_bounds() -> None:
    x = make_batch("signal", n=1000)
    out = run("amplitude", x, "signal", crop_pad=0, hflip=False).x
    gain = (out * x).flatten(1).sum(1) / (x * x).flatten(1).sum(1)
    assert torch.allclose(out, gain.view(-1, 1, 1) * x, atol=1e-5), "one gain per sample, channels alike"
    low, high = aug.AMPLITUDE_RANGE
    assert gain.min() >= low - 1e-5 and gain.max() <= high + 1e-5
    assert gain.min() < low + 0.02 and gain.max() > high - 0.02 and gain.std() > 0.1


def test_amplitude_keeps_the_shift_of_baseline() -> None:
    signal = torch.zeros(64, 2, 20)
    signal[:, :, 10] = 1.0
    moved = run("amplitude", signal, "signal", crop_pad=3, hflip=False).x
    shift = moved[:, 0].argmax(1) - 10
    assert shift.abs().max() <= 3 and len(set(shift.tolist())) > 1
    assert torch.equal(moved[:, 0], moved[:, 1])
    # A translation moves the peak and leaves zeros elsewhere; only its height changes.
    assert torch.equal((moved != 0).sum(-1), torch.ones(64, 2, dtype=torch.long))


def test_jitter_adds_gaussian_noise_scaled_to_the_data() -> None:
    x = make_batch("signal", n=500)
    noise = run("jitter", x, "signal", crop_pad=0, hflip=False).x - x
    sd = aug.SIGNAL_JITTER_SD * x.std(correction=0).item()
    assert abs(noise.mean().item()) < 0.05 * sd
    assert noise.std().item() == pytest.approx(sd, rel=0.05)
    assert (noise != 0).all()
    # The scale follows the data's units: ten times the input, ten times the noise.
    louder = run("jitter", 10 * x, "signal", crop_pad=0, hflip=False).x - 10 * x
    assert torch.allclose(louder, 10 * noise, rtol=1e-4, atol=1e-4)


def test_combaug1d_is_shift_reversal_amplitude_then_jitter() -> None:
    x = make_batch("signal", n=64)
    out = run("combaug1d", x, "signal", crop_pad=2, hflip=False).x
    g = torch.Generator().manual_seed(0)
    expected = aug.shift_and_flip(x, g, crop_pad=2, hflip=False)
    expected = aug.scale_amplitude(aug.random_flip(expected, g, dim=-1), g)
    expected = aug.add_jitter(expected, g, reference=x)
    assert torch.equal(out, expected)


def test_signal_policies_keep_half_precision() -> None:
    x = make_batch("signal").to(torch.bfloat16)
    for name in aug.SIGNAL_POLICIES:
        assert run(name, x, "signal").x.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", aug.SIGNAL_POLICIES)
def test_signal_policies_run_on_cuda(name: str) -> None:
    x = make_batch("signal", device="cuda")
    out = run(name, x, "signal")
    assert out.x.device == x.device and out.x.shape == x.shape and out.x.dtype == x.dtype
    assert torch.equal(out.x, run(name, x, "signal").x)
    assert not torch.equal(out.x, x)
