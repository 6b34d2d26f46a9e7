"""Loss terms are data: a term from outside the package is logged, normalised and checked like the built-in ones,
and OPCD's off-policy baseline (a term on the teacher's rollout) is the first such term."""

import math
import textwrap

import mlflow
import pytest
import torch

from lightning_ctx.loss import DistillationLoss, LossTerm, OffPolicyContextDistillation
from lightning_ctx.module import NonFiniteLossError, OnPolicyDistillation
from tests.helpers import fixed_rollout, perturb, tiny_batch

EXTERNAL = textwrap.dedent('''
    """A loss term written outside lightning_ctx: the mean squared logit of the student's sampled token."""
    import torch

    from lightning_ctx.loss import LossTerm


    class SquaredLogit(LossTerm):
        name, rollout = "sqlogit", "student"

        def __init__(self, weight: float = 1.0, poison: bool = False):
            super().__init__(weight)
            self.poison = poison

        def compute(self, passes):
            r = passes.rollout(self.rollout)
            logits = passes.student_logits(self.rollout)
            picked = logits.float().gather(-1, r.response_ids.unsqueeze(-1)).squeeze(-1) ** 2
            mask = r.response_mask.float()
            value = (picked * mask).sum() / mask.sum()
            return value * float("nan") if self.poison else value
''')


@pytest.fixture
def external_package(outside_package):
    return outside_package("extterms", EXTERNAL) + ".SquaredLogit"


def _logp(model, ids):
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)


def test_an_external_term_is_computed_weighted_and_normalised_like_the_built_in_ones(tiny_dirs, external_package):
    from extterms import SquaredLogit

    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], anchor_weight=0.5, extra_terms=[SquaredLogit(0.1)])
    perturb(module.student)
    assert [t.name for t in module.objective.terms] == ["opd", "anchor", "sqlogit"]
    batch = tiny_batch(module)
    rollout = fixed_rollout(module, batch)
    terms = module.compute_losses(batch, rollout)
    # the reference: per-token mean over the response tokens, from unpadded forwards
    total = n = 0.0
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            resp = rollout.response_ids[i][rollout.response_mask[i]].tolist()
            logits = module.student(input_ids=torch.tensor([prompt + resp])).logits[0].double()
            for j, tok in enumerate(resp):
                total += float(logits[len(prompt) - 1 + j, tok] ** 2)
                n += 1
    assert terms["sqlogit"].item() == pytest.approx(total / n, rel=1e-5)
    expected = terms["opd"] + 0.5 * terms["anchor"] + 0.1 * terms["sqlogit"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    # per-token sums over micro-batches: the step's logged value is the per-token mean over both
    steps = module.step_tokens
    steps.add(None, module.compute_losses(batch, rollout, local=True))
    half = {"student": rollout}
    steps.add(None, module.compute_losses(batch, half, local=True))
    logged = steps.finish(None, module.student)
    assert logged["sqlogit"] == pytest.approx(terms["sqlogit"].item(), rel=1e-5)
    assert set(logged) == {"opd", "anchor", "sqlogit", "loss", "entropy"}


def test_a_non_finite_external_term_stops_the_step_naming_it(tiny_dirs, external_package):
    from extterms import SquaredLogit

    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], extra_terms=[SquaredLogit(0.1, poison=True)],
                                  greedy_rollout=True, max_new_tokens=3)
    batch = tiny_batch(module)
    with pytest.raises(NonFiniteLossError, match="term 'sqlogit'"):
        module.training_step(batch, 0)


@pytest.mark.slow
def test_an_external_term_fits_through_the_cli_and_is_logged(tiny_dirs, external_package, mlflow_uri):
    from lightning_ctx.cli import main

    main(["fit", "--config", "builtin:world.yaml", "--model.student", tiny_dirs["qwen2"],
          "--model.extra_terms", f'[{{"class_path": "{external_package}", "init_args": {{"weight": 0.1}}}}]',
          "--trainer.max_steps", "2", "--data.batch_size", "4", "--data.task.n_val", "4",
          "--data.task.eval_other_contexts", "1", "--data.task.eval_other_items", "2",
          "--trainer.enable_progress_bar", "false", "--model.max_new_tokens", "4"])
    (run,) = mlflow.search_runs(experiment_names=["world"], output_format="list")
    m = run.data.metrics
    assert math.isfinite(m["train/sqlogit"]) and m["train/sqlogit"] > 0 and math.isfinite(m["train/opd"])


def test_offpolicy_term_is_forward_kl_on_the_teachers_samples_with_the_context(tiny_dirs):
    module = OnPolicyDistillation(student=tiny_dirs["qwen2"], opd_weight=0.0,
                                  extra_terms=[OffPolicyContextDistillation(1.0)], max_new_tokens=4)
    perturb(module.student)
    assert module.objective.rollouts == ["teacher"]
    batch = tiny_batch(module)
    torch.manual_seed(0)
    batch, rollouts = module.sample_rollouts(batch)
    assert set(rollouts) == {"teacher"}
    teacher_rollout = rollouts["teacher"]
    torch.testing.assert_close(teacher_rollout.prompt_ids, batch.ctx_prompt_ids)  # sampled with the context
    terms = module.compute_losses(batch, rollouts)
    total = n = 0.0
    with torch.no_grad():
        for i in range(len(batch)):
            prompt = batch.prompt_ids[i][batch.prompt_mask[i].bool()].tolist()
            ctx = batch.ctx_prompt_ids[i][batch.ctx_prompt_mask[i].bool()].tolist()
            resp = teacher_rollout.response_ids[i][teacher_rollout.response_mask[i]].tolist()
            s, t = _logp(module.student, prompt + resp), _logp(module.teacher, ctx + resp)
            for j in range(len(resp)):
                sj, tj = s[len(prompt) - 1 + j], t[len(ctx) - 1 + j]
                total += float((tj.exp() * (tj - sj)).sum())  # KL(teacher || student)
                n += 1
    assert n == int(teacher_rollout.response_mask.sum()) > 0
    assert terms["offpolicy"].item() == pytest.approx(total / n, rel=1e-4)
    assert "opd" not in terms and terms["loss"].item() == pytest.approx(terms["offpolicy"].item())


def test_objective_terms_and_their_checks(tiny_dirs):
    loss = DistillationLoss(vocab_size=10, anchor_weight=0.5, retain_weight=0.2)
    assert [(t.name, t.weight, t.rollout) for t in loss.terms] == [("opd", 1.0, "student"), ("anchor", 0.5, "student"),
                                                                  ("retain", 0.2, "retain")]
    assert loss.rollouts == ["student", "retain"]
    with pytest.raises(ValueError, match="share a name"):
        DistillationLoss(vocab_size=10, extra_terms=(OffPolicyContextDistillation(), OffPolicyContextDistillation())
                         ).terms
    with pytest.raises(ValueError, match="weight must be >= 0"):
        OffPolicyContextDistillation(-1.0)

    class Nameless(LossTerm):
        pass

    with pytest.raises(TypeError, match="must set a name"):
        Nameless()
    from lightning_ctx.knobs import ConfigError

    with pytest.raises(ConfigError, match="model.opd_weight"):
        OnPolicyDistillation(student=tiny_dirs["qwen2"], opd_weight=0.0)
