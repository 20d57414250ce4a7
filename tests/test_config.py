"""Config: loading recipes and YAML, dotted overrides, choices and ranges checked at load time with
errors that name the key, the value and the nearest valid one; lossless round trip."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from jaguar.config import (Config, ConfigError, ModelConfig, PostConfig, all_keys, from_dict, get_value,
                           load_config, save_config, to_dict, to_yaml, validate)
from jaguar.config.fields import field_of

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_overrides_are_typed():
    cfg = load_config(None, ["train.epochs=5", "optim.lr=2e-5", "model.img_size=[448,448]",
                             "model.pretrained=true", "data.scale=[0.8, 1.2]", "run.dir=/tmp/x"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(2e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.model.img_size == [448, 448]
    assert cfg.model.pretrained is True
    assert cfg.data.scale == [0.8, 1.2]
    assert cfg.run.dir == "/tmp/x"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"trian\.epochs.*did you mean train\.epochs"):
        load_config(None, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"did you mean optim\.lr"):
        load_config(None, ["optim.lrr=0.1"])


def test_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs.*expects int.*'ten'"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"model\.pretrained.*expects bool"):
        load_config(None, ["model.pretrained=maybe"])


def test_bad_choice_names_choices():
    with pytest.raises(ConfigError, match=r"model\.head.*arcfce.*did you mean arcface"):
        load_config(None, ["model.head=arcfce"])


def test_override_without_equals_is_error():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_yaml_round_trip_is_lossless(tmp_path):
    cfg = load_config(None, ["optim.lr=1.5e-5", "model.backbone=eva02_large_patch14_448", "data.scale=[0.5,1.0]",
                             "optim.milestones=[35, 60]", "run.name=a: b"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert to_yaml(again) == to_yaml(cfg)


def test_yaml_unknown_key_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz.*bad\.yaml.*did you mean train\.epochs"):
        load_config(path)


def test_recipe_loading(tmp_path):
    recipe = tmp_path / "r.py"
    recipe.write_text("from jaguar.config import Config\nconfig = Config()\nconfig.train.epochs = 7\n")
    assert load_config(recipe, ["train.max_steps=3"]).train.epochs == 7
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="module-level `config`"):
        load_config(bad)


def test_dict_recipe_is_checked():
    with pytest.raises(ConfigError, match=r"modle"):
        from_dict({"modle": {"backbone": "x"}})
    assert from_dict({"model": {"backbone": "resnet50"}}).model.backbone == "resnet50"


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.py")


def test_config_show_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaguar.cli.main", "config", "show", "train.epochs=4"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "epochs: 4" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "jaguar.cli.main", "config", "show", "trian.epochs=4"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert "did you mean train.epochs" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")))
def test_every_recipe_resolves(recipe):
    cfg = load_config(recipe)
    assert isinstance(cfg, Config)


def test_micro_batch_of_one_is_refused():
    with pytest.raises(ConfigError, match=r"data.p_identities x data.k_images.*at least 2"):
        load_config(None, ["data.p_identities=1", "data.k_images=1"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaguar.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_config_show_and_train_refuse_a_bad_choice_alike():
    """The acceptance case: the same message from `config show` and `train`, before any model is built."""
    show = _cli("config", "show", "recipes/tiny_cpu.py", "model.pooling=gemm")
    train = _cli("train", "recipes/tiny_cpu.py", "model.pooling=gemm")
    for result in (show, train):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "'model.pooling'" in result.stderr and "'gemm'" in result.stderr
        assert "did you mean gem?" in result.stderr
    assert show.stderr.split("error: ", 1)[1] == train.stderr.split("error: ", 1)[1]


def _choice_keys() -> list[str]:
    return [key for key in all_keys() if typing.get_origin(field_of(Config(), key)[2]) is typing.Literal]


@pytest.mark.parametrize("key", _choice_keys())
def test_every_choice_is_checked_with_a_suggestion(key):
    choices = typing.get_args(field_of(Config(), key)[2])
    misspelt = f"{choices[-1]}x"
    with pytest.raises(ConfigError, match=rf"'{key}'.*'{misspelt}'.*choose one of.*did you mean {choices[-1]}\?"):
        load_config(None, [f"{key}={misspelt}"])
    assert get_value(load_config(None, [f"{key}={choices[-1]}"]), key) == choices[-1]


def test_string_choices_are_taken_verbatim():
    # YAML would read `off`/`no` as false; a choice is a name, never a bool
    assert load_config(None, ["model.neck=none"]).model.neck == "none"
    assert load_config(None, ["model.last_stride=1"]).model.last_stride == 1
    with pytest.raises(ConfigError, match=r"model\.last_stride.*choose one of 1, 2"):
        load_config(None, ["model.last_stride=3"])


def test_every_numeric_key_declares_a_range():
    """A number with a physical meaning always has its accepted range beside its default."""
    for key in all_keys():
        _, fld, ftype = field_of(Config(), key)
        item = typing.get_args(ftype)[0] if typing.get_origin(ftype) is list else ftype
        if item in (int, float):
            assert "range" in fld.metadata, f"{key} has no range: declare it with ranged(...)"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", r"'optim\.lr'.*must be > 0, got 0\.0"),
    ("optim.lr=-1e-3", r"'optim\.lr'.*must be > 0"),
    ("train.epochs=0", r"'train\.epochs'.*must be >= 1, got 0"),
    ("train.grad_accum=0", r"'train\.grad_accum'.*>= 1"),
    ("data.hflip=1.5", r"'data\.hflip'.*in \[0, 1\], got 1\.5"),
    ("data.random_erasing=-0.1", r"'data\.random_erasing'.*in \[0, 1\]"),
    ("data.val_fraction=1", r"'data\.val_fraction'.*in \[0, 1\).*no training images"),
    ("retrieval.post.k1=0", r"'retrieval\.post\.k1'.*>= 1"),
    ("retrieval.post.lambda_value=1.2", r"'retrieval\.post\.lambda_value'.*in \[0, 1\]"),
    ("retrieval.post.blend=-0.5", r"'retrieval\.post\.blend'.*in \[0, 1\]"),
    ("retrieval.tune_min_gain_se=-1", r"'retrieval\.tune_min_gain_se'.*>= 0"),
    ("model.head_scale=0", r"'model\.head_scale'.*> 0"),
    ("model.head_margin=-0.1", r"'model\.head_margin'.*>= 0"),
    ("model.gem_p=0.5", r"'model\.gem_p'.*in \[1, 8\].*weakest"),
    ("model.gem_p=20", r"'model\.gem_p'.*in \[1, 8\].*model\.pooling=max"),
    ("model.dropout=1", r"'model\.dropout'.*\[0, 1\)"),
    ("model.img_size=8", r"'model\.img_size'.*>= 16"),
    ("loss.label_smoothing=1", r"'loss\.label_smoothing'.*\[0, 1\)"),
    ("loss.triplet_margin=-0.3", r"'loss\.triplet_margin'.*>= 0"),
    ("optim.ema_decay=1", r"'optim\.ema_decay'.*\(0, 1\)"),
    ("optim.betas=[0.9, 1.0]", r"'optim\.betas'.*\[0, 1\)"),
    ("optim.betas=[0.9]", r"'optim\.betas'.*takes 2 values"),
    ("optim.gamma=0", r"'optim\.gamma'.*\(0, 1\]"),
    ("run.seed=-1", r"'run\.seed'.*32-bit"),
    ("optim.lr=nan", r"'optim\.lr'.*must be > 0, got nan"),
])
def test_out_of_range_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["data.hflip=0", "data.hflip=1", "retrieval.post.lambda_value=0",
                                      "retrieval.post.lambda_value=1", "model.gem_p=1", "model.gem_p=8",
                                      "data.val_fraction=0", "optim.layer_decay=1", "model.head_margin=0"])
def test_range_edges_are_accepted(override):
    load_config(None, [override])


@pytest.mark.parametrize("overrides, message", [
    (["optim.scheduler=multistep"], r"optim\.milestones"),
    (["optim.milestones=[60, 35]"], r"'optim\.milestones' must be increasing"),
    (["optim.min_lr=1e-2", "optim.lr=1e-3"], r"'optim\.min_lr'.*above optim\.lr"),
    (["model.head=arcface", "model.head_margin=1.6"], r"'model\.head_margin' must be < pi/2.*arcface"),
    (["loss.ce_weight=0"], r"all 0"),
    (["loss.ce_weight=0", "loss.triplet_weight=1", "data.mixup_alpha=0.2", "data.mixup_prob=0.5"], r"mixup"),
    (["data.scale=[1.2, 0.8]"], r"'data\.scale'.*min > max"),
    (["retrieval.scales=[]"], r"'retrieval\.scales' is empty"),
])
def test_rules_between_keys(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_cosface_margin_is_not_held_to_arcface_limit():
    assert load_config(None, ["model.head=cosface", "model.head_margin=1.6"]).model.head_margin == 1.6


def test_square_img_size_from_one_number(tmp_path):
    """`model.img_size=224` is 224 x 224, from the command line, YAML and a recipe alike."""
    assert load_config(None, ["model.img_size=224"]).model.img_size == [224, 224]
    assert load_config(None, ["model.img_size=[224]"]).model.img_size == [224, 224]
    (tmp_path / "c.yaml").write_text("model:\n  img_size: 224\n")
    assert load_config(tmp_path / "c.yaml").model.img_size == [224, 224]
    (tmp_path / "r.py").write_text("from jaguar.config import Config\nconfig = Config()\nconfig.model.img_size = 224\n")
    assert load_config(tmp_path / "r.py").model.img_size == [224, 224]
    assert load_config(None, ["model.img_size=[80, 160]"]).model.img_size == [80, 160]
    with pytest.raises(ConfigError, match=r"'model\.img_size'.*takes 2 values"):
        load_config(None, ["model.img_size=[1, 2, 3]"])


def test_recipe_yaml_and_override_refuse_alike(tmp_path):
    (tmp_path / "r.py").write_text("from jaguar.config import Config\nconfig = Config()\nconfig.optim.lr = -1.0\n")
    (tmp_path / "c.yaml").write_text("optim:\n  lr: -1.0\n")
    (tmp_path / "d.py").write_text("config = {'optim': {'lr': -1.0}}\n")
    messages = []
    for path, overrides in ((tmp_path / "r.py", []), (tmp_path / "c.yaml", []), (tmp_path / "d.py", []),
                            (None, ["optim.lr=-1.0"])):
        with pytest.raises(ConfigError) as err:
            load_config(path, overrides)
        messages.append(str(err.value))
        assert "'optim.lr'" in str(err.value) and "must be > 0, got -1.0" in str(err.value)
    assert str(tmp_path / "r.py") in messages[0] and str(tmp_path / "c.yaml") in messages[1]
    assert "(command line)" in messages[3]


def test_recipe_typo_or_old_key_is_refused_not_ignored(tmp_path):
    recipe = tmp_path / "old.py"
    recipe.write_text("from jaguar.config import Config\nconfig = Config()\nconfig.retrieval.k1 = 6\n")
    with pytest.raises(ConfigError, match=r"old\.py.*'retrieval\.k1'.*did you mean retrieval\.post\.k1"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"'retrieval\.k1'.*did you mean retrieval\.post\.k1"):
        load_config(None, ["retrieval.k1=6"])
    with pytest.raises(ConfigError, match=r"'retrieval\.post' .*is a group"):
        load_config(None, ["retrieval.post=3"])


def test_groups_built_in_python_are_checked():
    with pytest.raises(ConfigError, match=r"'model\.pooling'.*did you mean gem"):
        ModelConfig(pooling="gemm")
    cfg = Config()
    with pytest.raises(ConfigError, match=r"'optim\.lr'"):
        cfg.optim.lr = 0.0
    cfg.model.img_size[0] = 4  # in-place list edits are caught by the load-time validation
    with pytest.raises(ConfigError, match=r"'model\.img_size'"):
        validate(cfg)


def test_post_processing_is_one_nested_type(tmp_path):
    cfg = load_config(ROOT / "recipes" / "tiny_cpu.py", ["retrieval.post.k1=4"])
    assert isinstance(cfg.retrieval.post, PostConfig) and cfg.retrieval.post.k1 == 4
    assert "post" in to_dict(cfg)["retrieval"] and "k1" not in to_dict(cfg)["retrieval"]
    assert PostConfig.from_dict(cfg.retrieval.post.to_dict()) == cfg.retrieval.post
    with pytest.raises(ConfigError, match=r"'retrieval\.post\.k1' in post\.json must be >= 1"):
        PostConfig.from_dict({"k1": 0}, " in post.json")
    with pytest.raises(ConfigError, match=r"'retrieval\.post\.lambda'.*did you mean retrieval\.post\.lambda_value"):
        PostConfig.from_dict({"lambda": 0.3})


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")))
def test_written_config_round_trips(recipe, tmp_path):
    """A run's config.yaml (save_config) and `config show`'s output are valid configs of the same values."""
    cfg = load_config(recipe, ["model.img_size=192", "run.name=a: #b"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and to_yaml(again) == to_yaml(cfg)
    assert from_dict(yaml.safe_load(to_yaml(cfg))) == cfg
    assert dataclasses.asdict(again)["model"]["img_size"] == [192, 192]
