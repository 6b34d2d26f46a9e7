"""FrozenLake maps as single-response records: the response is a sequence of moves, replayed on the map."""

from lightning_ctx.tasks.frozenlake.rules import FrozenLakeVerifier, make_frozenlake_records
from lightning_ctx.tasks.frozenlake.task import FrozenLakeTask

__all__ = ["FrozenLakeTask", "FrozenLakeVerifier", "make_frozenlake_records"]
