"""What kind of folder a user handed a command: a run folder (`jaguar train`), a shards folder
(`jaguar prep`, pseudo-labelling), or a raw data set (the challenge layout or one folder per
identity), and the message for a folder given to a command that takes another kind. Every
command's folder arguments are checked here once, by `jaguar.cli.main`, before the command runs:
`jaguar train demo/run` then says that demo/run is a run and how to continue training it, instead
of "config file demo/run does not exist".

Recognition reads only names (no file is opened), so it is cheap and never fails on a damaged
folder; the command itself still checks what it reads."""

from __future__ import annotations

import argparse
import shlex
from itertools import islice
from pathlib import Path
from typing import Optional

from jaguar.data.manifest import MANIFEST_NAME
from jaguar.errors import JaguarError
from jaguar.run import RunDir

RUN, SHARDS, CHALLENGE, IDENTITIES = "run", "shards", "challenge", "identities"
_RUN = RunDir("RUN")  # a run's file names, as RunDir spells them
RAW = (CHALLENGE, IDENTITIES)
CONFIG = "config"  # not a folder kind: what a recipe argument wants (a .py or .yaml file)

# What each kind is, in the words of the messages.
DESCRIPTION = {
    RUN: "a run folder (made by jaguar train)",
    SHARDS: f"a shards folder ({MANIFEST_NAME}; made by jaguar prep)",
    CHALLENGE: "a raw data set in the challenge layout (train.csv + train/)",
    IDENTITIES: "a raw data set with one folder per identity",
}
# What a command's argument wants, when it is not what was given.
WANTED = {
    RUN: f"a run folder ({_RUN.config_path.name}, {_RUN.checkpoints_dir.name}/; made by jaguar train)",
    SHARDS: f"a shards folder (with {MANIFEST_NAME}; made by jaguar prep)",
    "raw": "a raw data set (train.csv + train/, or one folder per identity)",
    CONFIG: "a recipe is a .py or .yaml config file (recipes/*.py)",
    "run_or_file": "a submission file (row_id,similarity) or a run folder",
}
# The argument names (argparse dests) that hold folders, and the kind each command wants there.
FOLDER_ARGUMENTS = {"run_dir": RUN, "runs": RUN, "shards": SHARDS, "src": "raw", "recipe": CONFIG,
                    "config": CONFIG, "submission": "run_or_file"}


class WrongFolderError(JaguarError, ValueError):
    """A folder of one kind given where a command takes another; the message says what it is and
    which command takes it."""


def folder_kind(path: str | Path) -> Optional[str]:
    """RUN, SHARDS, CHALLENGE or IDENTITIES for a folder made by (or for) jaguar, else None (also
    for a file or a missing path). Checked in that order: a run folder has sub-folders too. A run
    folder is one with any artifact a run stage writes (config.yaml and checkpoints/ of training,
    features/ of extraction or an ensemble, post.json, ...)."""
    path = Path(path)
    if not path.is_dir():
        return None
    run = RunDir(path)
    if any(marker.exists() for marker in (run.config_path, run.checkpoints_dir, run.split_path, run.features_dir,
                                          run.metrics_path, run.post_path, run.ensemble_path)):
        return RUN
    if (path / MANIFEST_NAME).is_file():
        return SHARDS
    return raw_layout(path)


def raw_layout(path: Path) -> Optional[str]:
    """CHALLENGE, IDENTITIES or None: the layout `jaguar prep` would read (jaguar.data.layouts,
    imported only here: it brings Pillow and numpy). A folder is taken for one folder per identity
    only when one of its first sub-folders holds a photo: any folder has sub-folders."""
    from jaguar.data.image_forms import IMAGE_SUFFIXES
    from jaguar.data.layouts import detect_layout

    try:
        if detect_layout(path) == "challenge":
            return CHALLENGE
        folders = islice((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), 50)
        if any(f.suffix.lower() in IMAGE_SUFFIXES for folder in folders for f in islice(folder.iterdir(), 200)):
            return IDENTITIES
    except (ValueError, OSError):
        pass
    return None


def run_shards(path: Path) -> Optional[str]:
    """The data.shards a run folder's config.yaml names (read as plain YAML), or None."""
    import yaml

    try:
        data = yaml.safe_load(RunDir(path).config_path.read_text())
        return str(data["data"]["shards"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def takes(kind: str, path: Path) -> str:
    """The commands that take a folder of `kind`, spelt out for `path`."""
    quoted = shlex.quote(str(path))
    if kind == RUN:
        return (f"give it to the commands that read a run: `jaguar extract {quoted} --split val`, "
                f"`jaguar tune-post {quoted}`, `jaguar report {quoted}`, ...")
    if kind == SHARDS:
        return (f"train on it with `jaguar train RECIPE data.shards={quoted}`, check it with "
                f"`jaguar verify {quoted}`")
    return f"convert it first: `jaguar prep {quoted} SHARDS`, then `jaguar train RECIPE data.shards=SHARDS`"


def wrong_folder_message(path: str | Path, wanted: str, command: str) -> Optional[str]:
    """The message for `path` given to `jaguar COMMAND` where `wanted` (a FOLDER_ARGUMENTS value)
    is expected, or None when the path is not a recognised folder of another kind (the command
    then reports what is missing itself)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind is None or kind == wanted or (wanted == "raw" and kind in RAW) or (wanted == "run_or_file" and kind == RUN):
        return None
    quoted = shlex.quote(str(path))
    head = f"{path} is {DESCRIPTION[kind]}, not {WANTED[wanted]}" if wanted != CONFIG else \
        f"{path} is {DESCRIPTION[kind]}; {WANTED[CONFIG]}"
    if wanted == CONFIG and kind == RUN and command == "extract":
        hint = f"to extract with its trained weights, run `jaguar extract {quoted} --split val` (no --config)"
    elif wanted == CONFIG and kind == RUN and command == "config":
        hint = f"its resolved config: `jaguar config show {shlex.quote(str(RunDir(path).config_path))}`"
    elif wanted == CONFIG and kind == RUN:
        hint = (f"to continue training it, run `jaguar train {shlex.quote(str(RunDir(path).config_path))}` "
                "(its resolved config; train.resume=auto continues from the newest checkpoint)")
    elif wanted == CONFIG and kind == SHARDS:
        hint = f"give it as data.shards: `jaguar {command} recipes/tiny_cpu.py data.shards={quoted}`"
    elif wanted == SHARDS and kind == RUN:
        shards = run_shards(path)
        hint = (f"the run was trained on data.shards={shards}: `jaguar {command} {shlex.quote(shards)}`" if shards
                else f"its shards are the data.shards of {RunDir(path).config_path}")
    elif wanted == RUN and kind == SHARDS:
        hint = (f"extract features with a trained run (`jaguar extract RUN --split val`, RUN trained with "
                f"data.shards={quoted}), or with a pretrained backbone: `jaguar extract --config RECIPE "
                f"data.shards={quoted} run.dir=RUN`" + ("" if command == "extract" else f"; then `jaguar {command} RUN`"))
    else:
        hint = takes(kind, path)
    return f"{head}; {hint}"


def check_folder_arguments(args: argparse.Namespace) -> None:
    """Raise WrongFolderError when a folder argument of `jaguar COMMAND` (FOLDER_ARGUMENTS) is a
    recognised folder of another kind."""
    for dest, wanted in FOLDER_ARGUMENTS.items():
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and "=" not in value:
                message = wrong_folder_message(value, wanted, args.command)
                if message:
                    raise WrongFolderError(message)
