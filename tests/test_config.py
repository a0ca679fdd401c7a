"""Tests of the configuration schema: defaults, YAML values, ``--set`` overrides, type and value checks, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from seqtp.config import (
    BPTTConfig,
    Config,
    ConfigError,
    ModelConfig,
    TaskConfig,
    TPConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    parse_overrides,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
NAMED = ["task.name=adding"]  # the one key a config must set


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    cfg = load_config(None, NAMED)
    assert cfg == Config(task=TaskConfig(name="adding"))
    assert cfg.method == "tp" and cfg.device == "auto" and cfg.seed == 0
    assert cfg.task.variant is None and Config().task.name is None
    # TP: the paper code's settings (target_lr 1e-2, reg 10, linearized, through time, no cap) at SGD lr 0.05.
    tp = cfg.tp
    assert (tp.optimizer, tp.lr, tp.momentum, tp.nesterov) == ("sgd", 0.05, 0.0, False)
    assert (tp.target_lr, tp.reg, tp.mode, tp.update, tp.shift_cap) == (1e-2, 10.0, "linearized", "through_time", None)
    # BPTT: SGD lr 1e-2, Nesterov momentum 0.9, clipping at 1.0 (BPTTConfig overrides the inherited optimizer fields).
    b = cfg.bptt
    assert (b.optimizer, b.lr, b.momentum, b.nesterov, b.clip, b.truncation) == ("sgd", 1e-2, 0.9, True, 1.0, None)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_use_the_default_methods(path: Path) -> None:
    """Every shipped config's TP and BPTT sections are the schema's working defaults, with a comment saying what
    they were tuned on."""
    cfg = load_config(path)
    assert cfg.tp == TPConfig() and cfg.bptt == BPTTConfig()
    comments = [line for line in path.read_text().splitlines() if line.startswith(("tp:", "bptt:"))]
    assert len(comments) == 2 and all("temporal order T=60" in line for line in comments)


def test_the_method_gets_the_config_values() -> None:
    """The schema's defaults reach the method (the library classes keep their own defaults)."""
    from seqtp.train import build_method

    tp = build_method(load_config(None, NAMED))
    assert (tp.reg, tp.target_lr, tp.mode, tp.update, tp.shift_cap) == (10.0, 1e-2, "linearized", "through_time", None)
    bptt = build_method(load_config(None, [*NAMED, "method=bptt"]))
    assert (bptt.clip, bptt.truncation) == (1.0, None)


@pytest.mark.parametrize("text", ["# nothing\n", "train: {steps: 5}\n", "task: {seq_len: 5}\n", "task: {name: null}\n"])
def test_task_name_is_required(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match=r"^task\.name is required \(one of copying, adding, ") as info:
        load_config(write(tmp_path, text))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"^task\.name is required"):
        load_config()


