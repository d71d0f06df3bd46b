"""What keeps a study's faults to one line and its own Ray closed to the network.

- ``local_ray_settings``: the Ray a study starts on this machine listens on the loopback only and
  lets in no driver without the token made for that run, unless the environment says otherwise; its
  files and logs go into a directory made for the run that only this user can enter.
- ``signals_as_interrupt``: SIGTERM and SIGHUP stop a study as Ctrl-C does (saved state, exit 3).
- ``StorageError``, ``storage_error`` and ``StorageWatch``: a storage that runs out of space, turns
  read-only or disappears ends the study with one line naming it, at the first trial that meets it.
- ``write_spec``, ``read_spec``: what decides a study's trials, stored beside its tables, so that a
  resume can be held to it; ``restore_tuner``: a resume refuses a saved Ray Tune state it cannot read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from kd_ray.atomic import filesystem, is_uri, write_text
from kd_ray.config import ConfigError
from kd_ray.progress import log
from kd_ray.study.storage import (
    SPEC_FILE,
    STORAGE_FAULTS,
    TUNER_FILE,
    StorageError,
    is_experiment_state,
    os_error_detail,
)

# Ray's switch between a single-machine instance bound to the loopback (its default on macOS and
# Windows) and one that other machines can join (its default on Linux).
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)



# --- a local Ray: loopback only, a token made for the run, its files private ---------------------


def _refresh_ray_auth() -> None:
    """Ray reads RAY_AUTH_MODE and the token once per process and caches them: read them again."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")  # the config first: a cached token must never outlive token mode
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_temp_parent() -> str:
    """Where Ray itself would put its ``ray`` directory: $RAY_TMPDIR, else $TMPDIR on Linux, else /tmp.
    Ray's rule, not ``tempfile``'s (macOS's $TMPDIR is long): Ray's unix sockets live below it, and a
    socket's path holds at most 107 bytes."""
    if os.environ.get("RAY_TMPDIR"):
        return os.environ["RAY_TMPDIR"]
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return os.environ["TMPDIR"]
    return "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()


@contextlib.contextmanager
def local_ray_settings() -> Iterator[None]:
    """Around ``ray.init()`` .. ``ray.shutdown()`` of a Ray this study starts on this machine.

    Unless set already: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, so that the GCS, the raylet, the
    workers and the agents listen on 127.0.0.1 only, and ``RAY_AUTH_MODE=token`` with a random token
    in ``RAY_AUTH_TOKEN`` (unless ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH`` names one), so that
    no other driver on this machine gets in either. The token lives in the environment of this
    process and the Ray processes it starts, never in a file.

    Always, so that no secret in this environment reaches another local user: ``RAY_TMPDIR`` names a
    directory made for the run, of mode 0700 (``kd_ray-*`` where Ray would put its ``ray``). Ray makes
    its own temp directory world-writable and its logs readable by all, and its runtime env agent logs
    each runtime env with its environment variables; below this directory no other user reads any of
    it. It is kept after the study, for Ray's logs. And Ray Tune's list of variables to copy into each
    trial's runtime env loses the AWS credentials: Ray hands a runtime env to each new worker on its
    command line, which any local user reads in /proc, and the workers of a Ray started here inherit
    them from this process's environment anyway. Everything is restored afterwards."""
    import ray._private.ray_constants as ray_constants
    from ray.tune.execution import class_cache

    names = (LOOPBACK_SWITCH, "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_TMPDIR")
    saved = {name: os.environ.get(name) for name in names}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    saved_propagated = class_cache.ENV_VARS_TO_PROPAGATE
    parent = _ray_temp_parent()
    os.makedirs(parent, exist_ok=True)  # as Ray would make it
    # mkdtemp makes it 0700 (never more, whatever the umask); Ray puts its session in <private>/ray.
    private = tempfile.mkdtemp(prefix="kd_ray-", dir=parent)
    if saved[LOOPBACK_SWITCH] is None:
        os.environ[LOOPBACK_SWITCH] = "0"
        # Ray reads the switch when it is imported; the processes it starts read the environment.
        ray_constants.ENABLE_RAY_CLUSTER = False
    if saved["RAY_AUTH_MODE"] is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    listens = "127.0.0.1 only" if not ray_constants.ENABLE_RAY_CLUSTER else "every network interface"
    mode = os.environ["RAY_AUTH_MODE"]
    if mode != "token":
        auth = f"token authentication off (RAY_AUTH_MODE={mode})"
    elif saved["RAY_AUTH_TOKEN"] is None and os.environ.get("RAY_AUTH_TOKEN"):
        auth = "token authentication on, with a token made for this run"
    else:
        auth = "token authentication on"
    log(f"Ray: a local instance listening on {listens}, {auth}")
    os.environ["RAY_TMPDIR"] = private
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in saved_propagated if not name.startswith("AWS_")}
    log(f"Ray: its files and logs in {private}/ray, a directory only you can enter (kept after the study)")
    _refresh_ray_auth()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        class_cache.ENV_VARS_TO_PROPAGATE = saved_propagated
        _refresh_ray_auth()


