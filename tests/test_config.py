"""Config: loading recipes and YAML, dotted overrides, errors that name the key, lossless round trip."""

import subprocess
import sys
from pathlib import Path

import pytest

from jaguar.config import Config, ConfigError, from_dict, load_config, save_config, to_dict, to_yaml

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
