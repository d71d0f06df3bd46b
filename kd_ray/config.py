"""TrialConfig: every knob of one distillation trial, validated and hashable.

One flat set of names is shared by ``--set key=value``, study axes, Optuna search spaces and the
columns of the trial tables. Validation happens here, before any compute, and raises a single
``ConfigError`` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# Names known without importing torch; data/datasets.py, models/archs.py and data/augment.py hold the
# real registries and a test keeps these in step with them.
DATASETS = ("mnist1d", "digits", "mnist", "cifar10", "cifar100", "mnist_full", "emnist_digits")
# Each dataset's class count: chance agreement and accuracy are one over it (the findings use it).
NUM_CLASSES = {"mnist1d": 10, "digits": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "mnist_full": 10,
               "emnist_digits": 10}
OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("cosine", "constant")
INITS = ("random", "teacher_init", "interpolate")
TEACHER_SPLITS = ("full", "half")
DISTILL_SPLITS = ("train", "holdout", "both")
NORMS = ("batch", "group", "none")
PRECISIONS = ("auto", "fp32", "bf16")
# Where extra distillation inputs come from: the dataset's own generator (mnist1d: perfect in-domain
# samples), a Gaussian mixture fitted to the teacher's training inputs (synthetic samples, paper E1),
# out-of-domain inputs (another dataset's, paper E3's OOD policy), or a user's .npz file.
EXTRA_SOURCES = ("generator", "gmm", "ood", "npz")
TEACHER_SHARINGS = ("per_seed", "shared")
# The divergence the student minimises against its teacher (kd_ray.train.losses says each one's direction).
LOSSES = ("kl", "reverse_kl", "jsd", "symmetric_kl", "soft_ce", "mse_logits")
TEACHER_ROLES = ("reference", "control")  # the trial's own teacher ensemble | the control's independent one
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3}
# The most of the train split a validation split may take: the rest must still be most of the training data.
MAX_VAL_FRACTION = 0.5
# The version of each dataset's arrays (data/datasets.py's cache version): part of a teacher member's identity,
# because a member stores its logits on the test set.
DATASET_VERSIONS = {"mnist1d": 2, "digits": 1, "mnist": 1, "cifar10": 1, "cifar100": 1, "mnist_full": 1,
                    "emnist_digits": 1}


class ConfigError(ValueError):
    """A trial or study specification that cannot run; raised before any compute starts."""


EXIT_BAD_INPUT = 2  # the exit code of every command that refuses its input (argparse's own code, too)
EXIT_RAY = 5  # a study's Ray did not start, or its head (the GCS) was lost mid-study


# --- random streams ----------------------------------------------------------------------------

# Every random draw of a trial has its own kind of stream. A teacher member or student takes three:
# its initial weights, its batch order and its augmentation draws.
STREAM_KINDS = (
    "val_holdout",  # the validation examples held out of the train split (data/splits.py)
    "data_half", "teacher_subset", "distill_subset",  # the D0/D1 split and the fractions (data/splits.py)
    "member_init", "member_batches", "member_augment",  # a member of the reference teacher ensemble
    "control_member_init", "control_member_batches", "control_member_augment",  # of the control's ensemble
    "student_init", "student_batches", "student_augment",
    "control_student_init", "control_student_batches", "control_student_augment",
    "eval_augment",  # the augmented pass over the distillation set (aug_train_agreement)
    "extra_samples",  # drawing the extra inputs of a replicate (gmm: its fit and its samples; ood: which)
    "extra_batches",  # which extra inputs join each batch (extra_ratio > 0)
)
# The version of the derivation in seed_stream: part of every teacher member's identity, so members
# drawn under another derivation are trained again rather than reused.
STREAM_VERSION = 1
# The version of how an epoch splits into batches (kd_ray.train.distill.batches_per_epoch): part of every
# teacher member's identity too, so a member batched another way is trained again rather than reused.
BATCHING_VERSION = 2
_KEY_LIMIT = 2**32  # a key word is one uint32 of the SeedSequence entropy


def seed_stream(kind: str, *key: int) -> int:
    """An independent seed (a non-negative int below 2**63) for one purpose ``kind`` and its ``key``.

    The entropy is ``[crc32(kind), len(key), *key]`` hashed by ``numpy.random.SeedSequence``: stable
    across processes and versions of Python, different for every kind, and the length keeps keys
    of different lengths apart (SeedSequence alone maps ``[a]`` and ``[a, 0]`` to the same state).
    Each key word must be an integer in [0, 2**32)."""
    if kind not in STREAM_KINDS:
        raise ValueError(f"unknown stream kind {kind!r}; known kinds: {', '.join(STREAM_KINDS)}")
    for word in key:
        if isinstance(word, bool) or not isinstance(word, (int, np.integer)) or not 0 <= word < _KEY_LIMIT:
            raise ValueError(f"stream {kind!r}: key {key!r} must hold integers in [0, 2**32)")
    entropy = [zlib.crc32(kind.encode()), len(key), *(int(word) for word in key)]
    state = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 1  # 63 bits: every torch and numpy seed argument takes it


class Streams(NamedTuple):
    """The seeds of one trained network: its initial weights, its batch order, its augmentation draws."""

    init: int
    batches: int
    augment: int


def network_streams(network: str, *key: int) -> Streams:
    """The streams of ``network`` (member, control_member, student or control_student) for ``key``."""
    return Streams(*(seed_stream(f"{network}_{draw}", *key) for draw in Streams._fields))


@dataclass(frozen=True)
class TrialConfig:
    # data
    dataset: str = "mnist1d"
    teacher_split: str = "full"  # full: teacher sees all train data; half: a seeded half D0
    distill_split: str = "train"  # train: the teacher's data (D0 under half); holdout: D1; both
    distill_fraction: float = 1.0  # stratified, seeded fraction of the distillation split
    distill_dataset: str = ""  # "": the teacher's dataset; else distil on that dataset's train inputs instead
    extra_data: int = 0  # extra inputs added to the distillation data, from extra_source
    extra_source: str = "generator"  # generator (mnist1d) | gmm | ood (mnist1d) | npz (extra_path)
    extra_path: str = ""  # the .npz of extra_source='npz'
    extra_ratio: float = 0.0  # 0: extras join the distillation set; > 0: this many per distillation input in a batch
    teacher_fraction: float = 1.0  # stratified, seeded fraction of its split the teacher trains on
    # Stratified fraction of the train split held out as validation data (val_* metrics), drawn first and
    # seen by no teacher or student; 0: none held out, the val_* metrics are NaN.
    val_fraction: float = 0.1
    data_seed: int = 0  # seeds the validation split and the D0/D1 split; part of the teacher's identity
    # teacher
    teacher_arch: str = "mlp"  # a name of models/archs.py, or a user factory: module:function or file.py:function
    teacher_arch_args: str = ""  # a user factory's keyword arguments, a JSON object ("": none)
    teacher_members: int = 3
    teacher_epochs: int = 30
    teacher_lr: float = 0.05
    teacher_batch_size: int = 128
    teacher_seed: int = 0  # keys the members' streams, with the replicate under per_seed (teacher_replicate)
    teacher_sharing: str = "per_seed"  # per_seed: replicate `seed` has its own ensemble | shared: one for all
    norm: str = "batch"  # normalisation layers of teacher and student: batch | group | none
    # student and distillation
    student_arch: str = "mlp"
    student_arch_args: str = ""  # as teacher_arch_args, for the student's factory
    temperature: float = 4.0
    alpha: float = 0.0
    loss: str = "kl"  # the distillation divergence: one of LOSSES (kl: forward KL(teacher || student))
    jsd_beta: float = 0.5  # loss='jsd': the mixture weight of the teacher, M = beta * p_t + (1 - beta) * p_s
    augmentation: str = "baseline"
    mixup_alpha: float = 1.0
    epochs: int = 20
    steps: int = 0  # > 0: exactly this many optimizer steps, whatever the data size (epochs is then unused)
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: the optimizer's default (sgd 0.05, adam 1e-3)
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"
    init: str = "random"
    init_lambda: float = 0.0
    control: bool = False  # also distil from an independent teacher (paper section 3.2)
    seed: int = 0  # the replicate: keys the student's streams (and its teacher's under per_seed)
    eval_every: int = 5
    device: str = "auto"
    precision: str = "auto"  # student forward passes: auto (by measurement per device) | fp32 | bf16
    compile: bool = False  # torch.compile the student
    # Write each evaluation set's per-example teacher and student predictions (top-k) to Parquet beside the tables.
    save_predictions: bool = False

    def __post_init__(self) -> None:
        if self.lr is None and self.optimizer in DEFAULT_LR:
            object.__setattr__(self, "lr", DEFAULT_LR[self.optimizer])
        for name in ARCH_ARGS_FIELDS:  # one spelling per set of arguments: the config stays flat and hashable
            object.__setattr__(self, name, canonical_arch_args(name, getattr(self, name)))
        _validate(self)

    # construction -------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrialConfig":
        """Build from a plain dict (CLI, Ray Tune config, table row); unknown keys are refused."""
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown field '{key}'{hint} Known fields: {', '.join(names)}")
        coerced = {k: _coerce(k, v) for k, v in values.items()}
        return cls(**coerced)

    def replace(self, **changes: Any) -> "TrialConfig":
        return TrialConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    # identity -----------------------------------------------------------------------------------
    @property
    def teacher_replicate(self) -> int | None:
        """The replicate whose ensemble this trial distils from: its own ``seed`` under
        ``teacher_sharing='per_seed'``, None under ``shared`` (one ensemble for every seed).

        Member i of the ensemble draws its streams from ``(teacher_seed, replicate, i)`` (per_seed) or
        ``(teacher_seed, i)`` (shared), so ensembles of any size within one replicate share members."""
        return self.seed if self.teacher_sharing == "per_seed" else None

    def teacher_spec(self, member: int | None = None, role: str = "reference") -> dict[str, Any]:
        """The fields that decide a teacher member's weights; ``member=None`` for the ensemble.

        ``role='control'`` names the independent ensemble of the control (paper section 3.2): its
        members draw from streams of their own kind, never from the reference's."""
        if role not in TEACHER_ROLES:
            raise ValueError(f"teacher role {role!r} is not one of {', '.join(TEACHER_ROLES)}")
        spec = {
            "dataset": self.dataset,
            # A user's dataset has no version: the hash of its arrays (or of its .npz file) stands in for one.
            "data_version": user_dataset_digest(self.dataset) if is_user_dataset(self.dataset)
            else DATASET_VERSIONS[self.dataset],
            "val_fraction": float(self.val_fraction),  # 0 and 0.0 hold out the same examples: one key
            "teacher_split": self.teacher_split,
            "teacher_fraction": self.teacher_fraction,
            "data_seed": self.data_seed,
            "teacher_arch": self.teacher_arch,
            "teacher_epochs": self.teacher_epochs,
            "teacher_lr": self.teacher_lr,
            "teacher_batch_size": self.teacher_batch_size,
            "teacher_seed": self.teacher_seed,
            "replicate": self.teacher_replicate,
            "role": role,
            "streams": STREAM_VERSION,
            "batching": BATCHING_VERSION,
            "norm": self.norm,
        }
        if is_user_function(self.teacher_arch):
            # Added only for a user's factory, so the keys of the built-in archs stay as they were. The hash of the
            # factory's source file makes an edited model a new teacher, trained again.
            spec["teacher_arch_args"] = self.teacher_arch_args
            spec["teacher_arch_source"] = file_digest(user_source_file("teacher_arch", self.teacher_arch))
        if member is None:
            spec["teacher_members"] = self.teacher_members
        else:
            spec["member"] = member
        return spec

    def teacher_key(self, role: str = "reference") -> str:
        """Stable content hash of the teacher ensemble this trial distils from (or the control's)."""
        return content_hash(self.teacher_spec(None, role))


