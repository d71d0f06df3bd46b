"""Batched augmentation policies for distillation inputs (paper experiment E3).

Every policy works on a whole batch tensor on its own device: no per-sample Python loops, no PIL,
no torchvision. All randomness comes from the ``torch.Generator`` passed in, which lives on the
batch's device, so one seed reproduces an augmented batch exactly and the global RNG is never
touched.

Data kinds:

- ``signal``: ``[N, C, L]`` standardised 1-D signals (any range),
- ``gray``:   ``[N, 1, H, W]`` images in ``[0, 1]``,
- ``rgb``:    ``[N, 3, H, W]`` images in ``[0, 1]``.

Image policies keep images in ``[0, 1]``. Every policy except ``none`` starts with ``baseline``
(the teachers' own augmentation: random translation with zero padding, plus an optional horizontal
flip), as in the paper. The teacher labels the augmented batch itself, so mixup and cutmix return
the partner permutation and the label weight only for callers that also mix hard labels.

``POLICIES`` are the paper's E3 policies (with ``none`` and ``cutmix``); ``SIGNAL_POLICIES`` are
their 1-D analogues, for signals only. A name means one thing on every kind it applies to:

- signal, gray, rgb: ``none``, ``baseline`` (on signals a random shift with zero fill), ``mixup``,
  ``cutmix``, ``noise``;
- gray, rgb: ``rotation``, ``vflip``, ``combaug``; rgb only: ``colorjitter``;
- signal only: ``reversal`` (time reversal, the analogue of a horizontal flip), ``amplitude``
  (a per-sample gain, the analogue of brightness), ``jitter`` (additive gaussian noise, as from a
  sensor) and ``combaug1d`` (shift + reversal + amplitude + jitter, the analogue of ``combaug``).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KINDS: tuple[str, ...] = ("signal", "gray", "rgb")

ROTATION_DEGREES = 20.0
JITTER_STRENGTH = 0.2  # brightness, contrast, saturation and hue alike
NOISE_P = 0.2
AMPLITUDE_RANGE = (0.8, 1.2)  # the spread of colorjitter's brightness factor
SIGNAL_JITTER_SD = 0.1  # the jitter policy's noise sd, as a fraction of the input batch's sd
# ITU-R 601 luma weights, the ones torchvision's grayscale conversion uses.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass
class AugmentedBatch:
    """One augmented batch.

    ``x`` has the input's shape, dtype and device; it may be the input tensor itself when the
    policy changed nothing, and the input is never modified in place. ``mix_index`` is the partner
    permutation (LongTensor ``[N]``) for mixup and cutmix, else ``None``. ``lam`` is the weight of
    each original sample's label (1.0 when nothing was mixed).
    """

    x: torch.Tensor
    mix_index: torch.Tensor | None
    lam: float


# --- policies: one function per name, given the batch after baseline (none: the input itself) --


@dataclass(frozen=True)
class _PolicyInput:
    """What a policy sees: the input batch as given (for the scales some policies take from it),
    its data kind, the generator every draw comes from, and the Beta parameter of the mixing ones."""

    x: torch.Tensor
    kind: str
    generator: torch.Generator
    mixup_alpha: float


def _unchanged(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    """``none`` (given the input itself) and ``baseline`` (given the shifted batch)."""
    return AugmentedBatch(out, None, 1.0)


def _apply_rotation(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(_rotate(out, batch.generator), None, 1.0)


def _apply_vflip(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(random_flip(out, batch.generator, dim=-2), None, 1.0)


def _apply_colorjitter(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(_color_jitter(out, batch.generator), None, 1.0)


def _apply_combaug(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    out = random_flip(_rotate(out, batch.generator), batch.generator, dim=-2)
    # Saturation and hue do not exist on gray images.
    if batch.kind == "rgb":
        out = _color_jitter(out, batch.generator)
    return AugmentedBatch(out, None, 1.0)


def _apply_mixup(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    x, generator = batch.x, batch.generator
    lam = _beta(batch.mixup_alpha, generator, x.device)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    # lerp is exact where a sample meets an identical partner; clamping guards the last ulp.
    mixed = torch.lerp(out[perm], out, lam)
    if batch.kind != "signal":
        mixed = mixed.clamp(0.0, 1.0)
    return AugmentedBatch(mixed, perm, lam)


def _apply_cutmix(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return _cutmix(out, batch.generator, batch.mixup_alpha)


def _apply_noise(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    x, generator = batch.x, batch.generator
    is_image = batch.kind != "signal"
    if is_image:
        low, high = 0.0, 1.0
    else:
        # The input's range, not the translated batch's: zero padding could widen it.
        low, high = float(x.min()), float(x.max())
    replace = torch.rand(x.shape[0], generator=generator, device=x.device) < NOISE_P
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    noise = low + (high - low) * noise
    if is_image:
        noise = noise.clamp(0.0, 1.0)
    mask = replace.view(-1, *([1] * (x.dim() - 1)))
    return AugmentedBatch(torch.where(mask, noise, out), None, 1.0)


def _apply_reversal(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(random_flip(out, batch.generator, dim=-1), None, 1.0)


def _apply_amplitude(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(scale_amplitude(out, batch.generator), None, 1.0)


def _apply_jitter(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    return AugmentedBatch(add_jitter(out, batch.generator, reference=batch.x), None, 1.0)


def _apply_combaug1d(out: torch.Tensor, batch: _PolicyInput) -> AugmentedBatch:
    out = scale_amplitude(random_flip(out, batch.generator, dim=-1), batch.generator)
    return AugmentedBatch(add_jitter(out, batch.generator, reference=batch.x), None, 1.0)


@dataclass(frozen=True)
class _Policy:
    apply: Callable[[torch.Tensor, _PolicyInput], AugmentedBatch]
    kinds: tuple[str, ...]  # the data kinds the policy is meaningful for
    after_baseline: bool = True  # every policy but ``none`` starts with baseline
    mixes: bool = False  # draws its label weight from Beta(mixup_alpha, mixup_alpha)


_ALL = KINDS
_IMAGES = ("gray", "rgb")
_SIGNAL = ("signal",)
# Every policy, its function and its data kinds, in the order they are listed to users. Validation
# and dispatch both read this table, so a policy cannot be listed without being implemented.
_POLICY_TABLE: dict[str, _Policy] = {
    "none": _Policy(_unchanged, _ALL, after_baseline=False),
    "baseline": _Policy(_unchanged, _ALL),
    "rotation": _Policy(_apply_rotation, _IMAGES),
    "vflip": _Policy(_apply_vflip, _IMAGES),
    "colorjitter": _Policy(_apply_colorjitter, ("rgb",)),
    "combaug": _Policy(_apply_combaug, _IMAGES),
    "mixup": _Policy(_apply_mixup, _ALL, mixes=True),
    "cutmix": _Policy(_apply_cutmix, _ALL, mixes=True),
    "noise": _Policy(_apply_noise, _ALL),
    # 1-D analogues of the image policies; signals only, so each name keeps one meaning.
    "reversal": _Policy(_apply_reversal, _SIGNAL),
    "amplitude": _Policy(_apply_amplitude, _SIGNAL),
    "jitter": _Policy(_apply_jitter, _SIGNAL),
    "combaug1d": _Policy(_apply_combaug1d, _SIGNAL),
}
# The data kinds each policy is meaningful for.
SUPPORTED_KINDS: dict[str, tuple[str, ...]] = {name: policy.kinds for name, policy in _POLICY_TABLE.items()}
SIGNAL_POLICIES: tuple[str, ...] = tuple(name for name, kinds in SUPPORTED_KINDS.items() if kinds == _SIGNAL)
POLICIES: tuple[str, ...] = tuple(name for name in SUPPORTED_KINDS if name not in SIGNAL_POLICIES)
ALL_POLICIES: tuple[str, ...] = POLICIES + SIGNAL_POLICIES


# --- the public face ---------------------------------------------------------------------------


def policies_for(kind: str) -> tuple[str, ...]:
    """The policies meaningful for data ``kind``, in ``ALL_POLICIES`` order."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; choose one of: {', '.join(KINDS)}")
    return tuple(name for name in ALL_POLICIES if kind in SUPPORTED_KINDS[name])


