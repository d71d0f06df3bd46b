"""Studies as files (kd_ray.study.files, ``kd-ray study run | show``) and ``--grid``: every file error is
one line naming the file and the line or key and exits 2 before any compute; every built-in study printed
by ``show`` reads back as the study its script runs; one tiny study run three ways writes the same trials."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import yaml

from kd_ray.cli import build_parser, main
from kd_ray.config import ConfigError, TrialConfig
from kd_ray.study.cli import file_study, preset_study, show_study, study_main, study_parser
from kd_ray.study.files import read_study_file, to_yaml
from kd_ray.study.presets import STUDIES


def write(tmp_path: Path, text: str, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"study{suffix}"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def run_args(path: Path, *flags: str):
    return build_parser().parse_args(["study", "run", str(path), *flags])


def refused(argv: list[str], capsys) -> str:
    """The one stderr line of a command that exits 2 and starts nothing."""
    import ray

    ray_was_running = ray.is_initialized()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    if not ray_was_running:
        assert not ray.is_initialized()
    return lines[0]


# --- reading ----------------------------------------------------------------------------------------

FULL_YAML = """
    name: full
    base:
      dataset: mnist1d
      lr: 1e-3            # YAML 1.1 reads this as a string: typed as the field's float
      control: yes
    axes:
      temperature: [1, 4.0]
      teacher_members: [1, 3]
    arms:
      - {optimizer: sgd, weight_decay: 0.0}
      - {optimizer: adam, weight_decay: 1e-4}
    seeds: [4, 7]
    scheduler: asha
    asha_grace_epochs: 3
    storage: somewhere
    cpus_per_trial: 0.5
    gpus_per_trial: 0
    max_concurrent_trials: null
    max_failures: 1
    pack: "off"
    trackers: [tensorboard]
"""
FULL_TOML = """
    name = "full"
    seeds = [4, 7]
    scheduler = "asha"
    asha_grace_epochs = 3
    storage = "somewhere"
    cpus_per_trial = 0.5
    gpus_per_trial = 0
    max_failures = 1
    pack = "off"
    trackers = ["tensorboard"]

    [base]
    dataset = "mnist1d"
    lr = 1e-3
    control = true

    [axes]
    temperature = [1, 4.0]
    teacher_members = [1, 3]

    [[arms]]
    optimizer = "sgd"
    weight_decay = 0.0

    [[arms]]
    optimizer = "adam"
    weight_decay = 1e-4