def content_hash(spec: dict[str, Any]) -> str:
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_set(expressions: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings from ``--set``; values are coerced later by ``from_dict``."""
    values: dict[str, Any] = {}
    for expr in expressions:
        key, sep, value = expr.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{expr}'")
        if key in values:
            # The last would win silently: a sweep meant as two values would run one.
            raise ConfigError(f"--set {key} is given twice ({values[key]!r} and {value.strip()!r}); allowed: each "
                              f"key once (to run several values, use a study's axis)")
        values[key] = value.strip()
    return values


# --- a user's model or dataset -----------------------------------------------------------------

# A user's factory or dataset function is named as ``package.module:function`` (imported from the Python
# path) or ``path/to/file.py:function`` (loaded from that file, whatever the Python path); a user's dataset
# may also be a ``.npz`` file. The value stays as the user wrote it: a relative path is resolved when it is
# read (``user_path``). Only the syntax is checked here; train/setup.py imports, builds and runs them.
ARCH_ARGS_FIELDS = ("teacher_arch_args", "student_arch_args")
USER_FUNCTION_HELP = "package.module:function or path/to/file.py:function"
ARCH_ARGS_HELP = "a JSON object of the factory's keyword arguments, e.g. '{\"hidden\": 64}'"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_FUNCTION = re.compile(rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}$")
_FILE_FUNCTION = re.compile(rf"^.+\.py:{_IDENTIFIER}$")
_DIGESTS: dict[tuple[str, int, int], str] = {}  # file digests of this process, by (path, mtime, size)
_MODULES: dict[tuple[str, int, int], Any] = {}  # user files loaded by this process, by (path, mtime, size)
_USER_DATA: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}  # a dataset function's arrays and their hash


def is_user_function(value: Any) -> bool:
    """Whether ``value`` names a user's function (``module:function`` or ``file.py:function``), not a built-in."""
    return isinstance(value, str) and ":" in value


def is_user_dataset(value: Any) -> bool:
    """Whether the dataset ``value`` is a user's: a ``.npz`` file or a function returning the arrays."""
    return isinstance(value, str) and (value.endswith(".npz") or is_user_function(value))


def check_user_function_syntax(field: str, value: str) -> None:
    if not (_MODULE_FUNCTION.match(value) or _FILE_FUNCTION.match(value)):
        raise ConfigError(f"{field}={value!r} does not name a function; allowed: {USER_FUNCTION_HELP}")


def user_path(path: str) -> str:
    """A user's file, absolute: a relative path is taken from the directory the command started in."""
    if os.path.isabs(path):
        return path
    # A Ray Tune trial runs in a directory of its own and names the one its study started in here.
    return os.path.join(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd(), path)


def canonical_arch_args(field: str, value: Any) -> str:
    """The one spelling of a factory's keyword arguments: a JSON object with sorted keys ("" for none), from a
    JSON string (``--set``) or a mapping (YAML, TOML, a dict)."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return ""
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field}={text!r} is not JSON ({exc.msg}); allowed: {ARCH_ARGS_HELP}") from None
    if not isinstance(value, dict) or not all(isinstance(key, str) and key.isidentifier() for key in value):
        raise ConfigError(f"{field}={value!r} is not a JSON object of keyword names; allowed: {ARCH_ARGS_HELP}")
    try:
        return json.dumps(value, sort_keys=True) if value else ""
    except (TypeError, ValueError):
        raise ConfigError(f"{field}={value!r} holds a value JSON cannot write; allowed: {ARCH_ARGS_HELP}") from None


def file_digest(path: str) -> str:
    """The sha256 of a file's bytes, read once per process while its mtime and size stay the same."""
    try:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        if key not in _DIGESTS:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            _DIGESTS[key] = digest.hexdigest()
    except OSError as exc:
        raise ConfigError(f"cannot read {path!r} ({exc.strerror or exc}); allowed: an existing, readable file"
                          ) from None
    return _DIGESTS[key]


def user_source_file(field: str, reference: str) -> str:
    """The source file of the user's function ``reference``: the named file, or the module's file as the Python
    path finds it (the module itself is not run)."""
    where = reference.rsplit(":", 1)[0]
    if where.endswith(".py"):
        path = user_path(where)
        if not os.path.isfile(path):
            raise ConfigError(f"{field}={reference!r}: there is no file {path}; allowed: {USER_FUNCTION_HELP}")
        return path
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        raise ConfigError(f"{field}={reference!r}: module {where!r} is not on the Python path; allowed: "
                          f"{USER_FUNCTION_HELP}")
    return spec.origin


def _load_file_module(path: str) -> Any:
    """The module of a user's file, loaded by its path (not the Python path); again only once it changed."""
    stat = os.stat(path)
    key = (path, stat.st_mtime_ns, stat.st_size)
    if key not in _MODULES:
        name = f"kd_ray_user_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path} is not a Python source file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # classes defined in the file then pickle by reference, as any module's
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


def import_user_function(field: str, reference: str) -> Any:
    """The callable ``reference`` names; one ``ConfigError`` line when its module does not import or it is
    not there."""
    check_user_function_syntax(field, reference)
    path = user_source_file(field, reference)
    where, name = reference.rsplit(":", 1)
    try:
        module = _load_file_module(path) if where.endswith(".py") else importlib.import_module(where)
    except Exception as exc:  # whatever the user's module raises while it is imported
        raise ConfigError(f"{field}={reference!r}: importing {where} failed ({type(exc).__name__}: {exc}); "
                          f"allowed: {USER_FUNCTION_HELP} whose module imports") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{field}={reference!r}: {where} has no callable {name!r}; allowed: {USER_FUNCTION_HELP} "
                          "naming a function of that module")
    return function


