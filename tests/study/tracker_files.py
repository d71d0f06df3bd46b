"""Reading each experiment tracker's own files back without a network: a W&B offline run file, a
TensorBoard event file (scalars and the HParams plugin's summaries), and a study logged to all three."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[2]


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file (``run-<id>.wandb``): a 7-byte header (``:W&B``, magic,
    version), then LevelDB's log format: 32 KiB blocks of chunks, each with a 7-byte header (CRC-32,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left_in_block = 32768 - pos % 32768
        if left_in_block < 7:
            pos += left_in_block  # a block's tail too short for a header is padding
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _item_key(item) -> str:
    # An item names its key by key or by nested_key (the path of a nested value).
    return item.key or "/".join(item.nested_key)


def wandb_run(path: Path) -> dict:
    """A W&B offline run: its run record, config (the values of every config update), history (a dict per
    logged step) and summary."""
    records = wandb_records(path)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {_item_key(item): json.loads(item.value_json) for item in run.config.update}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            config.update({_item_key(item): json.loads(item.value_json) for item in record.config.update})
    history = [{_item_key(item): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    summary = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            summary.update({_item_key(item): json.loads(item.value_json) for item in record.summary.update})
    # W&B's config values are stored as {"value": ..., "desc": ...}.
    config = {k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in config.items()}
    return {"run": run, "config": config, "history": history, "summary": summary}


def tensorboard_events(path: Path) -> list:
    """The events of a TensorBoard event file (TFRecord framing: length, its CRC, data, CRC)."""
    from tensorboardX.proto import event_pb2

    data, pos, events = path.read_bytes(), 0, []
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event()
        event.ParseFromString(data[pos + 12:pos + 12 + length])
        events.append(event)
        pos += 12 + length + 4
    return events


def tensorboard_scalars(path: Path) -> dict[str, list[float]]:
    """Scalar values by tag from a TensorBoard event file."""
    return {tag: [value for _, value in points] for tag, points in tensorboard_run([path])["scalars"].items()}


def tensorboard_run(files: list[Path]) -> dict:
    """A TensorBoard run (the event files of one directory): ``scalars`` {tag: [(step, value)]}, and the
    HParams plugin's ``hparams`` {name: value} and ``metrics`` (the metric tags its experiment names)."""
    from google.protobuf.json_format import MessageToDict
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    scalars, hparams, metrics = {}, {}, []
    for path in sorted(files):
        for event in tensorboard_events(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = HParamsPluginData()
                    data.ParseFromString(value.metadata.plugin_data.content)
                    if data.HasField("session_start_info"):
                        hparams.update(MessageToDict(data.session_start_info)["hparams"])
                    if data.HasField("experiment"):
                        metrics = [info.name.tag for info in data.experiment.metric_infos]
                elif value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {"scalars": scalars, "hparams": hparams, "metrics": metrics}


def run_logged_study(root: Path, study: str, args: list[str]) -> dict:
    """Run ``studies/<study>.py`` with ``args`` logging to all three trackers without a network (MLflow in a
    file store under ``root``, W&B offline); what it wrote, its tables and its output."""
    tracking_uri = f"file://{root / 'mlruns'}"
    argv = [sys.executable, str(REPO / "studies" / f"{study}.py"), "--storage", str(root / "results"), *args,
            "--log", "mlflow", "--log", "wandb", "--log", "tensorboard", "--quiet"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_", "WANDB_"))}
    env.update(RAY_AUTH_MODE="disabled", MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_ALLOW_FILE_STORE="true",
               WANDB_MODE="offline", WANDB_CONFIG_DIR=str(root / "wandb-config"), WANDB_CACHE_DIR=str(root / "cache"))
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    study_dir = root / "results" / study
    return {"study_dir": study_dir, "tracking_uri": tracking_uri, "output": output,
            "trials": pd.read_parquet(study_dir / "trials.parquet"),
            "epochs": pd.read_parquet(study_dir / "epochs.parquet")}
