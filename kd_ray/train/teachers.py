"""Teacher ensembles: train members, keep them in a content-addressed store, load them verified.

Each ensemble member is stored on its own, keyed by a hash of the fields that decide its weights
(``TrialConfig.teacher_spec(member)``), so an ensemble of 5 reuses the members of an ensemble of 3.
Those fields include what names the member's random streams (``member_streams``): teacher seed,
replicate (per-seed teachers), role (the reference ensemble or the control's) and the version of the
stream derivation, so a member is never reused under a draw it was not trained with. A user's factory adds
its arguments and a hash of its source file, and a user's dataset puts a hash of its arrays in place of the
data version, so an edited model or changed data is trained again.
A member directory holds ``weights.pt`` (initial and final state dicts), ``logits.pt`` (the member's
float32 logits on the test set and on the whole clean train set, so no trial recomputes them) and
``manifest.json`` (key, spec, sha256 of each file, metrics), written last: a member without a manifest
does not exist. Every read checks the member's address too: the directory's name must be both the
manifest's key and the hash of the manifest's spec, so a member copied over another is refused.
The store is a local directory or any pyarrow filesystem URI (s3://, gs://).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from kd_ray import __version__
from kd_ray.atomic import is_uri, write_bytes
from kd_ray.config import Streams, TrialConfig, content_hash, network_streams
from kd_ray.data.datasets import Arrays, dataset_info
from kd_ray.data.splits import split_indices
from kd_ray.models.archs import build_model
from kd_ray.models.ensembles import StackedEnsemble
from kd_ray.progress import Progress
from kd_ray.train.distill import AugmentSpec, Recipe, TrainState, build_seeded, fit, make_optimizer, predict, schedule
from kd_ray.train.metrics import accuracy

WEIGHTS, LOGITS, MANIFEST = "weights.pt", "logits.pt", "manifest.json"


class TeacherStoreError(RuntimeError):
    """A stored teacher is missing, truncated, corrupted or misplaced (not at its spec's address)."""


def default_store() -> str:
    return os.environ.get("KD_RAY_TEACHERS", str(Path.home() / ".cache" / "kd_ray" / "teachers"))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class TeacherStore:
    def __init__(self, root: str | os.PathLike) -> None:
        import pyarrow.fs as pafs

        root = str(root)
        if is_uri(root):
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(root)
            self.local = True
        self.uri = root if not self.local else self.root

    @property
    def fix(self) -> str:
        """The way on from a bad member, said by every refusal of one."""
        return (f"Run `kd-ray teachers verify --store {self.uri} --delete-bad` to remove the member, or pass "
                f"--retrain-teachers; it is then trained again.")

    def member_path(self, key: str) -> str:
        return f"{self.root}/members/{key}"

    def _read(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def has(self, key: str) -> bool:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(f"{self.member_path(key)}/{MANIFEST}")
        return info.type == pafs.FileType.File

    def keys(self) -> list[str]:
        import pyarrow.fs as pafs

        base = f"{self.root}/members"
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and self.has(i.base_name))

    def manifest(self, key: str) -> dict:
        path = f"{self.member_path(key)}/{MANIFEST}"
        try:
            return json.loads(self._read(path))
        except ValueError as exc:  # truncated or corrupted JSON (or bytes that are not UTF-8)
            raise TeacherStoreError(
                f"cannot parse {path}: {exc}. {self.fix}"
            ) from None

    def misplaced(self, key: str, manifest: object) -> str | None:
        """Why the member stored at ``key`` does not belong there, or None when it does.

        A member's address is the hash of its spec (``member_key``), and its manifest records both. A
        directory copied or moved over another (a mistaken rsync) keeps its own manifest and its own
        intact files, so only comparing the address with the manifest's key and with the hash of the
        manifest's spec tells member 1 sitting at member 0's address from member 0."""
        path = f"{self.member_path(key)}/{MANIFEST}"
        recorded = manifest.get("key") if isinstance(manifest, dict) else None
        spec = manifest.get("spec") if isinstance(manifest, dict) else None
        if not isinstance(recorded, str) or not isinstance(spec, dict):
            return f"{path} records no key or no spec, so the member's address cannot be checked. {self.fix}"
        spec_key = content_hash(spec)
        if recorded == key and spec_key == key:
            return None
        belongs = recorded if recorded != key else spec_key
        return (
            f"teacher member misplaced: it sits at {self.member_path(key)} but its manifest says it belongs at "
            f"{self.member_path(belongs)} (manifest key {recorded}, its spec hashes to {spec_key}), as when a "
            f"member directory is copied over another. {self.fix}"
        )

    def save(self, key: str, spec: dict, weights: dict, logits: dict, metrics: dict) -> None:
        """Write one member atomically: a reader sees the whole member or none of it."""
        if content_hash(spec) != key:  # every load would refuse it as misplaced
            raise ValueError(f"teacher member key {key} is not the hash of its spec ({content_hash(spec)})")
        blobs = {WEIGHTS: _to_bytes(weights), LOGITS: _to_bytes(logits)}
        manifest = {
            "key": key,
            "spec": spec,
            "files": {name: _sha256(data) for name, data in blobs.items()},
            "metrics": metrics,
            "kd_ray_version": __version__,
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        blobs[MANIFEST] = json.dumps(manifest, indent=2, sort_keys=True).encode()
        final = self.member_path(key)
        if self.local:
            # Build the member in a private directory, then rename it into place: rename is atomic
            # and fails if another writer got there first, in which case its copy stands.
            os.makedirs(os.path.dirname(final), exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{key}.", dir=os.path.dirname(final))
            try:
                for name, data in blobs.items():
                    write_bytes(os.path.join(staging, name), data)
                if os.path.isdir(final) and not self.has(key):
                    shutil.rmtree(final)  # leftovers of a member without a manifest
                try:
                    os.rename(staging, final)
                except OSError:
                    if not self.has(key):
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return
        # Object stores have no directory rename: every file is written atomically, the manifest last.
        for name in (WEIGHTS, LOGITS, MANIFEST):
            write_bytes(f"{self.uri.rstrip('/')}/members/{key}/{name}", blobs[name])

    def _verified_bytes(self, key: str, name: str) -> bytes:
        """The bytes of a member's file, after checking them against the manifest's sha256."""
        if not self.has(key):
            raise TeacherStoreError(f"teacher member {key} is not in the store {self.uri}")
        path = f"{self.member_path(key)}/{name}"
        manifest = self.manifest(key)
        problem = self.misplaced(key, manifest)
        if problem:
            raise TeacherStoreError(problem)
        try:
            expected = manifest["files"][name]
        except (KeyError, TypeError) as exc:
            raise TeacherStoreError(f"{self.member_path(key)}/{MANIFEST} lists no checksum for {name}: {exc}") from None
        try:
            data = self._read(path)
        except (OSError, FileNotFoundError) as exc:
            raise TeacherStoreError(f"cannot read {path}: {exc}") from None
        if _sha256(data) != expected:
            raise TeacherStoreError(f"checksum mismatch in {path}: the file is truncated or corrupted. {self.fix}")
        return data

    def load(self, key: str, name: str) -> dict:
        """Load ``weights.pt`` or ``logits.pt`` of a member, verified against its manifest."""
        data = self._verified_bytes(key, name)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # e.g. an UnpicklingError for objects other than tensors and containers
            problem = f"cannot load {self.member_path(key)}/{name} as weights only: {exc}"
            raise TeacherStoreError(f"{problem}. {self.fix}") from None

    def check(self, key: str) -> list[str]:
        """Address and checksum problems of one stored member, without unpickling anything (cheap)."""
        problems: list[str] = []
        for name in (WEIGHTS, LOGITS):
            try:
                self._verified_bytes(key, name)
            except TeacherStoreError as exc:
                _add_once(problems, str(exc))
        return problems

    def verify(self, key: str) -> list[str]:
        """Problems found in one member (empty when it is sound)."""
        problems: list[str] = []
        for name in (WEIGHTS, LOGITS):
            try:
                self.load(key, name)
            except (TeacherStoreError, RuntimeError, KeyError) as exc:
                _add_once(problems, str(exc))
        return problems

    def delete(self, key: str) -> None:
        self.fs.delete_dir(self.member_path(key))

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Serialise the training of one member across processes on this node's filesystem."""
        if not self.local:
            yield
            return
        os.makedirs(f"{self.root}/locks", exist_ok=True)
        with open(f"{self.root}/locks/{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _add_once(problems: list[str], problem: str) -> None:
    # A problem of the whole member (misplaced, unreadable manifest) is met once per file: report it once.
    if problem not in problems:
        problems.append(problem)


def _to_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# --- which members, on which data ---------------------------------------------------------------


class NeededMember(NamedTuple):
    """One teacher member a trial distils from: the config that decides it, its index, its role
    (``reference``: the trial's own ensemble; ``control``: the control's independent one)."""

    cfg: TrialConfig
    member: int
    role: str


def member_key(cfg: TrialConfig, member: int, role: str = "reference") -> str:
    return content_hash(cfg.teacher_spec(member, role))


def member_streams(cfg: TrialConfig, member: int, role: str = "reference") -> Streams:
    """The streams of member ``member``: keyed by ``(teacher_seed, replicate, member)`` for per-seed
    teachers and ``(teacher_seed, member)`` for shared ones; the control's members draw from streams
    of their own kind (control_member_*), so they never repeat a reference member."""
    network = "member" if role == "reference" else "control_member"
    replicate = cfg.teacher_replicate
    key = (cfg.teacher_seed, member) if replicate is None else (cfg.teacher_seed, replicate, member)
    return network_streams(network, *key)


def teacher_indices(cfg: TrialConfig, y_train: np.ndarray) -> np.ndarray:
    """The sorted train indices a teacher member of ``cfg`` is trained on.

    Decided by the teacher's fields alone (validation fraction, split, fraction, data seed: all in its
    ``teacher_spec``), never by the student's distillation split or fraction: every trial that shares a
    teacher trains it on the same data, and none of it is a validation example."""
    indices, _ = split_indices(
        y_train, teacher_split=cfg.teacher_split, distill_split="train", distill_fraction=1.0,
        data_seed=cfg.data_seed, seed=0, val_fraction=cfg.val_fraction, teacher_fraction=cfg.teacher_fraction,
    )
    return indices


def needed_members(configs: Iterable[TrialConfig]) -> dict[str, NeededMember]:
    """Every teacher member the configs distil from, keyed by member key (control members included).

    Per-seed teachers (the default) give each seed its own members; ensembles of different sizes in
    one replicate, and trials that differ only in student fields, share theirs."""
    members: dict[str, NeededMember] = {}
    for cfg in configs:
        roles = ("reference", "control") if cfg.control else ("reference",)
        for role in roles:
            for member in range(cfg.teacher_members):
                members.setdefault(member_key(cfg, member, role), NeededMember(cfg, member, role))
    return members


# --- the retrain policy and the store check ------------------------------------------------------


def delete_members(store: TeacherStore, keys: Iterable[str]) -> None:
    """Retrain: delete the stored members among ``keys``, each under its lock; they are trained again
    when next needed. The fix for a corrupted member (``--retrain-teachers``)."""
    for key in keys:
        if store.has(key):
            with store.lock(key):
                store.delete(key)


def check_stored_members(store: TeacherStore, keys: Iterable[str]) -> None:
    """Raise TeacherStoreError (naming the file and the fix) for the first stored member among ``keys``
    that is misplaced or whose files do not match their checksums. Members not in the store are left
    to be trained."""
    for key in keys:
        if store.has(key):
            problems = store.check(key)
            if problems:
                raise TeacherStoreError(problems[0])


# --- training -----------------------------------------------------------------------------------


def teacher_recipe(cfg: TrialConfig) -> Recipe:
    """The teachers' recipe: SGD momentum 0.9, cosine to 0, weight decay 1e-4, baseline augmentation."""
    return Recipe(
        epochs=cfg.teacher_epochs, batch_size=cfg.teacher_batch_size, optimizer="sgd",
        lr=cfg.teacher_lr, weight_decay=1e-4, lr_schedule="cosine", augmentation="baseline",
        nesterov=False,
    )


def member_steps(cfg: TrialConfig, y_train: np.ndarray) -> int:
    """The optimizer steps a teacher member of ``cfg`` trains for."""
    return schedule(teacher_recipe(cfg), len(teacher_indices(cfg, y_train))).total_steps


def member_generators(streams: Streams, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """A member's batch-order and augmentation generators, each seeded from its own stream: trained alone
    (``train_member``) or beside other members (``kd_ray.packs.members``), a member draws the same batches."""
    return (torch.Generator(device=device).manual_seed(streams.batches),
            torch.Generator(device=device).manual_seed(streams.augment))


class MemberStart(NamedTuple):
    """A member as it starts training, alone or fused: its seeded network, its initial weights, its training
    examples and its batch-order and augmentation generators."""

    model: torch.nn.Module
    initial: dict
    x_fit: torch.Tensor
    y_fit: torch.Tensor
    generators: tuple[torch.Generator, torch.Generator]


def _cpu_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def start_member(cfg: TrialConfig, member: int, role: str, arrays: Arrays, device: torch.device) -> MemberStart:
    """Member ``member`` of ``role`` before its first step, every draw from its own streams."""
    info = dataset_info(cfg.dataset)
    streams = member_streams(cfg, member, role)
    model = build_seeded(cfg.teacher_arch, info.input_shape, info.num_classes, cfg.norm, streams.init,
                         cfg.teacher_arch_args).to(device)
    fit_idx = torch.as_tensor(teacher_indices(cfg, arrays.y_train), device=device)
    x_fit = torch.as_tensor(arrays.x_train, device=device)[fit_idx]
    y_fit = torch.as_tensor(arrays.y_train, device=device)[fit_idx]
    return MemberStart(model, _cpu_state(model), x_fit, y_fit, member_generators(streams, device))


def finish_member(model: torch.nn.Module, initial: dict, arrays: Arrays,
                  device: torch.device) -> tuple[dict, dict, dict]:
    """A trained member as the store takes it: (weights, logits on the test and the whole train set, metrics);
    the metrics' ``train_time_s`` is the caller's to add."""
    x_test, x_train = torch.as_tensor(arrays.x_test, device=device), torch.as_tensor(arrays.x_train, device=device)
    logits = {"test": predict(model, x_test).cpu(), "train": predict(model, x_train).cpu()}
    metrics = {"test_acc": accuracy(logits["test"], torch.as_tensor(arrays.y_test)), "device": str(device)}
    return {"initial": initial, "final": _cpu_state(model)}, logits, metrics


def train_member(
    cfg: TrialConfig,
    member: int,
    arrays: Arrays,
    device: torch.device,
    role: str = "reference",
    progress: Progress | None = None,
) -> tuple[dict, dict, dict]:
    """Train one member from scratch; returns (weights, logits, metrics) ready for the store."""
    info = dataset_info(cfg.dataset)
    begin = start_member(cfg, member, role, arrays, device)
    recipe = teacher_recipe(cfg)
    batch_generator, augment_generator = begin.generators
    state = TrainState(begin.model, make_optimizer(begin.model, recipe), batch_generator,
                       augment_generator=augment_generator)
    augment_spec = AugmentSpec(info.kind, info.crop_pad, info.hflip)
    started = time.perf_counter()

    def on_epoch(epoch: int, loss: float, lr: float) -> None:
        if progress and (epoch % max(1, recipe.epochs // 5) == 0 or epoch == recipe.epochs):
            progress(f"teacher member {member}: epoch {epoch}/{recipe.epochs} loss {loss:.3f}")

    fit(state, begin.x_fit, begin.y_fit, recipe, augment_spec, teacher=None, on_epoch=on_epoch)
    weights, logits, metrics = finish_member(begin.model, begin.initial, arrays, device)
    metrics["train_time_s"] = time.perf_counter() - started
    return weights, logits, metrics


def ensure_members(
    cfg: TrialConfig,
    store: TeacherStore,
    arrays: Arrays,
    device: torch.device,
    *,
    role: str = "reference",
    members: list[int] | None = None,
    progress: Progress | None = None,
    retrain: bool = False,
) -> list[str]:
    """Make sure every member of the trial's ensemble of ``role`` (or those in ``members``) is in the
    store; train the missing ones. ``retrain=True`` deletes the stored ones first (``delete_members``)."""
    indices = members if members is not None else range(cfg.teacher_members)
    keys = [member_key(cfg, member, role) for member in indices]
    if retrain:
        delete_members(store, keys)
    for member, key in zip(indices, keys):
        if store.has(key):
            continue
        with store.lock(key):
            if store.has(key):  # trained by another process while we waited
                continue
            weights, logits, metrics = train_member(cfg, member, arrays, device, role, progress)
            store.save(key, cfg.teacher_spec(member, role), weights, logits, metrics)
            if progress:
                progress(f"teacher member {member} stored as {key} (test acc {metrics['test_acc']:.3f})")
    return keys


@dataclass
class Ensemble:
    """A loaded teacher ensemble: member models (eval mode) and their cached logits."""

    key: str
    models: list[torch.nn.Module]
    initial_states: list[dict]
    final_states: list[dict]
    test_logits: torch.Tensor  # [m, N_test, C]
    train_logits: torch.Tensor  # [m, N_train, C] on the whole clean train set

    def __post_init__(self) -> None:
        self.stacked = StackedEnsemble(self.models)

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Ensemble log-probabilities ``log(mean_i softmax(z_i))`` on a batch, all members in one call."""
        return self.stacked.log_probs(x)


def load_ensemble(cfg: TrialConfig, store: TeacherStore, device: torch.device, role: str = "reference") -> Ensemble:
    """The ensemble of ``cfg`` (the control's with ``role='control'``) from the store, verified, on ``device``."""
    info = dataset_info(cfg.dataset)
    models, initial, final, test, train = [], [], [], [], []
    for member in range(cfg.teacher_members):
        key = member_key(cfg, member, role)
        weights = store.load(key, WEIGHTS)
        logits = store.load(key, LOGITS)
        model = build_model(cfg.teacher_arch, info.input_shape, info.num_classes, cfg.norm, cfg.teacher_arch_args)
        model.load_state_dict(weights["final"])
        model.to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        models.append(model)
        initial.append(weights["initial"])
        final.append(weights["final"])
        test.append(logits["test"])
        train.append(logits["train"])
    return Ensemble(
        key=cfg.teacher_key(role), models=models, initial_states=initial, final_states=final,
        test_logits=torch.stack(test).to(device), train_logits=torch.stack(train).to(device),
    )
