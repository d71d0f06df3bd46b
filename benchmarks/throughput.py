"""Student-training throughput: kd_ray's path against the standard PyTorch pipeline, in one run.

Reference: a DataLoader over a Dataset with per-sample transforms (pad + random crop + flip on each
image), teacher members run one after another, float32. kd_ray: the data as one device tensor,
batched augmentation, the teacher members in one vectorized call, precision chosen per device
(``kd_ray.train.fastpath``: bf16, channels_last, vectorized or looped teacher), the training loop of
``kd_ray.train.distill.fit``. Both see the same inputs and models.

Workloads: (a) CIFAR-shaped, 32x32x3, PreResNet-20 student, 3-member PreResNet-20 teacher, baseline
augmentation; (b) the embedded default, mnist1d with MLPs. Prints images/s of both and the ratio per
workload, the fraction of the device's measured matmul peak that kd_ray's step reaches (FLOPs counted
from the models; each peak measured in about a second, on a matrix up to 2048 wide: ``matmul_peak``),
and last ``speedup: <ratio of (a)>``. Reference and kd_ray are timed ``--repeats`` times, interleaved
(reference, kd_ray, kd_ray, reference, ...); each prints its median and spread (min to max), and the
ratio is of the medians. On a GPU a second reference runs beside the naive
one: the DataLoader with 4 worker processes and pinned memory, copied with ``non_blocking``.

    python benchmarks/throughput.py            # CPU here; the GPU when one is present
    python benchmarks/throughput.py --tiny     # seconds: CI checks it runs end to end
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from kd_ray.data.datasets import DATASET_INFO, load_arrays
from kd_ray.models.archs import build_model
from kd_ray.models.ensembles import LoopEnsemble, StackedEnsemble, ensemble_log_probs
from kd_ray.provenance import versions
from kd_ray.train import fastpath
from kd_ray.train.distill import AugmentSpec, Recipe, TrainState, fit, make_optimizer
from kd_ray.train.losses import kd_loss


@dataclass
class Workload:
    name: str
    x: np.ndarray  # float32, images in [0, 1]
    y: np.ndarray
    arch: str
    num_classes: int
    augment_spec: AugmentSpec
    members: int = 3
    batch_size: int = 128


class PerSampleDataset(Dataset):
    """The standard pipeline: one sample at a time, transformed on the host."""

    def __init__(self, x: np.ndarray, y: np.ndarray, augment_spec: AugmentSpec, seed: int) -> None:
        self.x, self.y, self.augment_spec = x, y, augment_spec
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        sample = torch.from_numpy(self.x[i])
        pad = self.augment_spec.crop_pad
        if pad:
            spatial = sample.shape[1:]
            padded = F.pad(sample, [pad, pad] * len(spatial))
            offsets = self.rng.integers(0, 2 * pad + 1, size=len(spatial))
            if len(spatial) == 1:
                sample = padded[:, offsets[0] : offsets[0] + spatial[0]]
            else:
                sample = padded[:, offsets[0] : offsets[0] + spatial[0], offsets[1] : offsets[1] + spatial[1]]
        if self.augment_spec.hflip and self.rng.random() < 0.5:
            sample = sample.flip(-1)
        return sample, int(self.y[i])


def make_models(w: Workload, device: torch.device):
    torch.manual_seed(0)
    shape = tuple(w.x.shape[1:])
    teachers = [build_model(w.arch, shape, w.num_classes).to(device).eval() for _ in range(w.members)]
    student = build_model(w.arch, shape, w.num_classes).to(device)
    return teachers, student


def reference_epoch(w: Workload, device: torch.device, steps: int, workers: int = 0) -> float:
    """Images per second of the standard pipeline over ``steps`` batches (after one warm-up batch);
    ``workers > 0``: that many loader processes and pinned memory."""
    teachers, student = make_models(w, device)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    loader = DataLoader(
        PerSampleDataset(w.x, w.y, w.augment_spec, seed=0), batch_size=w.batch_size, shuffle=True, drop_last=True,
        num_workers=workers, pin_memory=workers > 0,
    )
    seen, started = 0, None
    for i, (xb, yb) in enumerate(loader):
        if i == 1:
            torch.cuda.synchronize() if device.type == "cuda" else None
            started, seen = time.perf_counter(), 0
        xb, yb = xb.to(device, non_blocking=workers > 0), yb.to(device, non_blocking=workers > 0)
        with torch.no_grad():
            teacher_log_probs = ensemble_log_probs(torch.stack([t(xb) for t in teachers]))
        loss = kd_loss(student(xb), teacher_log_probs, yb, temperature=4.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += xb.shape[0]
        if i == steps:
            break
    torch.cuda.synchronize() if device.type == "cuda" else None
    return seen / (time.perf_counter() - started)


def kd_ray_epoch(w: Workload, device: torch.device, steps: int, path: fastpath.FastPath) -> float:
    """Images per second of kd_ray's loop over ``steps`` batches (after a warm-up epoch of 1 batch)."""
    teachers, student = make_models(w, device)
    if path.channels_last:
        teachers = [t.to(memory_format=torch.channels_last) for t in teachers]
        student = student.to(memory_format=torch.channels_last)
    runner = StackedEnsemble(teachers) if path.stacked_teacher else LoopEnsemble(teachers)
    teacher = runner.cast(torch.bfloat16) if path.bf16 else runner
    x = torch.as_tensor(w.x, device=device)
    y = torch.as_tensor(w.y, device=device)
    recipe = Recipe(epochs=2, batch_size=w.batch_size, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                    lr_schedule="constant", augmentation="baseline", temperature=4.0, bf16=path.bf16,
                    channels_last=path.channels_last)
    state = TrainState(student, make_optimizer(student, recipe), torch.Generator(device=device).manual_seed(0))
    # Epoch 1 warms up on one batch; epoch 2 is timed on ``steps`` batches.
    warm_up = Recipe(**{**recipe.__dict__, "epochs": 1})
    fit(state, x[: w.batch_size], y[: w.batch_size], warm_up, w.augment_spec, teacher.log_probs)
    n = steps * w.batch_size
    torch.cuda.synchronize() if device.type == "cuda" else None
    started = time.perf_counter()
    fit(state, x[:n], y[:n], recipe, w.augment_spec, teacher.log_probs)
    torch.cuda.synchronize() if device.type == "cuda" else None
    return n / (time.perf_counter() - started)


