"""Speed, memory and scale paths: LoRA + base teacher, bitsandbytes on CPU, static-cache rollouts, auto chunking."""

import inspect

import pytest
import torch

from lightning_ctx import objectives
from lightning_ctx.data.render import left_pad
from lightning_ctx.loss import auto_chunk_size
from lightning_ctx.models.loading import ModelError, load_causal_lm
from lightning_ctx.models.scoring import join_prompt_and_response, response_logits
from lightning_ctx.models.teachers import BaseWeightsTeacher
from lightning_ctx.module import OnPolicyDistillation
from lightning_ctx.rollout import CACHE_ARGUMENTS, SamplingSettings, build_engine, cache_argument, sample_responses
from tests.helpers import fixed_rollout, perturb, tiny_batch


def _ctx_inputs(module, batch, rollout):
    return join_prompt_and_response(batch.ctx_prompt_ids, batch.ctx_prompt_mask, rollout.response_ids,
                                    rollout.response_mask)


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_base_teacher_is_the_base_model_and_keeps_student_modes(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher="base", anchor_weight=0.5,
                                  lora={"r": 4, "alpha": 8, "dropout": 0.5, "target_modules": ["q_proj", "v_proj"]})
    student = module.student
    assert isinstance(module.teacher, BaseWeightsTeacher) and not isinstance(module.teacher, torch.nn.Module)
    # one copy of the weights: the module holds the student's parameters only, checkpoints no teacher
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in student.parameters())
    assert not any(k.startswith("teacher.") for k in module.state_dict())
    with torch.no_grad():  # a non-zero adapter, so student != base
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    # a mixed mode state (one submodule deliberately in eval) must come back exactly
    student.base_model.model.model.layers[0].mlp.eval()
    modes = {name: m.training for name, m in student.named_modules()}
    assert student.training and not all(modes.values())

    batch = tiny_batch(module)
    rollout = fixed_rollout(module, batch)
    ctx_in = _ctx_inputs(module, batch, rollout)
    teacher_logits = module._teacher_logits(ctx_in)
    assert {name: m.training for name, m in student.named_modules()} == modes

    base = load_causal_lm(tiny_dirs["qwen2"]).eval()
    with torch.no_grad():
        base_logits = response_logits(base, ctx_in, module.vocab_size)
        student.eval()
        adapted = response_logits(student, ctx_in, module.vocab_size)
    for name, m in student.named_modules():
        m.training = modes[name]
    torch.testing.assert_close(teacher_logits, base_logits, rtol=0, atol=1e-6)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter is live outside the teacher pass

    # a full step: only adapter weights get gradients; modes still untouched afterwards
    terms = module.compute_losses(batch, rollout)
    assert terms["opd"] > 1e-4 and terms["anchor"] > 1e-4
    terms["loss"].backward()
    grads = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert {name: m.training for name, m in student.named_modules()} == modes


def test_lora_teacher_defaults_to_base_and_base_needs_lora(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["llama"], lora={"r": 2})
    assert isinstance(module.teacher, BaseWeightsTeacher)
    assert all(p.requires_grad == ("lora_" in n) for n, p in module.student.named_parameters())
    with pytest.raises(ModelError, match="set model.lora"):
        OnPolicyDistillation(student=tiny_dirs["llama"], teacher="base")
    with pytest.raises(ModelError, match="unknown key"):
        OnPolicyDistillation(student=tiny_dirs["llama"], lora={"rank": 2})


# ------------------------------------------------------------------------------ bitsandbytes (CPU)


@pytest.fixture(scope="module")
def real_shaped_dir(tmp_path_factory):
    """Layer shapes as in real models (multiples of 64), which every bitsandbytes CPU kernel takes."""
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    return str(save_tiny_checkpoint(tmp_path_factory.mktemp("w64") / "qwen2", "qwen2", width=64, seed=1))


