"""The oracle's ceiling and the random player's floor on a game config's splits, without a model.

    .venv/bin/python scripts/game_playability.py experiments/paper/game_*.yaml

For each config: its task's arguments as the config stack sets them (``defaults`` first), then per split the games
checked (every evaluated val/test game; an even sample of a large train split, as ``GamesTask`` does before
training), the fraction the solver wins within ``max_turns`` and the random legal-move player's pass rate (its exact win
probability, averaged over the games). The README's numbers come from this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from lightning_ctx.cli import expand_configs
from lightning_ctx.knobs import bound_args
from lightning_ctx.tasks.games import GamesTask
from lightning_ctx.tasks.games.task import env_kwargs_for, playability_report


def data_args(config: str | Path) -> dict:
    """``GamesTask``'s arguments as ``config`` and its ``defaults`` set them (later files win), with the
    DataModule's ``max_eval_items`` (it caps the evaluated games)."""
    init_args: dict = {}
    argv = expand_configs(["--config", str(config)])
    for flag, path in zip(argv[::2], argv[1::2]):
        assert flag == "--config"
        data = (yaml.safe_load(Path(path).read_text()) or {}).get("data") or {}
        init_args.update((data.get("task") or {}).get("init_args") or {})
        if "max_eval_items" in data:
            init_args["max_eval_items"] = data["max_eval_items"]
    return bound_args(GamesTask, init_args)


def main(configs: list[str]) -> None:
    print("| config | env_kwargs | max_turns | split | games | oracle | random |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        args = data_args(config)
        report = playability_report(args)
        for split in ("train", "val", "test"):
            if split in report:
                found = report[split]
                print(f"| {Path(config).stem} | {env_kwargs_for(args['env_id'], args['env_kwargs'])} | "
                      f"{args['max_turns']} | {split} | {found.checked} | {found.fraction:.1%} "
                      f"({found.winnable}/{found.checked}) | {found.random_pass:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
