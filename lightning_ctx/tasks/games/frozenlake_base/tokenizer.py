"""The game base's word-level tokenizer and Qwen3-style chat template.

Every whitespace-separated word of the real per-turn prompts is one token, and so is every row of a board TextArena
draws (``|  P  |     |  H  |``: one token per content of the three cells, all 64 in the vocabulary), so the base
reads where the player and the holes are off a few tokens. Measured (400 pretraining steps, seed 0, held-out pass
rate with the built-in experience, sampled, 128 games): boards split into words lose their empty cells and the base
never learned to play (0.20); whole boards as one token (114 of them, each seen rarely) 0.25; rows with the lines
around them as tokens (a row token that also says which row it is) 0.78; plain row tokens, the shipped design, 0.91
(0.30 at other widths and seeds: the report in lightning_ctx/assets/games_base/ is the one to trust). The texts
(:func:`vocabulary_words`): TextArena FrozenLake's rules, boards, move reports and invalid-move warnings (collected
by playing real games), our ``TurnPrompt`` (preamble, experience block, history lines, question), the experience
notes and the players' replies. The chat template is the tiny Qwen3 stand-in's
(:data:`lightning_ctx.models.tiny.QWEN3_TEMPLATE`: ChatML, ``enable_thinking: false`` writes an empty reasoning
block into the generation prompt). ``<|im_end|>`` ends a turn (eos), ``<|endoftext|>`` pads, ``[UNK]`` exists only
so that a foreign word cannot crash the tokenizer (tests/tasks/games/test_frozenlake_base.py checks that real prompts
never produce it). ``save_games_tokenizer``
writes the portable folder (:func:`lightning_ctx.models.pretraining.save_portable_tokenizer`) that transformers 4.56
and 5.x both load.
"""

from __future__ import annotations

import itertools

from lightning_ctx.models.tiny import FAMILIES, QWEN3_TEMPLATE
from lightning_ctx.tasks.games import oracle
from lightning_ctx.tasks.games.frozenlake_base import players as P

ENV_ID = "FrozenLake-v0-raw"
UNK = "[UNK]"
SPECIALS = tuple(FAMILIES["qwen3"]["specials"])  # <|im_start|>, <|im_end|> (eos), <|endoftext|> (pad)
ROLES = ("system", "user", "assistant")
#: Move texts a reply or a history line can hold: every action keyword TextArena accepts, and OPCD's placeholder
#: for a reply without one.
VOCAB_MOVES = ("[up]", "[down]", "[left]", "[right]", "[w]", "[a]", "[s]", "[d]", "[no valid action]")
CORPUS_SEEDS = 8  # games per probe script
#: A board row (``|`` to ``|`` on one line), else a run of non-space characters.
WORD_PATTERN = r"\|[^\n]*\||\S+"
#: Every row a 3x3 board can draw: each cell empty, the player, a hole or the goal.
ROW_TEXTS = tuple("|" + "|".join(f"  {c}  " for c in cells) + "|" for cells in itertools.product(" PHG", repeat=3))
BOARD_SEEDS = 400  # training seeds searched for the boards (OPCD's 19 are all among the first 85)
MODEL_MAX_LENGTH = 1024
# No token_type_ids: PreTrainedTokenizerFast's default in transformers 4.x would return them.
MODEL_INPUT_NAMES = ["input_ids", "attention_mask"]
#: ``tokenizer_config.json`` of a saved game tokenizer: keys both transformers 4.56+ and 5.x read.
PORTABLE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "eos_token": FAMILIES["qwen3"]["eos"],
    "pad_token": FAMILIES["qwen3"]["pad"],
    "unk_token": UNK,
    "additional_special_tokens": list(SPECIALS),
    "clean_up_tokenization_spaces": False,
    "model_max_length": MODEL_MAX_LENGTH,
    "model_input_names": MODEL_INPUT_NAMES,
}