"""


@pytest.mark.parametrize("suffix, text", [(".yaml", FULL_YAML), (".toml", FULL_TOML), (".yml", FULL_YAML)])
def test_a_file_reads_as_typed_values(tmp_path, suffix, text):
    spec = read_study_file(write(tmp_path, text, suffix))
    assert spec.name == "full"
    assert spec.base == {"dataset": "mnist1d", "lr": 0.001, "control": True}
    assert spec.axes == {"temperature": [1.0, 4.0], "teacher_members": [1, 3]}
    assert spec.arms == [{"optimizer": "sgd", "weight_decay": 0.0}, {"optimizer": "adam", "weight_decay": 1e-4}]
    assert spec.seeds == [4, 7] and spec.search is None
    assert spec.settings == {"scheduler": "asha", "asha_grace_epochs": 3, "storage": "somewhere",
                             "cpus_per_trial": 0.5, "gpus_per_trial": 0, "max_failures": 1, "pack": "off",
                             "trackers": ["tensorboard"], **({"max_concurrent_trials": None} if suffix != ".toml"
                                                            else {})}
    study, line = file_study(run_args(write(tmp_path, text, suffix), "--storage", str(tmp_path / "s")))
    assert line is None
    assert (study.name, study.scheduler, study.asha_grace_epochs, study.pack, study.max_failures) == (
        "full", "asha", 3, "off", 1)
    assert study.storage == str(tmp_path / "s")  # the flag wins over the file
    assert len(study.validate()) == 2 * 2 * 2 * 2  # arms x temperature x members x seeds
    assert {cfg.seed for cfg in study.configs()} == {4, 7}


def test_a_count_of_seeds_and_a_search(tmp_path):
    path = write(tmp_path, """
        name: searched
        seeds: 3
        search:
          space: {temperature: [logfloat, 1, 16], augmentation: [choice, [none, mixup]], epochs: [int, 2, 4]}
          metrics: val_acc
          modes: min
          num_samples: 5
          seed: 9
    """)
    spec = read_study_file(path)
    assert spec.seeds == [0, 1, 2]
    assert spec.search.space == {"temperature": ("logfloat", 1.0, 16.0), "augmentation": ("choice", ["none", "mixup"]),
                                 "epochs": ("int", 2, 4)}
    assert (spec.search.metrics, spec.search.modes, spec.search.num_samples, spec.search.seed) == (
        ("val_acc",), ("min",), 5, 9)


# --- every error: one line, the file and where in it, exit 2 ------------------------------------------

YAML_ERRORS = [
    # unknown top-level key, with the closest known one
    ("name: s\nschedular: fifo\n", ":2: schedular: unknown key 'schedular'; did you mean 'scheduler'?"),
    # a bad value in base, at its line
    ("name: s\nbase:\n  dataset: mnist1d\n  temperature: hot\n", ":4: base.temperature: temperature='hot' is not"),
    ("name: s\nbase:\n  temprature: 4\n", ":3: base.temprature: unknown field 'temprature'; did you mean"),
    ("name: s\nbase:\n  optimizer: adamw\n", ":3: base.optimizer: "),
    ("name: s\nbase: [1, 2]\n", ":2: base=[1, 2] is not allowed; allowed: a mapping"),
    # a bad axis value, at its item's line
    ("name: s\naxes:\n  temperature:\n    - 1.0\n    - warm\n", ":5: axes.temperature[1]: temperature='warm'"),
    ("name: s\naxes:\n  temperature: []\n", ":3: axes.temperature=[] is not allowed; allowed: a non-empty list"),
    ("name: s\naxes:\n  temprature: [1.0]\n", ":3: axes.temprature: unknown field 'temprature'"),
    ("name: s\naxes:\n  seed: [1, 2]\n", ":3: axes.seed: the seed field is set by the top-level seeds key"),
    ("name: s\naxes:\n  temperature: [1.0, 1.0]\n", ":3: axes.temperature=[1.0, 1.0] is not allowed; allowed: "
     "distinct"),
    # arms
    ("name: s\narms: {init: random}\n", ":2: arms={'init': 'random'} is not allowed; allowed: a list"),
    ("name: s\narms:\n  - {init: random}\n  - 3\n", ":4: arms[1]=3 is not allowed"),
    ("name: s\narms:\n  - {init: random}\n  - {init: sideways}\n", ":4: arms[1].init: "),
    ("name: s\naxes: {temperature: [1.0]}\narms:\n  - {temperature: 4.0}\n", ":4: arms[0].temperature: temperature is "
     "also an axis"),
    # seeds
    ("name: s\nseeds: 0\n", ":2: seeds=0 is not allowed; allowed: a count >= 1"),
    ("name: s\nseeds: [1, 1]\n", ":2: seeds=[1, 1] is not allowed"),
    ("name: s\nseeds: three\n", ":2: seeds='three' is not allowed"),
    ("name: s\nseeds: [-1]\n", ":2: seeds=[-1] is not allowed"),
    # search
    ("name: s\nsearch:\n  space: {temperature: [linear, 1, 2]}\n", ":3: search.space.temperature=['linear', 1, 2]"),
    ("name: s\nsearch:\n  space: {temperature: [float, 1, 2]}\n  samples: 3\n", ":4: search.samples: unknown key "
     "'samples'; did you mean 'num_samples'?"),
    ("name: s\nsearch:\n  space: {temperature: [float, 1, 2]}\n  num_samples: 0\n", ":4: search.num_samples=0"),
    # run settings
    ("name: s\npack: sometimes\n", ":2: pack='sometimes' is not allowed; allowed: off or auto"),
    ("name: s\ncpus_per_trial: 0\n", ":2: cpus_per_trial=0 is not allowed; allowed: a number > 0"),
    ("name: s\ntrackers: [neptune]\n", ":2: trackers=['neptune'] is not allowed"),
    ("name: 7\n", ":1: name=7 is not allowed"),
    # the file itself
    ("name: s\nbase:\n  dataset: [mnist1d\n", ": not valid YAML:"),
    ("name: s\nbase:\n  dataset: mnist1d\n   epochs: 3\n", ":4: not valid YAML:"),
    ("name: s\nseeds: 2\nseeds: 3\n", ":3: seeds is given twice"),
    ("- name: s\n", ":1: a study file is a mapping"),
]


@pytest.mark.parametrize("text, expected", YAML_ERRORS, ids=[f"yaml{i}" for i in range(len(YAML_ERRORS))])
def test_a_bad_yaml_file_is_one_line_naming_file_and_line(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    line = refused(["study", "run", str(path), "--storage", str(tmp_path / "s")], capsys)
    assert line.startswith(f"kd-ray study: error: {path}"), line
    assert expected in line, line
    assert not (tmp_path / "s").exists()


TOML_ERRORS = [
    ('name = "s"\nschedular = "fifo"\n', ": schedular: unknown key 'schedular'; did you mean 'scheduler'?"),
    ('name = "s"\n[base]\ntemperature = "hot"\n', ": base.temperature: temperature='hot' is not"),
    ('name = "s"\n[axes]\ntemperature = [1.0, "warm"]\n', ": axes.temperature[1]: temperature='warm'"),
    ('name = "s"\narms = 3\n', ": arms=3 is not allowed; allowed: a list"),
    ('name = "s"\nseeds = 0\n', ": seeds=0 is not allowed"),
    ('name = "s"\n[base\n', ":2: not valid TOML:"),
    ('name = "s"\nname = "t"\n', ":2: not valid TOML:"),
]


@pytest.mark.parametrize("text, expected", TOML_ERRORS, ids=[f"toml{i}" for i in range(len(TOML_ERRORS))])
def test_a_bad_toml_file_is_one_line_naming_file_and_key(tmp_path, capsys, text, expected):
    path = write(tmp_path, text, ".toml")
    line = refused(["study", "run", str(path), "--storage", str(tmp_path / "s")], capsys)
    assert line.startswith(f"kd-ray study: error: {path}"), line
    assert expected in line, line


def test_file_level_refusals(tmp_path, capsys):
    assert "no such file" in refused(["study", "run", str(tmp_path / "none.yaml")], capsys)
    other = tmp_path / "study.json"
    other.write_text("{}")
    assert "ends in .yaml, .yml, .toml" in refused(["study", "run", str(other)], capsys)
    nameless = write(tmp_path, "seeds: 1\n")
    assert "has no name; allowed: a top-level name: key in the file, or --name" in refused(
        ["study", "run", str(nameless)], capsys)
    # a rule across fields, judged on the whole study: the file is named
    asha = write(tmp_path, "name: s\nscheduler: asha\nbase: {steps: 100}\n")
    line = refused(["study", "run", str(asha), "--storage", str(tmp_path / "s")], capsys)
    assert line.startswith(f"kd-ray study: error: {asha}: scheduler='asha' stops trials by epoch"), line


# --- show: every built-in study as a file, read back as the study its script runs --------------------


def script_study(name: str, argv: list[str]):
    return preset_study(name, study_parser(None).parse_args(argv))[0]


@pytest.mark.parametrize("file_format", ["yaml", "toml"])
@pytest.mark.parametrize("preset", ["local", "paper"])
@pytest.mark.parametrize("name", list(STUDIES))
def test_show_then_run_is_the_scripts_study(tmp_path, capsys, name, preset, file_format):
    assert main(["study", "show", name, "--preset", preset, "--format", file_format]) == 0
    text = capsys.readouterr().out
    assert text.startswith("# The built-in study") and "kd-ray study run FILE" in text
    path = tmp_path / f"{name}.{file_format}"
    path.write_text(text)
    from_file, line = file_study(run_args(path))
    script = script_study(name, ["--preset", preset])
    assert line is None
    assert from_file.spec() == script.spec()
    assert from_file.configs() == script.configs()
    assert (from_file.name, from_file.gpus_per_trial, from_file.cpus_per_trial) == (
        name, script.gpus_per_trial, script.cpus_per_trial)


def test_show_adapts_the_preset_to_a_dataset(tmp_path, capsys):
    text = show_study("augmentation_ablation", "local", "yaml", "digits")
    assert "leaving out" in capsys.readouterr().err  # the preset's notes on stderr, the file on stdout
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    script = script_study("augmentation_ablation", ["--dataset", "digits"])
    assert file_study(run_args(path))[0].spec() == script.spec()
    assert script.base.dataset == "digits"


def test_show_lists_the_studies_and_refuses_an_unknown_one(capsys):
    assert main(["study", "show"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:len(STUDIES)]] == list(STUDIES)
    line = refused(["study", "show", "temperature_swep"], capsys)
    assert "did you mean 'temperature_sweep'?" in line and line.startswith("kd-ray study: error:")


# --- --grid ---------------------------------------------------------------------------------------------


def test_grid_replaces_the_axis_of_its_name_and_crosses_the_others():
    study, line = preset_study("temperature_sweep", study_parser(None).parse_args(["--grid", "temperature=1,4,8"]))
    assert study.axes == {"teacher_members": [1, 3, 5], "temperature": [1.0, 4.0, 8.0]}
    assert all(isinstance(value, float) for value in study.axes["temperature"])  # typed as the field
    assert line == ("grid: temperature [1.0, 4.0, 8.0] replaces the preset's [1.0, 4.0, 8.0, 16.0]; crossed with "
                    "teacher_members [1, 3, 5]: 9 configs per seed")
    assert len(study.configs()) == 9 * 2


def test_a_new_grid_axis_crosses_the_arms(tmp_path):
    study, line = preset_study("training_duration", study_parser(None).parse_args(
        ["--grid", "loss=kl,reverse_kl", "--grid", "temperature=1,4"]))
    assert list(study.axes) == ["epochs", "loss", "temperature"]
    assert line == ("grid: loss ['kl', 'reverse_kl'] (a new axis); temperature [1.0, 4.0] (a new axis); crossed with "
                    "epochs [90, 360], 2 arms: 16 configs per seed")
    assert {(cfg.loss, cfg.temperature, cfg.optimizer) for cfg in study.configs()} == {
        (loss, t, opt) for loss in ("kl", "reverse_kl") for t in (1.0, 4.0) for opt in ("sgd", "adam")}
    # the same on a study file
    path = write(tmp_path, show_study("training_duration"))
    from_file, file_line = file_study(run_args(path, "--grid", "loss=kl,reverse_kl", "--grid", "temperature=1,4"))
    assert from_file.spec() == study.spec()
    assert file_line == line.replace("the preset's", "the file's")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--grid", "init=random,teacher_init"], "--grid init: an arm of this study sets init; allowed: --grid on a "
         "field no arm sets (the arms set init, init_lambda)"),
        (["--grid", "temperature=1,4", "--set", "temperature=2"], "--grid temperature is also given one value by "
         "--set temperature=2"),
        (["--grid", "seed=0,1"], "seeds are set by --seeds"),
        (["--grid", "temprature=1,4"], "--grid temprature: unknown field 'temprature'; did you mean 'temperature'?"),
        (["--grid", "temperature=1,warm"], "--grid temperature=warm: temperature='warm' is not a number"),
        (["--grid", "temperature=1,1.0"], "repeats 1.0; allowed: distinct values"),
        (["--grid", "temperature="], "--grid expects key=v1,v2,..."),
        (["--grid", "temperature=1", "--grid", "temperature=4"], "--grid temperature is given twice"),
    ],
)
def test_a_bad_grid_is_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    code = study_main("initialization", None, [*argv, "--storage", str(tmp_path / "s"), "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("initialization: error:") and expected in lines[0], lines[0]
    assert not (tmp_path / "s").exists()
    path = write(tmp_path, show_study("initialization"))
    line = refused(["study", "run", str(path), *argv, "--storage", str(tmp_path / "s")], capsys)
    assert expected in line, line


def test_a_grid_on_a_dataset_given_by_flag_is_refused():
    args = study_parser(None).parse_args(["--dataset", "digits", "--grid", "dataset=mnist1d,digits"])
    with pytest.raises(ConfigError, match="--grid dataset is also given one value by --dataset digits"):
        preset_study("ensemble_size", args)


# --- one tiny study run three ways: a script's preset, a study file, a study file with --grid ----------

TINY_SETS = {"epochs": 1, "steps": 0, "teacher_epochs": 2, "teacher_members": 1, "batch_size": 256, "eval_every": 1}
TEMPERATURES = [1.0, 4.0, 8.0, 16.0]
# Same configs, same numbers: every float the trial measured (not its times), its step counts and teacher.
TIMED = ("train_time_s", "pack_time_share")
SAME_INTS = ["epochs_completed", "student_steps", "teacher_steps", "teacher_train_size", "distill_size", "teacher_key"]


@pytest.mark.slow
def test_a_script_a_file_and_a_grid_run_the_same_trials(ray_local, tmp_path, capsys):
    storage = str(tmp_path / "storage")  # one storage: the three runs share its teacher store
    sets = [arg for key, value in TINY_SETS.items() for arg in ("--set", f"{key}={value}")]
    common = ["--seeds", "1", "--storage", storage, "--quiet"]

    # (a) the script's preset: teacher_members collapses to 1, temperature keeps the preset's four values
    assert study_main("temperature_sweep", None, [*sets, *common, "--name", "by_script"]) == 0
    # (b) the file show prints, with the tiny base written into it
    document = yaml.safe_load(show_study("temperature_sweep"))
    document["base"].update(TINY_SETS)
    del document["axes"]["teacher_members"]
    by_file = write(tmp_path, to_yaml(document))
    assert main(["study", "run", str(by_file), *common, "--name", "by_file"]) == 0
    # (c) a file with one temperature, the grid giving the four
    document["axes"]["temperature"] = [4.0]
    one = write(tmp_path, to_yaml(document), ".yml")
    assert main(["study", "run", str(one), *common, "--name", "by_grid", "--grid", "temperature=1,4,8,16"]) == 0
    assert "grid: temperature [1.0, 4.0, 8.0, 16.0] replaces the file's [4.0]" in capsys.readouterr().out

    tables = [pd.read_parquet(Path(storage) / name / "trials.parquet") for name in ("by_script", "by_file", "by_grid")]
    config_columns = [name for name in TrialConfig.field_names() if name in tables[0].columns]
    metric_columns = [c for c in tables[0].columns if c not in config_columns and c not in TIMED
                      and pd.api.types.is_float_dtype(tables[0][c])]
    assert {"test_agreement", "test_acc", "test_kl", "train_agreement", "teacher_test_acc"} <= set(metric_columns)
    ordered = [table.sort_values("temperature").reset_index(drop=True) for table in tables]
    for table in ordered:
        assert len(table) == 4 and (table["status"] == "TERMINATED").all()
        assert list(table["temperature"]) == TEMPERATURES and (table["teacher_members"] == 1).all()
        assert table["test_agreement"].notna().all()
    for other in ordered[1:]:
        pd.testing.assert_frame_equal(other[config_columns], ordered[0][config_columns])
        assert list(other["config_json"].map(json.loads)) == list(ordered[0]["config_json"].map(json.loads))
        pd.testing.assert_frame_equal(other[SAME_INTS], ordered[0][SAME_INTS])
        pd.testing.assert_frame_equal(other[metric_columns], ordered[0][metric_columns], check_exact=False, atol=1e-6,
                                      rtol=0)
