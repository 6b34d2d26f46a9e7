"""FrozenLake maps as single-response records: the response is a sequence of moves, replayed on the map."""

from lightning_ctx.tasks.frozenlake.datamodule import FrozenLakeDataModule
from lightning_ctx.tasks.frozenlake.rules import FrozenLakeVerifier, make_frozenlake_records

__all__ = ["FrozenLakeDataModule", "FrozenLakeVerifier", "make_frozenlake_records"]
