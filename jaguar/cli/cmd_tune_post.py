"""`jaguar tune-post RUN_DIR`: choose QE / re-ranking / blend on the validation features and
write RUN_DIR/post.json with the chosen settings and the raw / +QE / +re-ranking / blend table."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune-post", help="tune query expansion and re-ranking on the validation split")
    parser.add_argument("run_dir", help="run folder holding features/val.safetensors and config.yaml")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from jaguar.cli.main import UserError
    from jaguar.config import Config, load_config
    from jaguar.io import atomic_write_json
    from jaguar.retrieval.features import FeatureSet
    from jaguar.retrieval.postprocess import format_table, tune_post

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        config = load_config(config_path)
    else:
        print(f"note: {config_path} not found; using the default retrieval settings")
        config = Config()
    features = FeatureSet.load(run_dir / "features" / "val.safetensors")
    try:
        chosen, table = tune_post(features, config.retrieval, search=config.retrieval.tune)
    except ValueError as err:
        raise UserError(f"{run_dir / 'features' / 'val.safetensors'}: {err}") from None
    how = "searched" if config.retrieval.tune else "taken from retrieval.* (retrieval.tune is false)"
    print(f"post-processing on {len(features)} validation images ({how}):")
    print(format_table(table))
    atomic_write_json(run_dir / "post.json", {"chosen": chosen.to_dict(), "table": table,
                                              "val_size": len(features), "searched": config.retrieval.tune})
    print(f"wrote {run_dir / 'post.json'}")
    return 0
