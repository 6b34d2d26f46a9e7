"""The rule world's tokenizer, model and pretraining, and the shipped pretrained base.

The base-accuracy test decodes all 61 in-distribution contexts x 20 held-out inputs (1,220 items,
every context covered) and requires >= 0.99 per context, i.e. every item right; the full
200-per-context evaluation is in ``assets/world_base/report.json`` and is checked here too.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_ctx.tasks.world import evaluate as WE
from lightning_ctx.tasks.world import model as WM
from lightning_ctx.tasks.world import pretrain as WP
from lightning_ctx.tasks.world import rules as W
from lightning_ctx.tasks.world import tokenizer as WT

# --------------------------------------------------------------------------------------------------
# tokenizer and model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return WT.build_world_tokenizer()


def _render(tokenizer, context, prompt):
    messages = ([{"role": "system", "content": context}] if context else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenizer_roundtrip(tok, tmp_path):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert tok.pad_token_id != tok.eos_token_id and tok.eos_token == "<eot>" and tok.unk_token == "<unk>"
    ids = _render(tok, "ADD1 REV SHOW", "3 1 4")
    assert tok.convert_ids_to_tokens(ids) == ["<|system|>", "ADD1", "REV", "SHOW", "<|user|>", "3", "1", "4",
                                             "<|assistant|>"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(_render(tok, "", "3 1 4"))[0] == "<|user|>"  # no system turn without context
    response = tok("3 1 4 = 5 2 4", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert tok.decode(response, skip_special_tokens=True) == "3 1 4 = 5 2 4"
    assert tok.decode(ids + response, skip_special_tokens=True) == "ADD1 REV SHOW 3 1 4 3 1 4 = 5 2 4"

    tok.save_pretrained(tmp_path)
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert tok2.chat_template == tok.chat_template
    assert tok2.get_vocab() == tok.get_vocab()
    ids = ("pad_token_id", "eos_token_id", "unk_token_id")
    assert [getattr(tok2, i) for i in ids] == [getattr(tok, i) for i in ids]
    for c in ["", "SHOW", "ADD2 ADD2", "REV ADD4 SHOW"]:
        assert _render(tok2, c, "0 9 5") == _render(tok, c, "0 9 5")
    assert tok2.decode(response, skip_special_tokens=True) == "3 1 4 = 5 2 4"


def test_pretraining_batches(tok):
    data = WP.WorldBatches(tok, batch_size=64, seed=0, p_no_context=0.3)
    b1, b2 = next(iter(data)), next(iter(WP.WorldBatches(tok, batch_size=64, seed=0, p_no_context=0.3)))
    assert all(torch.equal(b1[k], b2[k]) for k in b1)  # seeded
    assert not torch.equal(b1["input_ids"], next(iter(WP.WorldBatches(tok, 64, seed=1)))["input_ids"])
    asst = tok.convert_tokens_to_ids("<|assistant|>")
    n_no_ctx = 0
    for ids, mask, labels in zip(b1["input_ids"].tolist(), b1["attention_mask"].tolist(), b1["labels"].tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n)  # right padded
        start = ids.index(asst) + 1
        assert all(v == -100 for v in labels[:start])  # prompt masked
        assert labels[start:n] == ids[start:n] and ids[n - 1] == tok.eos_token_id  # answer + <eot> in the loss
        assert all(v == -100 for v in labels[n:])
        # the spliced prompt ids equal the package's rendering convention
        words = tok.convert_ids_to_tokens(ids[:start])
        context = " ".join(words[1:words.index("<|user|>")]) if words[0] == "<|system|>" else ""
        prompt = " ".join(words[words.index("<|user|>") + 1:-1])
        assert ids[:start] == _render(tok, context, prompt)
        answer = tok.decode(ids[start:n], skip_special_tokens=True)
        if context:
            assert answer == W.apply_context(context, prompt)
        else:
            n_no_ctx += 1
            assert W.classify_no_context_answer(prompt, answer)
    assert n_no_ctx > 5


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_model_config(tok, arch):
    cfg = WM.build_world_model_config(tok, arch=arch)
    assert cfg.model_type == arch and cfg.tie_word_embeddings and cfg.vocab_size == len(tok)
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 96 and cfg.max_position_embeddings == 64
    assert cfg.pad_token_id == tok.pad_token_id and cfg.eos_token_id == tok.eos_token_id
    model = WM.build_world_model(tok, seed=0, arch=arch)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    batch = next(iter(WP.WorldBatches(tok, batch_size=16, seed=0)))
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert abs(loss - math.log(len(tok))) < 0.5  # fresh init: ~uniform over the vocabulary


@pytest.mark.slow
def test_pretrain_module_learns(tok):
    import lightning.pytorch as pl

    module = WP.WorldPretrainModule(width=32, layers=1, heads=2, lr=1e-2, warmup_steps=2, max_steps=20)
    data = WP.WorldBatches(module.tokenizer, batch_size=16, seed=0)
    batch = next(iter(data))
    with torch.no_grad():
        before = module.model(**batch).loss.item()
    trainer = pl.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    with torch.no_grad():
        after = module.model(**batch).loss.item()
    assert after < before - 0.5  # learns (only answer tokens are in the loss)


# --------------------------------------------------------------------------------------------------
# the shipped base
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base():
    if not (WM.WORLD_BASE_DIR / "model.safetensors").exists():
        pytest.fail(f"shipped world base missing in {WM.WORLD_BASE_DIR}")
    return WM.load_world_base()


def test_base_files_and_report(base):
    model, tokenizer = base
    files = {p.name for p in WM.WORLD_BASE_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "report.json"} <= files
    assert sum(p.stat().st_size for p in WM.WORLD_BASE_DIR.iterdir()) < 5e6
    assert model.dtype == torch.float32 and tokenizer.chat_template == WT.WORLD_CHAT_TEMPLATE
    report = json.loads((WM.WORLD_BASE_DIR / "report.json").read_text())
    assert report["eval"]["min_acc"] >= 0.99 and report["eval"]["n_per_context"] >= 200
    assert set(report["eval"]["per_context"]) == set(W.ALL_CONTEXTS)
    assert report["model"]["parameters"] == WM.count_parameters(model)


def test_base_accuracy_every_context(base):
    model, tokenizer = base
    torch.manual_seed(0)
    ev = WE.evaluate_world_model(model, tokenizer, W.ALL_CONTEXTS, n_per_context=20, seed=0)
    assert len(ev["per_context"]) == 61 and all(v["n"] == 20 for v in ev["per_context"].values())
    assert ev["min_acc"] >= 0.99, (ev["argmin"], ev["per_context"][ev["argmin"]])


def test_base_left_padding_matches_single(base):
    model, tokenizer = base
    recs = [WE.heldout_records(c, 1, seed=2)[0] for c in ["SHOW", "ADD1", "REV ADD4 SHOW"]]
    rows = [WT.render_prompt_ids(tokenizer, r["context"], r["prompt"]) for r in recs]
    batched = WE.generate_responses(model, tokenizer, rows)
    single = [WE.generate_responses(model, tokenizer, [row])[0] for row in rows]
    assert batched == single
    assert [t for t, _ in batched] == [r["answer"] for r in recs]


def test_base_without_context_is_a_mixture(base):
    """Greedy = identity, but the SHOW format keeps some (not overwhelming) mass: OPD on SHOW can sample it."""
    model, tokenizer = base
    p_add = []
    for r in WE.heldout_records("SHOW", 6, seed=1):
        x = r["prompt"]
        probs = WE.no_context_answer_probs(model, tokenizer, x)  # exact, teacher-forced, incl. <eot>
        assert probs["IDENTITY"] == max(probs.values()) and 0.25 < probs["IDENTITY"] < 0.8
        assert 0.02 < probs["SHOW"] < 0.25  # the "x = x" answer: sampled now and then, never dominant
        p_add.append(sum(probs[f"ADD{k}"] for k in range(1, 5)))
        row = WT.render_prompt_ids(tokenizer, None, x)
        assert WE.generate_responses(model, tokenizer, [row])[0][0] == x
    assert 0.15 < sum(p_add) / len(p_add) < 0.5  # target 4/12 = 0.33