def step_flops_per_image(w: Workload, device: torch.device) -> float:
    """FLOPs of one training step per image: student forward + backward, teacher members forward."""
    teachers, student = make_models(w, device)
    xb = torch.as_tensor(w.x[: w.batch_size], device=device)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            teacher_log_probs = ensemble_log_probs(torch.stack([t(xb) for t in teachers]))
        kd_loss(student(xb), teacher_log_probs, temperature=4.0).backward()
    return counter.get_total_flops() / w.batch_size


PEAK_SECONDS = 1.0  # about how long one peak measurement's timed products take, whatever the dtype's speed
PEAK_START = 128  # the side the search for a peak measurement's size starts at


def _product_seconds(a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Seconds per ``a @ b``, over ``repeats`` products after one warm-up product."""
    a @ b
    torch.cuda.synchronize() if a.device.type == "cuda" else None
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize() if a.device.type == "cuda" else None
    return (time.perf_counter() - started) / repeats


def matmul_peak(device: torch.device, dtype: torch.dtype, max_size: int) -> tuple[float, int]:
    """Measured FLOP/s of a square matmul, the device's practical peak for that dtype, and the side it
    was measured at. The side doubles from ``PEAK_START`` up to ``max_size`` only while the next
    product would take under half of ``PEAK_SECONDS``, and the timed repeats (at most 10) fill
    about ``PEAK_SECONDS``: a dtype the device runs slowly (bf16 on a CPU without native bf16, near
    1 GFLOP/s against fp32's 125) is measured in seconds on a smaller matrix, not for minutes on a
    2048-wide one."""
    size = PEAK_START
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        seconds = _product_seconds(a, b, 1)
        if 2 * size > max_size or 8 * seconds > PEAK_SECONDS / 2:  # a product at twice the side costs 8x
            break
        size *= 2
    repeats = max(1, min(10, int(PEAK_SECONDS / max(seconds, 1e-9))))
    return 2 * size**3 / _product_seconds(a, b, repeats), size


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run ``repeats`` times, in an order that alternates round by round (ABBA...), so that a
    machine's drift (heat, other load) falls on every run alike."""
    out: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            out[name].append(runs[name]())
    return out


def workloads(tiny: bool, steps: int) -> list[Workload]:
    n = (steps + 2) * 128
    rng = np.random.default_rng(0)
    cifar = Workload(
        name="cifar-shaped (32x32x3, PreResNet-20, 3-member PreResNet-20 teacher)",
        x=rng.random((n, 3, 32, 32), dtype=np.float32), y=rng.integers(0, 100, n), arch="preresnet20",
        num_classes=100, augment_spec=AugmentSpec("rgb", 4, True),
    )
    arrays = load_arrays("mnist1d")
    info = DATASET_INFO["mnist1d"]
    embedded = Workload(
        name="embedded default (mnist1d, MLP, 3-member MLP teacher)", x=arrays.x_train[:n], y=arrays.y_train[:n],
        arch="mlp", num_classes=info.num_classes, augment_spec=AugmentSpec(info.kind, info.crop_pad, info.hflip),
    )
    return [cifar, embedded]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few batches, to check the benchmark runs")
    parser.add_argument("--steps", type=int, default=None, help="timed batches per path (default 20, tiny 2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, interleaved (default 3, "
                        "tiny 1)")
    args = parser.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    steps = args.steps or (2 if args.tiny else 20)
    peak_size = 512 if args.tiny else 2048
    measured = {str(dt).split(".")[1]: matmul_peak(device, dt, peak_size) for dt in (torch.float32, torch.bfloat16)}
    peaks = {name: flops for name, (flops, _) in measured.items()}
    sides = {name: side for name, (_, side) in measured.items()}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch threads {torch.get_num_threads()}")
    print(f"measured matmul peak: fp32 {peaks['float32'] / 1e9:.0f} GFLOP/s ({sides['float32']}²), "
          f"bf16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s ({sides['bfloat16']}²)")
    ratios, record = [], {"versions": versions(), "device": name, "peaks": peaks, "peak_sides": sides,
                          "workloads": []}
    for w in workloads(args.tiny, steps):
        shape = tuple(w.x.shape[1:])
        path = fastpath.choose(
            w.arch, w.arch, shape, w.num_classes, "batch", w.members, w.batch_size, str(device), "auto"
        )
        bf16 = path.bf16
        print(f"{w.name}: kd_ray fast path measured as {path.describe()}")
        runs: dict[str, Callable[[], float]] = {
            "reference": lambda w=w: reference_epoch(w, device, steps),
            "kd_ray": lambda w=w, path=path: kd_ray_epoch(w, device, steps, path),
        }
        if device.type == "cuda":
            runs["reference, 4 loader workers, pinned"] = lambda w=w: reference_epoch(w, device, steps, workers=4)
        rates = interleaved(runs, repeats)
        for what, values in rates.items():
            print(f"{w.name}: {what} median {statistics.median(values):,.0f} img/s "
                  f"(min {min(values):,.0f}, max {max(values):,.0f}, {len(values)} runs)")
        reference, fast = statistics.median(rates["reference"]), statistics.median(rates["kd_ray"])
        flops = step_flops_per_image(w, device)
        achieved = flops * fast
        peak = peaks["bfloat16" if bf16 else "float32"]
        ratio = fast / reference
        ratios.append(ratio)
        print(f"{w.name}: reference {reference:,.0f} img/s, kd_ray {fast:,.0f} img/s, ratio {ratio:.2f}x; "
              f"step {flops / 1e6:.1f} MFLOP/img, {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.1%} of the "
              f"measured {'bf16' if bf16 else 'fp32'} matmul peak ({achieved / peaks['bfloat16']:.1%} of bf16)")
        record["workloads"].append({"name": w.name, "runs": rates, "reference": reference, "kd_ray": fast,
                                    "ratio": ratio, "flops_per_image": flops, "fast_path": path.describe()})
    print("json: " + json.dumps(record))
    print(f"speedup: {ratios[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
