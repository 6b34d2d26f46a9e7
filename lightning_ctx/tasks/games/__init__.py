"""Text games (Sokoban, FrozenLake through TextArena) as multi-turn episodes with experiential knowledge.

* ``env``: TextArena wrapped as a seeded game with our turn limit (what the model sees each turn);
* ``task``: seeds per split, the experience text as the context, episode batches for training;
* ``evaluate`` / ``callback``: pass rate with and without the experience on the same seeds;
* ``extract``: ``lightning-ctx extract``, the experience written by the model from its own games.
"""

from lightning_ctx.tasks.games.callback import GameEvalCallback
from lightning_ctx.tasks.games.env import GameFactory, GameOutcome, TextGame
from lightning_ctx.tasks.games.task import GamesTask

__all__ = ["GameEvalCallback", "GamesTask", "GameFactory", "GameOutcome", "TextGame"]
