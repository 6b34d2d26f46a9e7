"""The built-in game base (``model.student: builtin:games``): a small Qwen3 that plays TextArena FrozenLake on OPCD's
boards, pretrained on scripted players (:mod:`.players`) by ``lightning-ctx pretrain-games`` (:mod:`.pretrain`)."""