# --- signals --------------------------------------------------------------------------------------


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a scheduler's stop) and SIGHUP (a closed terminal) act as Ctrl-C: Ray Tune,
    which handles SIGINT, stops the trials and saves its state; before and after Tune's run they
    raise KeyboardInterrupt. Python's default for both is to end the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def interrupt(signum: int, frame) -> None:
        log(f"received {signal.Signals(signum).name}: stopping the study as Ctrl-C does")
        handler = signal.getsignal(signal.SIGINT)  # Ray Tune's own while the trials run
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *INTERRUPTING_SIGNALS)}
    for sig in INTERRUPTING_SIGNALS:
        signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(sig, handler)


# --- storage faults -------------------------------------------------------------------------------

# errno -> (what happened to the storage, what to do before --resume)
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\] ([^:\n]+)(?:: '([^'\n]*)')?")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every exception behind it: causes, contexts, and a Ray task error's cause."""
    seen: set[int] = set()
    stack: list[Any] = [error]
    while stack:
        current = stack.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        stack += [getattr(current, "cause", None), current.__context__, current.__cause__]


def storage_error(error: BaseException, where: str) -> StorageError | None:
    """The StorageError behind ``error``, if a write to the storage at ``where`` failed there."""
    for exc in _chain(error):
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, OSError) and exc.errno in STORAGE_FAULTS:
            if exc.errno == errno.ENOENT and (is_uri(where) or os.path.isdir(where)):
                continue  # a file that is missing, not a storage that is
            filename = os.fspath(exc.filename) if exc.filename else None
            detail = os_error_detail(exc, filename)
            # A file outside the storage (a worker's temporary directory, say) is named as itself.
            storage = os.path.dirname(where.rstrip("/")) + "/"
            outside = filename is not None and os.path.isabs(filename) and not filename.startswith(storage)
            return StorageError(filename if outside else f"the storage {where}", exc.errno, detail)
    return None


def _identity(path: str) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class StorageWatch(tune.Callback):
    """Stops the study at the first trial that failed to write to the storage, and as soon as the
    study directory is gone or replaced, instead of letting Ray Tune retry trials that cannot save.

    Raising from a callback ends ``Tuner.fit()`` without Tune's final snapshot, so the saved state
    stays the last one written whole, and ``run_study`` reports the StorageError. A trial's error is
    read from the driver's own copy of the trial directory (``error.txt``), not from the storage.
    Ray Tune pickles its callbacks with the Tuner and a resumed study runs that copy: this holds
    plain values only and starts again in ``setup``."""

    def __init__(self, local: bool) -> None:
        self.local = local  # a local directory (or one filesystem mounted on every node)
        self.setup()

    def setup(self, **info) -> None:
        self.study_dir: str | None = None
        self.identity: tuple[int, int] | None = None

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if not self.local or not trials:
            return
        if self.study_dir is None:
            self.study_dir = os.path.dirname(trials[0].path)
            self.identity = _identity(self.study_dir)
        elif _identity(self.study_dir) != self.identity:
            raise StorageError(f"the storage {self.study_dir}", errno.ENOENT,
                                "the study directory is gone or is no longer the one the study began in")

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._check(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._check(trial)

    def _check(self, trial) -> None:
        study_dir = os.path.dirname(trial.path)
        for code, filename in _errno_lines(trial.error_file):
            error = OSError(code, os.strerror(code), filename) if filename else OSError(code, os.strerror(code))
            problem = storage_error(error, study_dir)
            if problem is not None:
                raise problem


def _errno_lines(error_file: str | None) -> list[tuple[int, str | None]]:
    """The OS errors in a trial's latest failure, from the text Ray Tune logs of it: Python writes an
    OSError as ``[Errno N] message: 'file'``; a trial's error holds its traceback, causes included."""
    if not error_file or not os.path.isfile(error_file):
        return []
    with open(error_file, errors="replace") as handle:
        latest = handle.read().rsplit("Failure # ", 1)[-1]
    return [(int(code), filename or None) for code, _, filename in _ERRNO_TEXT.findall(latest)]


