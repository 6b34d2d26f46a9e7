"""One package per task: pure rules, generator and verifier apart from Lightning, plus its ``Task``
(``lightning_ctx.data.task``) that the one DataModule holds.

* ``world``: the built-in rule world (also its tokenizer, base model and pretraining);
* ``mcqa``: multiple-choice QA with a system prompt (MedMCQA and generic exports; OPCD's tagged protocol);
* ``safety``: a safety-analysis system prompt, verdicts ``<answer>yes|no</answer>``;
* ``frozenlake``: FrozenLake maps as single-response records;
* ``games``: multi-turn TextArena games (Sokoban, FrozenLake) with an experience text as the context.

Importing ``lightning_ctx.tasks.<task>`` gives its task and verifier; the rules modules import
nothing from Lightning or torch-based training code.
"""