def _static_texts() -> list[str]:
    from lightning_ctx.rollout_episodes import TurnPrompt

    prompt = TurnPrompt()
    texts = [prompt.text([], None), prompt.experience.format(experience=""), prompt.player_line.format(move="")]
    texts += list(P.HOLE_NOTES) + list(P.OTHER_NOTES) + ["-"]
    board = oracle.FrozenLakeBoard(3, frozenset({(1, 1), (2, 0)}), (2, 2), (0, 0), 100)
    texts += [P.reply_text(p, board, cell, m.strip("[]"), thinking) for p in P.PLAYERS for m in VOCAB_MOVES[:4]
              for thinking in (True, False) for cell in itertools.product(range(3), repeat=2)]
    texts += list(VOCAB_MOVES) + list(ROLES) + [P.THINK_OPEN, P.THINK_CLOSE] + list(ROW_TEXTS)
    return texts


def game_texts(env_kwargs: dict | None = None, seeds: int = CORPUS_SEEDS) -> list[str]:
    """What TextArena shows on OPCD's boards: the first observation and the feedback after every pair of moves of
    each kind (moves, walls, a reply without an action: every row and column of a position report), over ``seeds``
    games."""
    from lightning_ctx.tasks.games.env import make_games
    from lightning_ctx.tasks.games.task import env_kwargs_for

    kwargs = env_kwargs_for(ENV_ID, env_kwargs)
    texts = []
    for script in itertools.product(VOCAB_MOVES[:4] + VOCAB_MOVES[-1:], repeat=2):
        for game in make_games(ENV_ID, list(range(seeds)), 5, kwargs):
            texts.append(game.reset())
            for move in script:
                done, feedback = game.step(move)
                texts.append(feedback)
                if done:
                    break
    return texts


def board_texts(env_kwargs: dict | None = None, seeds: int = BOARD_SEEDS) -> list[str]:
    """Every board TextArena can show on the first ``seeds`` training games' boards, drawn by TextArena itself: each
    distinct hole layout with the player on every cell that is neither a hole nor the goal (stepping onto either
    ends the game before a board is shown)."""
    import random

    from lightning_ctx.tasks.games.env import import_textarena
    from lightning_ctx.tasks.games.task import env_kwargs_for

    ta = import_textarena()
    kwargs = oracle.make_kwargs(env_kwargs_for(ENV_ID, env_kwargs))
    layouts = {}
    for seed in range(seeds):
        layouts.setdefault(oracle.board(ENV_ID, kwargs, seed).holes, seed)
    texts = []
    saved = random.getstate()  # TextArena seeds Python's global random at reset
    try:
        for seed in layouts.values():
            env = ta.make(ENV_ID, **kwargs)
            env.reset(num_players=1, seed=seed)
            board = oracle.read_board(env)
            for cell in itertools.product(range(board.size), repeat=2):
                if cell not in board.holes and cell != board.goal:
                    env.state.game_state["player_pos"] = cell
                    texts.append(env._render_board())
    finally:
        random.setstate(saved)
    return texts


def pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True)


def words_of(text: str) -> list[str]:
    return [w for w, _ in pre_tokenizer().pre_tokenize_str(text)]


def vocabulary_words(env_kwargs: dict | None = None) -> list[str]:
    """The vocabulary (sorted, without the special tokens): every word of the texts above."""
    words = {w for text in _static_texts() + game_texts(env_kwargs) + board_texts(env_kwargs)
             for w in words_of(text)}
    return sorted(words - set(SPECIALS) - {UNK})


def build_games_tokenizer(words: list[str] | None = None):
    """A ``PreTrainedTokenizerFast`` over ``words`` (default: :func:`vocabulary_words`, which plays TextArena)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = vocabulary_words() if words is None else list(words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys([UNK, *SPECIALS, *words]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizer()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    qwen3 = FAMILIES["qwen3"]
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token=UNK, eos_token=qwen3["eos"],
                                  pad_token=qwen3["pad"], additional_special_tokens=list(SPECIALS),
                                  chat_template=QWEN3_TEMPLATE, clean_up_tokenization_spaces=False,
                                  model_max_length=MODEL_MAX_LENGTH, model_input_names=MODEL_INPUT_NAMES)
    assert tok.pad_token_id != tok.eos_token_id
    return tok


def save_games_tokenizer(tokenizer, output_dir) -> None:
    """Write ``tokenizer`` (a ``build_games_tokenizer()``) in the portable format (module docstring)."""
    from lightning_ctx.models.pretraining import save_portable_tokenizer

    save_portable_tokenizer(tokenizer, output_dir, PORTABLE_TOKENIZER_CONFIG)