# --- the spec a resume is held to, and the saved state it needs ------------------------------------


def write_spec(study_dir: str, spec: dict[str, Any]) -> None:
    write_text(f"{study_dir.rstrip('/')}/{SPEC_FILE}", json.dumps(spec, indent=1, sort_keys=True) + "\n")


def read_spec(study_dir: str) -> dict[str, Any] | None:
    """The spec stored by the study's first run; None for a study stored without one."""
    fs, path = filesystem(f"{study_dir.rstrip('/')}/{SPEC_FILE}")
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        with fs.open_input_stream(path) as handle:
            spec = json.loads(handle.read().decode("utf-8"))
        if not isinstance(spec, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume: the stored spec {path} is unreadable ({exc}); pass another --name "
                          f"to run the study anew") from None
    return spec


def _unresumable(study_dir: str, what: str) -> ConfigError:
    return ConfigError(
        f"cannot resume the study in {study_dir}: {what}. Nothing was run or changed; its finished trials stay "
        f"in their directories (and in trials.parquet). Pass another --name to run the study anew"
    )


def check_saved_state(study_dir: str) -> None:
    """Before a resume: Ray Tune's newest saved experiment state must be whole. Tune would otherwise
    take a cut-off state for an empty one and run every trial again."""
    fs, path = filesystem(study_dir)
    names = [info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))]
    states = sorted(n for n in names if is_experiment_state(n))
    if not states:
        return
    newest = f"{path}/{states[-1]}"
    try:
        with fs.open_input_stream(newest) as handle:
            state = json.loads(handle.read().decode("utf-8"))
        if not isinstance(state, dict) or "trial_data" not in state:
            raise ValueError("it holds no trial_data")
    except (OSError, ValueError) as exc:
        raise _unresumable(study_dir, f"Ray Tune's saved state {newest} is unreadable ({exc})") from None


def restore_tuner(study_dir: str, trainable, storage_filesystem: pafs.FileSystem | None):
    """``Tuner.restore`` of the study in ``study_dir``, unfinished and errored trials resumed; a saved
    Tuner that cannot be read (cut off, not Ray Tune's) is a ConfigError naming it. The experiment
    state is ``check_saved_state``'s, before any compute."""
    try:
        return tune.Tuner.restore(study_dir, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_filesystem)
    except Exception as exc:  # tuner.pkl cut off or not a pickle: EOFError, UnpicklingError, ...
        saved = f"{study_dir.rstrip('/')}/{TUNER_FILE}"
        problem = f"Ray Tune cannot restore its saved Tuner {saved} ({type(exc).__name__}: {exc})"
        raise _unresumable(study_dir, problem) from None