@pytest.mark.parametrize("kind,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_teacher_on_cpu(real_shaped_dir, kind, layer):
    pytest.importorskip("bitsandbytes")
    full = OnPolicyDistillation(student=real_shaped_dir)
    module = OnPolicyDistillation(student=real_shaped_dir, teacher=real_shaped_dir, teacher_quantization=kind)
    q_proj = module.teacher.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer and q_proj.weight.element_size() == 1
    assert not any(p.requires_grad for p in module.teacher.parameters())
    perturb(module.student)
    batch = tiny_batch(module)
    rollout = fixed_rollout(module, batch)
    ctx_in = _ctx_inputs(module, batch, rollout)
    quant, exact = module._teacher_logits(ctx_in), full._teacher_logits(ctx_in)
    # quantization error, not a different model: close in log-prob space relative to the signal
    err = (quant.log_softmax(-1) - exact.log_softmax(-1)).abs().mean()
    spread = (exact.log_softmax(-1) - exact.log_softmax(-1).mean(-1, keepdim=True)).abs().mean()
    assert 0 < err < 0.5 * spread, (err, spread)
    terms = module.compute_losses(batch, rollout)
    assert torch.isfinite(terms["loss"]) and terms["loss"] > 0
    terms["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student.parameters())
    # the initial student re-loaded quantized as the self-distillation teacher
    selfq = OnPolicyDistillation(student=real_shaped_dir, teacher_quantization=kind)
    assert type(selfq.teacher.model.layers[0].self_attn.q_proj).__name__ == layer


def test_4bit_teacher_with_shapes_the_cpu_kernel_cannot_take_fails_at_load(tiny_dirs, real_shaped_dir, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lightning_ctx.models import loading

    # as on an AVX-512-BF16 processor, whatever this one is
    monkeypatch.setattr(loading, "cpu_4bit_repacks", lambda: True)
    with pytest.raises(ModelError, match=r"layer 'model.layers.0.self_attn.q_proj' has shape \[out=32, in=32\].*8bit"):
        OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher_quantization="4bit")
    loading.check_cpu_4bit_shapes(real_shaped_dir)  # real-model shapes pass
    OnPolicyDistillation(student=tiny_dirs["qwen2"], teacher_quantization="8bit")  # 8-bit has no such limit


def test_cpu_4bit_unfit_layer_rules():
    from lightning_ctx.models.loading import cpu_4bit_unfit_layer

    class Net(torch.nn.Module):
        def __init__(self, shapes):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(k, n) for n, k in shapes)
            self.head = torch.nn.Linear(64, 7)  # the LM head is never quantized

        def get_output_embeddings(self):
            return self.head

    assert cpu_4bit_unfit_layer(Net([(64, 64), (32, 128), (96, 192)])) is None
    assert cpu_4bit_unfit_layer(Net([(64, 64), (48, 64)])) == ("layers.1", (48, 64))  # out not a multiple of 32
    assert cpu_4bit_unfit_layer(Net([(64, 96)])) == ("layers.0", (64, 96))  # in not a multiple of 64


def test_adamw8bit_step_matches_adamw_direction(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    path = str(save_tiny_checkpoint(tmp_path / "w64", "qwen2", width=64, seed=2))  # embedding > 4096 entries
    mods = {name: OnPolicyDistillation(student=path, optimizer=name, lr=1e-2) for name in ("adamw", "adamw8bit")}
    updates = {}
    for name, module in mods.items():
        perturb(module.student)
        opt = module.configure_optimizers()["optimizer"]
        assert isinstance(opt, bnb.optim.AdamW8bit) == (name == "adamw8bit")
        before = {n: p.detach().clone() for n, p in module.student.named_parameters()}
        batch = tiny_batch(module)
        module.compute_losses(batch, fixed_rollout(module, batch))["loss"].backward()
        opt.step()
        updates[name] = torch.cat([(p.detach() - before[n]).flatten() for n, p in module.student.named_parameters()])
        if name == "adamw8bit":
            emb = module.student.get_input_embeddings().weight
            assert opt.state[emb]["state1"].dtype == torch.uint8  # 8-bit optimizer state, not a float fallback
    u8, u32 = updates["adamw8bit"], updates["adamw"]
    assert u8.abs().max() > 1e-3  # the weights moved
    assert torch.nn.functional.cosine_similarity(u8, u32, dim=0) > 0.95


# ------------------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hf_static_engine_matches_hf_greedy(tiny_dirs, family):
    model = load_causal_lm(tiny_dirs[family]).train()
    settings = SamplingSettings(max_new_tokens=7, greedy=True)
    eos = [model.config.vocab_size - 1]  # never emitted: full-length rows, every decode step compared
    batches = [left_pad([[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]], 0), left_pad([[1, 20, 21], [1, 30]], 0)]
    static = build_engine("hf_static")
    assert static.warmup(model, 3, 6, settings, eos, 0) > 0
    assert static.max_cache_len == 6 + 7 and model.training  # sized for the longest prompt; mode restored
    for ids, mask in batches:
        ref = sample_responses(model, ids, mask, settings, eos, 0, build_engine("hf"))
        for name, engine in (("hf_static", static), ("hf_static_nocompile", build_engine("hf_static_nocompile")),
                             ("loop", build_engine("loop"))):
            out = sample_responses(model, ids, mask, settings, eos, 0, engine)
            assert out.response_ids.tolist() == ref.response_ids.tolist(), name
            assert out.response_ids.shape[1] == 7
    assert model.training


@pytest.mark.parametrize("settings", [SamplingSettings(max_new_tokens=9),
                                      SamplingSettings(max_new_tokens=9, temperature=0.7, top_k=20, top_p=0.9)])
def test_loop_engine_samples_like_generate(tiny_dirs, settings):
    """Same RNG state -> same samples as ``generate`` (same warpers, same multinomial), EOS handling included."""
    model = load_causal_lm(tiny_dirs["qwen2"]).train()
    ids, mask = left_pad([[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13], [1, 4]], 0)
    outs = {}
    for name in ("hf", "loop"):
        torch.manual_seed(3)
        outs[name] = sample_responses(model, ids, mask, settings, [2], 0, build_engine(name))
    assert outs["loop"].response_ids.tolist() == outs["hf"].response_ids.tolist()
    assert outs["loop"].lengths.tolist() == outs["hf"].lengths.tolist()
    torch.manual_seed(4)  # and a different seed gives different samples (the comparison is not vacuous)
    other = sample_responses(model, ids, mask, settings, [2], 0, build_engine("loop"))
    assert other.response_ids.tolist() != outs["loop"].response_ids.tolist()
    # min_new_tokens suppresses EOS in both engines
    forced = SamplingSettings(max_new_tokens=6, min_new_tokens=6, greedy=True)
    for name in ("hf", "loop"):
        assert sample_responses(model, ids, mask, forced, [2], 0, build_engine(name)).lengths.tolist() == [6] * 4


def test_loop_engine_samples_like_generate_through_a_peft_wrapper(tiny_dirs):
    """A LoRA student's forward (``PeftModel``) hides the cache argument; the loop must still pass it on."""
    pytest.importorskip("peft")
    from lightning_ctx.models.loading import apply_lora

    model = apply_lora(load_causal_lm(tiny_dirs["qwen2"]), {"r": 4, "target_modules": ["q_proj", "v_proj"]})
    perturb(model, seed=2)  # nonzero adapter weights: the wrapped model is not the base model
    assert CACHE_ARGUMENTS[0] not in inspect.signature(model.forward).parameters
    assert CACHE_ARGUMENTS[1] not in inspect.signature(model.forward).parameters
    settings = SamplingSettings(max_new_tokens=9, temperature=0.8)
    ids, mask = left_pad([[1, 5, 6, 7], [1, 8], [1, 9, 10, 11, 12, 13]], 0)
    outs = {}
    for name in ("hf", "loop"):
        torch.manual_seed(5)
        outs[name] = sample_responses(model, ids, mask, settings, [2], 0, build_engine(name))
    assert outs["loop"].response_ids.tolist() == outs["hf"].response_ids.tolist()
    assert outs["loop"].lengths.tolist() == outs["hf"].lengths.tolist() and max(outs["hf"].lengths.tolist()) > 2


def test_cache_argument_is_read_from_the_forward_signature(tiny_dirs):
    model = load_causal_lm(tiny_dirs["llama"])
    expected = next(n for n in CACHE_ARGUMENTS if n in inspect.signature(type(model).forward).parameters)
    assert cache_argument(model) == expected

    class Wrapper(torch.nn.Module):  # DDP-style: forward(*args, **kwargs) around .module
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    assert cache_argument(Wrapper(Wrapper(model))) == expected

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, **kwargs): ...

    assert cache_argument(Wrapper(OldStyle())) == "past_key_values"
    with pytest.raises(ModelError, match="rollout_engine 'hf'"):
        cache_argument(Wrapper(NoCache()))


def test_hf_static_passes_max_cache_len_only_where_generate_takes_it(monkeypatch):
    import transformers

    engine = build_engine("hf_static")
    engine.max_cache_len = 13
    kwargs = engine._kwargs(SamplingSettings(greedy=True), [2], 0)
    knows = hasattr(transformers.GenerationConfig(), "max_cache_len")
    assert kwargs.get("max_cache_len") == (13 if knows else None) and kwargs["cache_implementation"] == "static"

    class OldGenerationConfig:  # transformers < 5.13: no such field, and generate rejects the keyword
        pass

    monkeypatch.setattr(transformers, "GenerationConfig", OldGenerationConfig)
    assert "max_cache_len" not in engine._kwargs(SamplingSettings(greedy=True), [2], 0)


def test_fit_start_warms_up_the_engine(tiny_dirs):
    """``on_fit_start`` decodes one dummy batch of (datamodule batch size, longest prompt); off on request."""

    from lightning_ctx.data.datamodule import TaskDataModule
    from lightning_ctx.data.task import Task

    class DM(TaskDataModule):
        def longest_prompt(self):
            return 11

    class FakeTrainer:
        world_size, datamodule, loggers = 1, DM(Task(), batch_size=4), []

    for warm in (True, False):
        module = OnPolicyDistillation(student=tiny_dirs["qwen2"], rollout_engine="hf_static", max_new_tokens=5,
                                      rollout_warmup=warm)
        module._trainer = FakeTrainer()
        module.on_fit_start()
        assert module.engine.max_cache_len == (11 + 5 if warm else None)
        assert (module.engine.warmup_s is not None) == warm
        assert module.student.training


# -------------------------------------------------------------------------------- auto chunking


def test_auto_chunk_size_rule():
    assert auto_chunk_size(16, 151936, 256) == 27  # 16 * 27 * 151936 * 4 bytes <= 256 MiB < 16 * 28 * ...
    assert 16 * 27 * 151936 * 4 <= 256 * 2 ** 20 < 16 * 28 * 151936 * 4
    assert auto_chunk_size(16, 32000, 256) is None and auto_chunk_size(4096, 152064, 1) == 1


def test_auto_chunk_picks_a_chunk_for_a_big_vocab_and_matches_unchunked(tmp_path, monkeypatch):
    from lightning_ctx.models.tiny import save_tiny_checkpoint

    path = str(save_tiny_checkpoint(tmp_path / "bigv", "qwen2", seed=4, vocab_padding=32768))
    auto = OnPolicyDistillation(student=path, anchor_weight=0.5, auto_chunk_mib=1)
    plain = OnPolicyDistillation(student=path, anchor_weight=0.5, auto_chunk=False)
    assert auto.vocab_size >= 32768
    assert auto.objective.chunk_for(3) == 2 and plain.objective.chunk_for(3) is None
    small = OnPolicyDistillation(student=path, chunk_size=5)
    assert small.objective.chunk_for(3) == 5  # an explicit chunk_size wins
    seen = []
    real = objectives.token_divergence
    monkeypatch.setattr(objectives, "token_divergence",
                        lambda *a, **k: seen.append(k["chunk_size"]) or real(*a, **k))
    results = {}
    for name, module in (("auto", auto), ("plain", plain)):
        perturb(module.student)
        batch = tiny_batch(module)
        terms = module.compute_losses(batch, fixed_rollout(module, batch))
        terms["loss"].backward()
        results[name] = (terms, [p.grad.clone() for p in module.student.parameters()])
    assert seen == [2, None]
    (ta, ga), (tp, gp) = results["auto"], results["plain"]
    for key in ("opd", "anchor", "loss", "entropy"):
        torch.testing.assert_close(ta[key], tp[key], rtol=1e-5, atol=1e-7)
    assert ta["opd"] > 1e-3 and ta["anchor"] > 1e-3
    for a, b in zip(ga, gp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