def call_user_dataset(reference: str) -> tuple[dict[str, Any], str]:
    """What the user's dataset function ``reference`` returns, and the sha256 of its arrays' bytes (with their
    dtypes and shapes): called once per process while its source file stays the same."""
    key = (reference, file_digest(user_source_file("dataset", reference)))
    if key not in _USER_DATA:
        function = import_user_function("dataset", reference)
        try:
            arrays = function()
        except Exception as exc:  # whatever the user's function raises
            raise ConfigError(f"dataset={reference!r}: calling it failed ({type(exc).__name__}: {exc}); allowed: a "
                              "function returning a dict of x_train, y_train, x_test, y_test") from None
        if not isinstance(arrays, dict):
            raise ConfigError(f"dataset={reference!r} returned {type(arrays).__name__}; allowed: a dict of x_train, "
                              "y_train, x_test, y_test (and optional num_classes)")
        digest = hashlib.sha256()
        for name in sorted(arrays):
            array = np.ascontiguousarray(arrays[name])
            digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
            digest.update(array.tobytes())
        _USER_DATA[key] = (arrays, digest.hexdigest())
    return _USER_DATA[key]


def user_dataset_digest(dataset: str) -> str:
    """What stands for a user's dataset's version in a teacher's identity: the sha256 of its ``.npz`` file's
    bytes, or of the arrays its function returns."""
    if dataset.endswith(".npz"):
        return "sha256:" + file_digest(user_path(dataset))
    return "sha256:" + call_user_dataset(dataset)[1]


