"""The loop's eval: held-out loss on packed batches of the training distribution, and greedy task
accuracy — the model continues held-out prompts and the task's verifier judges each completion.

Held-out problems come from their own stream (`heldout_seed`), never the training one. A small
task (2-digit arithmetic has 20k distinct problems) will repeat some training problems by chance,
as a natural-language benchmark does with a web corpus; accuracy still measures the skill.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from moe_jax.data.pipelines import left_padded_prompts, packed_batches, problem_at, prompt_ids, task_examples
from moe_jax.data.tasks import Problem, Task
from moe_jax.data.tokenizer import Tokenizer
from moe_jax.models import router
from moe_jax.models.sampler import SamplingConfig, jit_generate
from moe_jax.parallel.distributed import all_rows, global_batch_array
from moe_jax.parallel.rules import parse_rules, use_mesh
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.step import ROUTER_LOAD

HELDOUT_SEED_OFFSET = 1_000_003  # the held-out stream of seed s is the stream of s + this


def heldout_seed(seed: int) -> int:
    return seed + HELDOUT_SEED_OFFSET


def completion_text(tokenizer: Tokenizer, ids: np.ndarray) -> str:
    """The text of generated ids up to (not including) the first eos."""
    ids = list(map(int, ids))
    if tokenizer.eos_id in ids:
        ids = ids[:ids.index(tokenizer.eos_id)]
    return tokenizer.decode(ids, skip_special=True)


class Evaluator:
    """`evaluator(model) -> {"eval/loss", "eval/accuracy", "eval/format", ...}`: greedy completions
    of `loop.eval_problems` held-out prompts, judged by the task's verifier; with an `eval_step`,
    also the mean loss terms on `corpus.eval_batches` held-out batches of a language-model run's
    corpus."""

    def __init__(self, cfg: RunConfig, task: Task, tokenizer: Tokenizer, mesh: Mesh,
                 eval_step: Callable[[nnx.State, dict], dict] | None = None):
        self.task, self.tokenizer, self.eval_step, self.mesh = task, tokenizer, eval_step, mesh
        self.sampling = SamplingConfig(temperature=0.0, max_new_tokens=cfg.loop.eval_max_new_tokens)
        seed = heldout_seed(cfg.seed)
        self.problems = [problem_at(task, seed, i) for i in range(cfg.loop.eval_problems)]
        self.prompts = left_padded_prompts([prompt_ids(task, tokenizer, p, cfg.template) for p in self.problems],
                                           tokenizer.pad_id)
        self.batches = []
        if eval_step is not None:
            examples = task_examples(task, tokenizer, seed=seed, error_rate=cfg.corpus.error_rate,
                                     template=cfg.template, loss_on_prompt=cfg.corpus.loss_on_prompt)
            stream = iter(packed_batches(examples, seq_len=cfg.seq_len, batch_size=cfg.batch_size // jax.process_count(),
                                         seed=seed, shuffle=False))
            self.batches = [next(stream) for _ in range(cfg.corpus.eval_batches)]
        self.rules = parse_rules(cfg.sharding_rules)

    def loss(self, model_state: nnx.State) -> dict[str, float]:
        """Mean held-out loss terms over the eval batches (none when `eval_batches` is 0); a
        per-layer term (an MoE's `maxvio`, `drop_frac`) as `<name>_mean`, its mean over layers
        too, like the train metrics; and an MoE's balance over the whole set, `maxvio_global`."""
        totals: dict[str, float] = {}
        load_LxE = None
        for batch in self.batches:
            metrics = self.eval_step(model_state, {k: global_batch_array(v, self.mesh) for k, v in batch.items()})
            load = metrics.pop(ROUTER_LOAD, None)
            if load is not None:
                load_LxE = np.asarray(load, np.float64) + (0.0 if load_LxE is None else load_LxE)
            for name, value in metrics.items():
                value = np.asarray(value)
                key = name if value.ndim == 0 else f"{name}_mean"
                totals[key] = totals.get(key, 0.0) + float(value.mean()) / len(self.batches)
        if load_LxE is not None:
            totals["maxvio_global"] = maxvio_global(load_LxE)
        return {f"eval/{name}": value for name, value in totals.items()}

    def completions(self, model: nnx.Module) -> list[str]:
        """Greedy completions of the held-out prompts."""
        with use_mesh(self.mesh, self.rules):
            out = jit_generate(model, *self.prompts, eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                               **self.sampling.generate_kwargs())
        tokens_BxN = np.asarray(all_rows(out["tokens"]))
        return [completion_text(self.tokenizer, row) for row in tokens_BxN]

    def __call__(self, model: nnx.Module) -> dict[str, float]:
        texts = self.completions(model)
        return {**self.loss(nnx.state(model)), **{f"eval/{name}": value for name, value in
                                                   judge(self.task, self.problems, texts).items()}}


def maxvio_global(load_LxE: np.ndarray) -> float:
    """MaxVio_global of Wang et al. 2024 (§4.1): `(max_i Load_i − mean Load) / mean Load` of the
    tokens each expert received over a whole held-out set (`load_LxE`, summed over its batches),
    not batch by batch; averaged over the MoE layers. Batch-level MaxVio hides an expert that is
    busy in every batch, and shows imbalance that averages out over the set."""
    return float(np.mean([router.max_violation(jnp.asarray(load_E)) for load_E in load_LxE]))


def judge(task: Task, problems: list[Problem], texts: list[str]) -> dict[str, float]:
    """Greedy-eval measures of completions: `accuracy` and `format` (and `accuracy/<task>` for
    each task of a mixture; `language` — R1's consistency — and `language_mixed`, the share
    mixing two languages, when the task is posed in several languages)."""
    correct = np.asarray([task.verify(p, text) for p, text in zip(problems, texts, strict=True)], np.float64)
    measures = {"accuracy": float(correct.mean()),
                "format": float(np.mean([task.parse(p, text).format_ok for p, text in zip(problems, texts)]))}
    names = [p.task for p in problems]
    if len(set(names)) > 1:
        measures.update({f"accuracy/{name}": float(correct[np.asarray(names) == name].mean()) for name in set(names)})
    if len(task.languages) > 1:
        measures["language"] = float(np.mean([task.language_consistency(p, t) for p, t in zip(problems, texts)]))
        measures["language_mixed"] = float(np.mean([task.mixes_languages(p, t) for p, t in zip(problems, texts)]))
    return measures
