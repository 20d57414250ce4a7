"""`jaguar config show RECIPE [key=value ...]`: print the resolved configuration as YAML."""

from __future__ import annotations

import argparse

from jaguar.config import load_config, to_yaml


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="inspect configurations")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print the resolved config (recipe or YAML + overrides) as YAML")
    show.add_argument("recipe", nargs="?", default=None, help="recipes/*.py or a .yaml file (default: built-in defaults)")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:
        overrides.insert(0, recipe)
        recipe = None
    print(to_yaml(load_config(recipe, overrides)), end="")
    return 0