# --- validation --------------------------------------------------------------------------------

_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrialConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn strings (from --set or YAML) into the field's type; leave typed values alone."""
    kind = _FIELD_TYPES[name]
    if not isinstance(value, str) or kind == "str":
        return value
    text = value.strip()
    try:
        if kind == "int":
            return int(text)
        if kind in ("float", "float | None"):
            if kind == "float | None" and text.lower() in ("none", ""):
                return None
            return float(text)
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        allowed = {"int": "an integer", "bool": "true or false"}.get(kind, "a number")
        raise ConfigError(f"{name}={value!r} is not {allowed}") from None
    return value


def _check_type(cfg: TrialConfig, name: str, kinds: tuple[type, ...], what: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{name}={value!r} is not {what}")
    if not isinstance(value, kinds):
        raise ConfigError(f"{name}={value!r} is not {what}")


def _check_extra_inputs(cfg: TrialConfig) -> None:
    if not isinstance(cfg.extra_path, str):
        raise ConfigError(f"extra_path={cfg.extra_path!r} must be a path (a string)")
    if cfg.extra_source == "npz" and not cfg.extra_path:
        raise ConfigError("extra_source='npz' needs extra_path, the .npz file of extra inputs (x, optional y)")
    if cfg.extra_path and cfg.extra_source != "npz":
        raise ConfigError(f"extra_path={cfg.extra_path!r} is read only with extra_source='npz'; "
                          f"got extra_source={cfg.extra_source!r}")
    if cfg.extra_data == 0:
        return
    if cfg.extra_source in ("generator", "ood") and cfg.dataset != "mnist1d":
        what = "generate in-domain samples" if cfg.extra_source == "generator" else "take out-of-domain inputs"
        raise ConfigError(
            f"extra_data={cfg.extra_data} with extra_source={cfg.extra_source!r} needs a dataset that can "
            f"{what} (mnist1d); got dataset={cfg.dataset!r} (extra_source 'gmm' or 'npz' work for any dataset)"
        )
    if cfg.extra_source == "ood" and cfg.alpha > 0:
        raise ConfigError(f"alpha={cfg.alpha} needs labels, and out-of-domain inputs (extra_source='ood') have "
                          "none: use alpha=0")


def _check_distill_dataset(cfg: TrialConfig) -> None:
    """Another dataset's train inputs as the distillation set; its input shape and classes must be the
    teacher's dataset's (``setup.check_runnable`` judges that from the data registry)."""
    _check_type(cfg, "distill_dataset", (str,), "a string")
    if not cfg.distill_dataset:
        return
    others = [name for name in DATASETS if name != cfg.dataset]
    if is_user_dataset(cfg.distill_dataset) and cfg.distill_dataset != cfg.dataset:
        _check_dataset(cfg, "distill_dataset")
    elif cfg.distill_dataset not in others:
        raise ConfigError(f"distill_dataset={cfg.distill_dataset!r} is not allowed with dataset={cfg.dataset!r}; "
                          f"choose '' (the teacher's dataset) or another dataset: {', '.join(others)}")
    if cfg.distill_split != "train":
        raise ConfigError(f"distill_split={cfg.distill_split!r} has no meaning with distill_dataset="
                          f"{cfg.distill_dataset!r}: the student distils on (distill_fraction of) that dataset's "
                          "train inputs, not a split of the teacher's; leave distill_split at 'train'")


def _check_dataset(cfg: TrialConfig, field: str) -> None:
    """A built-in dataset's name, a ``.npz`` file or a user's function (data/datasets.py reads and checks them)."""
    value = getattr(cfg, field)
    if is_user_function(value) and not value.endswith(".npz"):
        check_user_function_syntax(field, value)
    elif value not in DATASETS and not is_user_dataset(value):
        close = difflib.get_close_matches(str(value), DATASETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{field}={value!r} is not allowed{hint}; choose one of: {', '.join(DATASETS)}, a .npz file "
                          f"or {USER_FUNCTION_HELP}")


def _check_archs(cfg: TrialConfig) -> None:
    """A user's factory has the syntax of one, and only a user's factory takes keyword arguments."""
    for field in ("teacher_arch", "student_arch"):
        arch, args = getattr(cfg, field), getattr(cfg, f"{field}_args")
        if is_user_function(arch):
            check_user_function_syntax(field, arch)
        elif args:
            raise ConfigError(f"{field}_args={args!r} is read only by a user's factory, and {field}={arch!r} is "
                              f"built in; allowed: {field}_args='' or {field}={USER_FUNCTION_HELP}")


def _check_choice(cfg: TrialConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{name}={value!r} is not allowed{hint}; choose one of: {', '.join(allowed)}")


def _bound(value: float) -> str:
    if value == math.inf:
        return "inf"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_range(cfg: TrialConfig, name: str, low: float, high: float, low_open: bool, high_open: bool) -> None:
    value = getattr(cfg, name)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{_bound(low)}, {_bound(high)}{right}"
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value!r} must be a finite number; allowed: {allowed}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        raise ConfigError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _validate(cfg: TrialConfig) -> None:
    strings = ("dataset", "teacher_split", "distill_split", "teacher_arch", "teacher_sharing", "norm",
               "student_arch", "augmentation", "optimizer", "lr_schedule", "init", "device", "precision",
               "extra_source", "loss")
    for name in strings:
        _check_type(cfg, name, (str,), "a string")

    _check_dataset(cfg, "dataset")
    _check_archs(cfg)
    _check_choice(cfg, "teacher_split", TEACHER_SPLITS)
    _check_choice(cfg, "distill_split", DISTILL_SPLITS)
    _check_choice(cfg, "teacher_sharing", TEACHER_SHARINGS)
    _check_choice(cfg, "norm", NORMS)
    _check_choice(cfg, "optimizer", OPTIMIZERS)
    _check_choice(cfg, "lr_schedule", LR_SCHEDULES)
    _check_choice(cfg, "init", INITS)
    _check_choice(cfg, "precision", PRECISIONS)
    _check_choice(cfg, "extra_source", EXTRA_SOURCES)
    _check_choice(cfg, "loss", LOSSES)
    ints = ("extra_data", "data_seed", "teacher_members", "teacher_epochs", "teacher_batch_size", "teacher_seed",
            "epochs", "steps", "batch_size", "seed", "eval_every")
    for name in ints:
        _check_type(cfg, name, (int,), "an integer")
    floats = ("distill_fraction", "teacher_fraction", "val_fraction", "extra_ratio", "teacher_lr", "temperature",
              "alpha", "mixup_alpha", "lr", "weight_decay", "init_lambda", "jsd_beta")
    for name in floats:
        _check_type(cfg, name, (int, float), "a number")
    for name in ("control", "compile", "save_predictions"):
        _check_type(cfg, name, (bool,), "true or false")

    inf = math.inf
    _check_range(cfg, "distill_fraction", 0, 1, True, False)
    _check_range(cfg, "teacher_fraction", 0, 1, True, False)
    _check_range(cfg, "val_fraction", 0, MAX_VAL_FRACTION, False, False)
    _check_range(cfg, "temperature", 0, inf, True, True)
    _check_range(cfg, "alpha", 0, 1, False, False)
    _check_range(cfg, "mixup_alpha", 0, inf, True, True)
    _check_range(cfg, "lr", 0, inf, True, True)
    _check_range(cfg, "teacher_lr", 0, inf, True, True)
    _check_range(cfg, "weight_decay", 0, inf, False, True)
    _check_range(cfg, "init_lambda", 0, 1, False, False)
    _check_range(cfg, "jsd_beta", 0, 1, True, True)
    for name in ("teacher_members", "teacher_epochs", "teacher_batch_size", "epochs", "batch_size", "eval_every"):
        _check_range(cfg, name, 1, inf, False, True)
    _check_range(cfg, "extra_data", 0, inf, False, True)
    _check_range(cfg, "extra_ratio", 0, 4, False, False)
    _check_range(cfg, "steps", 0, inf, False, True)
    for name in ("seed", "data_seed", "teacher_seed"):  # key words of seed_stream
        _check_range(cfg, name, 0, _KEY_LIMIT - 1, False, False)

    if not (cfg.device in ("auto", "cpu", "cuda", "mps") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device={cfg.device!r} is not allowed; choose auto, cpu, cuda, cuda:N or mps")
    if cfg.distill_split == "holdout" and cfg.teacher_split != "half":
        raise ConfigError(
            "distill_split='holdout' needs teacher_split='half' (the holdout half D1 exists only "
            f"when the teacher is trained on D0); got teacher_split={cfg.teacher_split!r}"
        )
    _check_extra_inputs(cfg)
    _check_distill_dataset(cfg)
    same_arch = (cfg.student_arch, cfg.student_arch_args) == (cfg.teacher_arch, cfg.teacher_arch_args)
    if cfg.init == "interpolate" and not same_arch:
        raise ConfigError(
            f"init='interpolate' needs student_arch == teacher_arch (and equal _args); got student_arch="
            f"{cfg.student_arch!r} ({cfg.student_arch_args or 'no args'}), teacher_arch={cfg.teacher_arch!r} "
            f"({cfg.teacher_arch_args or 'no args'})"
        )
    if cfg.init == "teacher_init" and not same_arch:
        raise ConfigError(
            f"init='teacher_init' needs student_arch == teacher_arch (and equal _args); got student_arch="
            f"{cfg.student_arch!r} ({cfg.student_arch_args or 'no args'}), teacher_arch={cfg.teacher_arch!r} "
            f"({cfg.teacher_arch_args or 'no args'})"
        )
    if cfg.init == "interpolate" and cfg.norm == "batch":
        raise ConfigError(
            "init='interpolate' needs norm='group' or norm='none': an interpolated network's "
            "function is not fixed by its weights under BatchNorm running statistics; got norm='batch'"
        )