def test_yaml_values_land_in_the_dataclasses(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
seed: 7
method: bptt
device: cpu
task: {name: temporal_order, seq_len: 23, bits: 3, val_size: 50}
model: {hidden_size: 12, nonlinearity: relu, init: default}
train: {steps: 11, batch_size: 5, eval_every: 3}
tp: {optimizer: adam, lr: 1e-3, reg: 2, mode: exact, update: through_time, shift_cap: 0.5}
bptt: {lr: 0.25, momentum: 0.5, nesterov: false, clip: 1.0, truncation: 4}
""",
    )
    cfg = load_config(path)
    assert (cfg.seed, cfg.method, cfg.device) == (7, "bptt", "cpu")
    assert cfg.task == TaskConfig(name="temporal_order", seq_len=23, val_size=50, bits=3)
    assert cfg.model == ModelConfig(hidden_size=12, nonlinearity="relu", init="default")
    assert cfg.train == TrainConfig(steps=11, batch_size=5, eval_every=3)
    assert cfg.tp == TPConfig(optimizer="adam", lr=1e-3, reg=2.0, mode="exact", update="through_time", shift_cap=0.5)
    assert cfg.bptt == BPTTConfig(lr=0.25, momentum=0.5, nesterov=False, clip=1.0, truncation=4)
    # Float fields hold floats even when YAML gives an int or a string like 1e-3 (YAML 1.1).
    assert type(cfg.tp.reg) is float and type(cfg.tp.lr) is float
    # Unset keys keep their defaults.
    assert cfg.tp.target_lr == TPConfig().target_lr and cfg.task.data_dir is None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.task.name == path.stem
    assert config_from_dict(to_dict(cfg)) == cfg


def test_a_task_name_alone_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "task: {name: copying}\n")) == Config(task=TaskConfig(name="copying"))


def test_set_overrides_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "task: {name: adding}\ntrain: {steps: 50, batch_size: 3}\ntp: {lr: 0.5}\n")
    cfg = load_config(path, ["train.steps=9", "tp.lr=1e-3", "tp.nesterov=true", "method=bptt"])
    assert cfg.train.steps == 9 and cfg.train.batch_size == 3  # a sibling of an overridden key is kept
    assert cfg.tp.lr == 1e-3 and cfg.tp.nesterov is True and cfg.method == "bptt"
    # Keyword overrides come last; None means "not given".
    assert load_config(path, ["method=bptt"], method="tp").method == "tp"
    assert load_config(path, ["method=bptt"], method=None).method == "bptt"


def test_parse_overrides() -> None:
    assert parse_overrides(["a.b=1", "a.c=x", "d=null", "e=1.5", "f=true"]) == {
        "a": {"b": 1, "c": "x"},
        "d": None,
        "e": 1.5,
        "f": True,
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.steps"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=3"])


@pytest.mark.parametrize("value", ["abc", "1.5", "true", "null", "[1, 2]"])
def test_int_field_rejects_non_integers(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^train\.steps: expected int"):
        load_config(None, [*NAMED, f"train.steps={value}"])


@pytest.mark.parametrize(("value", "expected"), [("1e-3", 1e-3), ("3", 3.0), ("2.5", 2.5), ("1.0e-5", 1e-5)])
def test_float_field_accepts_numbers(value: str, expected: float) -> None:
    cfg = load_config(None, [*NAMED, f"tp.lr={value}"])
    assert cfg.tp.lr == expected and type(cfg.tp.lr) is float


@pytest.mark.parametrize("value", ["abc", "true", "null", "[1]", "inf", "nan", "-.inf"])
def test_float_field_rejects_non_numbers(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^tp\.lr: expected float"):
        load_config(None, [*NAMED, f"tp.lr={value}"])


def test_bool_field() -> None:
    assert load_config(None, [*NAMED, "tp.nesterov=true"]).tp.nesterov is True
    assert load_config(None, [*NAMED, "bptt.nesterov=false"]).bptt.nesterov is False
    for value in ("1", "0", "maybe", "null"):
        with pytest.raises(ConfigError, match=r"^bptt\.nesterov: expected bool"):
            load_config(None, [*NAMED, f"bptt.nesterov={value}"])


def test_str_field_rejects_numbers() -> None:
    with pytest.raises(ConfigError, match=r"^task\.name: expected str"):
        load_config(None, [*NAMED, "task.name=3"])


def test_optional_fields_accept_null_and_their_type() -> None:
    cfg = load_config(None, [*NAMED, "bptt.clip=2", "bptt.truncation=5", "tp.shift_cap=0.5", "task.variant=paper"])
    assert (cfg.bptt.clip, cfg.bptt.truncation, cfg.tp.shift_cap, cfg.task.variant) == (2.0, 5, 0.5, "paper")
    nulls = ["bptt.clip=null", "bptt.truncation=null", "tp.shift_cap=null", "task.variant=null"]
    cfg = load_config(None, [*NAMED, *nulls])
    assert (cfg.bptt.clip, cfg.bptt.truncation, cfg.tp.shift_cap, cfg.task.variant) == (None, None, None, None)
    with pytest.raises(ConfigError, match=r"^bptt\.truncation: expected int"):
        load_config(None, [*NAMED, "bptt.truncation=2.5"])
    with pytest.raises(ConfigError, match=r"^bptt\.clip: expected float"):
        load_config(None, [*NAMED, "bptt.clip=abc"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["sede=1"], "sede"),
        (["task.sequence_length=5"], "task.sequence_length"),
        (["tp.learning_rate=0.1"], "tp.learning_rate"),
        (["train.steps.inner=1"], "train.steps"),  # not a mapping
    ],
)
def test_unknown_key_in_set(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*NAMED, *overrides])
    assert f"'{key}'" in str(info.value) or str(info.value).startswith(f"{key}:")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("sede: 1\n", "sede"),
        ("task:\n  name: adding\n  lenght: 5\n", "task.lenght"),
        ("bptt:\n  clip_norm: 1.0\n", "bptt.clip_norm"),
        ("optim:\n  lr: 1.0\n", "optim"),
    ],
)
def test_unknown_key_in_yaml(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"unknown key '{key}' in .*exp\.yaml"):
        load_config(path)


def test_section_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^task in .*exp\.yaml: expected a mapping"):
        load_config(write(tmp_path, "task: 5\n"))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("seed=-1", "seed"),
        ("task.seq_len=0", "task.seq_len"),
        ("task.seq_len=-5", "task.seq_len"),
        ("task.val_size=0", "task.val_size"),
        ("model.hidden_size=-1", "model.hidden_size"),
        ("train.steps=0", "train.steps"),
        ("train.batch_size=-2", "train.batch_size"),
        ("train.eval_every=0", "train.eval_every"),
        ("tp.lr=0", "tp.lr"),
        ("bptt.lr=-1e-3", "bptt.lr"),
        ("bptt.momentum=1", "bptt.momentum"),
        ("tp.reg=0", "tp.reg"),
        ("tp.target_lr=-1", "tp.target_lr"),
        ("tp.eps=1.5", "tp.eps"),
        ("tp.shift_cap=0", "tp.shift_cap"),
        ("bptt.clip=-1", "bptt.clip"),
        ("bptt.truncation=0", "bptt.truncation"),
        ("tp.mode=magic", "tp.mode"),
        ("tp.update=global", "tp.update"),
        ("tp.optimizer=rmsprop", "tp.optimizer"),
        ("bptt.optimizer=lbfgs", "bptt.optimizer"),
        ("model.nonlinearity=sigmoid", "model.nonlinearity"),
        ("model.init=xavier", "model.init"),
        ("method=nope", "method"),
        ("device=gpu", "device"),
        ("device=cuda:x", "device"),
        ("model.cell=transformer", "model.cell"),
        ("tp.solver=newton", "tp.solver"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*NAMED, override])
    message = str(info.value)
    assert message.startswith(f"{key} "), message
    assert "\n" not in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_good_devices(device: str) -> None:
    assert load_config(None, [*NAMED, f"device={device}"]).device == device


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml"):
        load_config(path)


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "task:\n  name: adding\n   seq_len: [1, 2\n", name="broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML \(line \d+\)") as info:
        load_config(path)
    assert "\n" not in str(info.value)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", name="list.yaml"))


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_dataclasses_are_frozen() -> None:
    cfg = load_config(None, NAMED)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.tp.lr = 3.0  # type: ignore[misc]
    assert cfg == Config(task=TaskConfig(name="adding"))


def test_config_from_dict_checks_too() -> None:
    data = to_dict(Config(task=TaskConfig(name="adding")))
    data["train"]["steps"] = -1
    with pytest.raises(ConfigError, match=r"^train\.steps "):
        config_from_dict(data)
    with pytest.raises(ConfigError, match=r"^task\.name is required"):
        config_from_dict(to_dict(Config()))
    data = to_dict(Config())
    data["model"]["depth"] = 2
    with pytest.raises(ConfigError, match=r"unknown key 'model\.depth'"):
        config_from_dict(data)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.cell=gru", "model.nonlinearity=relu"], "model.nonlinearity"),
        (["model.cell=lstm", "tp.solver=analytic"], "tp.solver"),
        (["tp.solver=analytic", "tp.space=output"], "tp.space does not apply"),
        (["tp.solver=gauss_newton", "tp.steps=3"], "tp.steps does not apply"),
        (["tp.solver=learned", "tp.max_iter=3"], "tp.max_iter does not apply"),
        (["tp.solver=gauss_newton", "tp.space=input"], "tp.space"),
        (["tp.solver=iterated", "tp.steps=0"], "tp.steps"),
    ],
)
def test_cell_and_solver_options_are_checked(overrides: list[str], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment) as info:
        load_config(None, [*NAMED, *overrides])
    assert str(info.value).count("got") <= 1, info.value


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.cell=gru", "tp.solver=analytic"], "tp.solver=analytic needs model.cell=elman, got model.cell=gru"),
        (["model.cell=lstm", "tp.solver=exact"], "tp.solver=exact needs model.cell=elman, got model.cell=lstm"),
        (["model.cell=gru", "tp.solver=dense", "tp.mode=gait"],
         "tp.mode=gait needs model.cell=elman, got model.cell=gru"),
        (["model.cell=lstm", "model.nonlinearity=relu"],
         "model.nonlinearity=relu applies to elman cells only, got model.cell=lstm"),
        (["task.name=sorting"], "task.name must be one of copying, adding, pixel_mnist, permuted_mnist, "
                                "temporal_order, got 'sorting'"),
    ],
)
def test_cross_key_messages(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*NAMED, *overrides])
    assert str(info.value) == message


def test_solver_options_load() -> None:
    cfg = load_config(None, [*NAMED, "model.cell=gru", "tp.solver=gauss_newton", "tp.space=output", "tp.tol=1e-5"])
    assert (cfg.model.cell, cfg.tp.solver, cfg.tp.space, cfg.tp.tol) == ("gru", "gauss_newton", "output", 1e-5)