def check_policy(name: str, kind: str) -> None:
    """Raise ValueError unless policy ``name`` exists and is meaningful for data ``kind``."""
    allowed = policies_for(kind)
    if name not in SUPPORTED_KINDS:
        close = difflib.get_close_matches(str(name), ALL_POLICIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown augmentation {name!r}{hint}; choose one of: {', '.join(ALL_POLICIES)}")
    supported = SUPPORTED_KINDS[name]
    if kind not in supported:
        raise ValueError(
            f"augmentation {name!r} is not meaningful for {kind} data; it supports: {', '.join(supported)}; "
            f"policies for {kind} data: {', '.join(allowed)}"
        )


def augment(
    name: str,
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    kind: str,
    crop_pad: int,
    hflip: bool,
    mixup_alpha: float = 1.0,
) -> AugmentedBatch:
    """Apply augmentation policy ``name`` to the batch ``x`` of data ``kind``.

    Policies (all but ``none`` start with ``baseline``):

    - ``none``: ``x`` unchanged.
    - ``baseline``: random translation by up to ``crop_pad`` positions in each spatial dimension
      with zero fill (pad, then random crop), then a horizontal flip (reversal along the last axis)
      with p=0.5 when ``hflip`` is true. Signals and images.
    - ``rotation``: baseline, then a rotation uniform in [-20°, 20°] with zero fill. Images.
    - ``vflip``: baseline, then a vertical flip with p=0.5. Images.
    - ``colorjitter``: baseline, then brightness, contrast and saturation factors uniform in
      [0.8, 1.2] and a hue shift uniform in [-0.2, 0.2] of a turn, each drawn per sample and
      applied in that fixed order. RGB only.
    - ``combaug``: baseline, rotation, vflip and colorjitter together. On gray images colorjitter
      is left out, since saturation and hue do not exist there; signals are refused.
    - ``mixup``: baseline, then one ``lam ~ Beta(mixup_alpha, mixup_alpha)`` per batch and a random
      partner permutation ``perm``: ``lam * x + (1 - lam) * x[perm]``.
    - ``cutmix``: baseline, then one ``lam ~ Beta(mixup_alpha, mixup_alpha)`` per batch and one
      random box (a segment for signals) of area fraction about ``1 - lam``, clipped at the border,
      pasted from ``x[perm]``; the returned ``lam`` is the exact kept fraction.
    - ``noise``: baseline, then each sample independently replaced with p=0.2 by uniform noise,
      in [0, 1] for images and in [min, max] of the input batch for signals.

    Signal-only policies (1-D analogues of the image ones):

    - ``reversal``: baseline, then time reversal (along the last axis, all channels together) with
      p=0.5 per sample.
    - ``amplitude``: baseline, then each sample multiplied by a gain uniform in [0.8, 1.2].
    - ``jitter``: baseline, then additive gaussian noise with sd 0.1 times the input batch's sd,
      drawn independently for every value.
    - ``combaug1d``: baseline, reversal, amplitude and jitter together, in that order.
    """
    check_policy(name, kind)
    _check_batch(x, generator, kind=kind, crop_pad=crop_pad)
    policy = _POLICY_TABLE[name]
    if policy.mixes and not (math.isfinite(mixup_alpha) and mixup_alpha > 0):
        raise ValueError(f"mixup_alpha={mixup_alpha!r} must be a finite number > 0")
    out = shift_and_flip(x, generator, crop_pad=crop_pad, hflip=hflip) if policy.after_baseline else x
    return policy.apply(out, _PolicyInput(x, kind, generator, mixup_alpha))


# --- checks ------------------------------------------------------------------------------------


def _check_batch(x: torch.Tensor, generator: torch.Generator, *, kind: str, crop_pad: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"augment expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    expected = {"signal": "[N, C, L]", "gray": "[N, 1, H, W]", "rgb": "[N, 3, H, W]"}[kind]
    ndim = 3 if kind == "signal" else 4
    channels = {"gray": 1, "rgb": 3}.get(kind)
    if x.dim() != ndim or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{kind} batches have shape {expected}, got {list(x.shape)}")
    if isinstance(crop_pad, bool) or not isinstance(crop_pad, int) or crop_pad < 0:
        raise ValueError(f"crop_pad={crop_pad!r} must be an integer >= 0")
    # torch's own message for a generator on the wrong device is easy to misread.
    if generator.device.type != x.device.type:
        raise ValueError(f"generator is on {generator.device}, the batch on {x.device}; they must match")


# --- geometric ---------------------------------------------------------------------------------


def shift_and_flip(x: torch.Tensor, generator: torch.Generator, *, crop_pad: int, hflip: bool) -> torch.Tensor:
    out = x
    if crop_pad > 0:
        out = _translate(out, generator, crop_pad)
    if hflip:
        out = random_flip(out, generator, dim=-1)
    return out


def _translate(x: torch.Tensor, generator: torch.Generator, pad: int) -> torch.Tensor:
    """Random crop of the zero-padded batch: each sample shifted by up to ``pad`` per spatial dim.

    Each spatial dimension is cropped with one batched gather whose start offset differs per
    sample, so the cost does not depend on how many distinct shifts the batch holds.
    """
    n = x.shape[0]
    spatial = x.shape[2:]
    padded = F.pad(x, [pad, pad] * len(spatial))
    offsets = torch.randint(0, 2 * pad + 1, (len(spatial), n), generator=generator, device=x.device)
    out = padded
    for axis, size in enumerate(spatial):
        dim = 2 + axis
        index = offsets[axis][:, None] + torch.arange(size, device=x.device)  # [N, size]
        view = [n] + [1] * (out.dim() - 1)
        view[dim] = size
        target = list(out.shape)
        target[dim] = size
        out = torch.gather(out, dim, index.view(view).expand(target))
    return out


def random_flip(x: torch.Tensor, generator: torch.Generator, *, dim: int) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(dim), x)


def _rotate(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    u = torch.rand(n, generator=generator, device=x.device, dtype=torch.float32)
    angle = torch.deg2rad((2.0 * u - 1.0) * ROTATION_DEGREES)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(angle)
    # affine_grid works in coordinates normalised to [-1, 1] per axis; the h/w factors keep the
    # rotation rigid in pixel space when the image is not square.
    theta = torch.stack(
        [torch.stack([cos, -sin * (h / w), zero], -1), torch.stack([sin * (w / h), cos, zero], -1)], 1
    ).to(x.dtype)
    grid = F.affine_grid(theta, [n, x.shape[1], h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.clamp(0.0, 1.0)


# --- signal amplitude --------------------------------------------------------------------------


def scale_amplitude(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each sample times one gain in ``AMPLITUDE_RANGE``, the same for all its channels.

    A pure gain, no offset: the baseline shift fills with zeros, and an offset would leave a step
    between signal and fill that no real sample has. A gain keeps the shape of the signal and its
    zero crossings, which carry the class, as brightness keeps an image's edges.
    """
    low, high = AMPLITUDE_RANGE
    gain = low + (high - low) * torch.rand(x.shape[0], generator=generator, device=x.device)
    return x * gain.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def add_jitter(x: torch.Tensor, generator: torch.Generator, *, reference: torch.Tensor) -> torch.Tensor:
    """``x`` plus gaussian noise of sd ``SIGNAL_JITTER_SD`` times the sd of ``reference``.

    The scale comes from the un-augmented input (zero fill would shrink it) and stays a tensor, so
    there is no host round-trip; it makes the policy independent of the data's units.
    """
    sigma = SIGNAL_JITTER_SD * reference.float().std(correction=0)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return x + (sigma * noise).to(x.dtype)


# --- colour ------------------------------------------------------------------------------------


def _color_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = torch.rand(4, n, generator=generator, device=x.device, dtype=x.dtype)
    brightness, contrast, saturation = (1.0 + JITTER_STRENGTH * (2.0 * u[:3] - 1.0)).view(3, n, 1, 1, 1)
    hue_shift = (JITTER_STRENGTH * (2.0 * u[3] - 1.0)).view(n, 1, 1)

    out = (x * brightness).clamp(0.0, 1.0)
    mean = _grayscale(out).mean(dim=(-2, -1), keepdim=True)
    out = (contrast * out + (1.0 - contrast) * mean).clamp(0.0, 1.0)
    out = (saturation * out + (1.0 - saturation) * _grayscale(out)).clamp(0.0, 1.0)
    hue, sat, val = rgb_to_hsv(out)
    hue = torch.remainder(hue + hue_shift, 1.0)
    return hsv_to_rgb(hue, sat, val).clamp(0.0, 1.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma of ``[N, 3, H, W]`` as ``[N, 1, H, W]``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N, 3, H, W]`` RGB in [0, 1] to hue (turns), saturation, value, each ``[N, H, W]``."""
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    chroma = maxc - minc
    gray = chroma == 0
    ones = torch.ones_like(maxc)
    # Gray pixels have no hue; the substituted divisors keep them finite (hue 0, saturation 0).
    sat = chroma / torch.where(gray, ones, maxc)
    divisor = torch.where(gray, ones, chroma)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.remainder(hue / 6.0, 1.0)
    return hue, sat, maxc


def hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    sector_f = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector_f
    # hue can round up to exactly 1.0, which is sector 0 again.
    sector = sector_f.long().remainder(6).unsqueeze(1)
    p = (val * (1.0 - sat)).clamp(0.0, 1.0)
    q = (val * (1.0 - sat * frac)).clamp(0.0, 1.0)
    t = (val * (1.0 - sat * (1.0 - frac))).clamp(0.0, 1.0)
    r = torch.stack([val, q, p, p, t, val], 1).gather(1, sector)
    g = torch.stack([t, val, val, q, p, p], 1).gather(1, sector)
    b = torch.stack([p, p, t, val, val, q], 1).gather(1, sector)
    return torch.cat([r, g, b], 1)


# --- mixing ------------------------------------------------------------------------------------


def _beta(alpha: float, generator: torch.Generator, device: torch.device) -> float:
    """One draw from Beta(alpha, alpha), seeded by ``generator``.

    Inverse-CDF sampling of one uniform from the generator: exact, and unlike torch's Gamma-based
    Beta sampler it takes a generator. One float per batch, so the host round-trip is negligible.
    """
    from scipy.special import betaincinv  # deferred: only the mixing policies need scipy

    u = float(torch.rand((), generator=generator, device=device))
    return float(betaincinv(alpha, alpha, u))


def _cutmix(x: torch.Tensor, generator: torch.Generator, alpha: float) -> AugmentedBatch:
    lam = _beta(alpha, generator, x.device)
    perm = torch.randperm(x.shape[0], generator=generator, device=x.device)
    spatial = list(x.shape[2:])
    # A box with the same aspect as the data whose area is (1 - lam) of it (CutMix, Yun et al.).
    side = (1.0 - lam) ** (1.0 / len(spatial))
    centres = torch.stack(
        [torch.randint(0, size, (), generator=generator, device=x.device) for size in spatial]
    ).tolist()
    box: list[slice] = []
    box_fraction = 1.0
    for size, centre in zip(spatial, centres):
        length = int(size * side)
        start = centre - length // 2
        lo, hi = max(start, 0), min(start + length, size)
        box.append(slice(lo, hi))
        box_fraction *= (hi - lo) / size
    out = x.clone()
    index = (slice(None), slice(None), *box)
    out[index] = x[index][perm]
    return AugmentedBatch(out, perm, 1.0 - box_fraction)
