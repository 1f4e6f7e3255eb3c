"""A per-sample fallback solver: a solve that fails is continued by a second solver.

`FallbackBackend` runs the primary solver; each sample (or, in a joint solve, the
batch) whose solve did not succeed (it diverged, went non-finite or ran out of
steps) is continued by the fallback solver from the primary's returned state (its
lowest-residual iterate), inside the same compiled solve. Samples that succeeded
run zero fallback steps and keep the primary's result bit for bit.
"""

from typing import ClassVar

import jax.numpy as jnp
import jax.tree_util as jtu

from ._backend import AbstractBackend, Forward, OptimistixBackend
from ._misc import tree_where
from ._solution import RESULTS


class FallbackBackend(AbstractBackend):
    """`primary`, then `fallback` for the samples `primary` did not solve. Each gets
    the step budget (`max_steps`, or the per-call one): at most twice as many steps
    in all."""

    primary: OptimistixBackend
    fallback: OptimistixBackend

    traced_budget: ClassVar[bool] = True
    residual_trace: ClassVar[bool] = True
    sampled_iterates: ClassVar[bool] = False
    neural_ode: ClassVar[bool] = False
    anytime_budgets: ClassVar[bool] = False
    fallback_solvers: ClassVar[bool] = False

    def solve(
        self,
        f,
        z0,
        args,
        budget,
        loop,
        *,
        max_steps,
        batched,
        trace,
        samples,
        solver_state=False,
        anytime=(),
        per_sample=False,
    ) -> Forward:
        del samples, solver_state, anytime  # (rejected by the model's config)
        settings = dict(
            max_steps=max_steps,
            batched=batched,
            trace=trace,
            samples=0,
            per_sample=per_sample,
        )
        first = self.primary.solve(f, z0, args, budget, loop, **settings)
        failed = first.result != RESULTS.successful
        # (per sample, or one flag for a joint solve: its outcome is the batch's)
        need = failed if not batched else jnp.any(failed)
        limit = jnp.minimum(max_steps if budget is None else budget, max_steps)
        second = self.fallback.solve(
            f, first.z, args, jnp.where(need, limit, 0), loop, **settings
        )
        need_b = jnp.broadcast_to(need, jnp.shape(first.result))
        residual_trace = None
        if trace:
            # The primary's iterations, then the fallback's (`inf` where it did
            # not run).
            second_trace = jnp.where(
                need if not batched else need_b[..., None],
                second.trace,
                jnp.inf,
            )
            residual_trace = jnp.concatenate([first.trace, second_trace], axis=-1)
        return Forward(
            z=tree_where(need, second.z, first.z, batched=False),
            nfe=first.nfe + jnp.where(need_b, second.nfe, 0),
            result=jnp.where(need_b, second.result, first.result),
            trace=residual_trace,
            original=jtu.tree_map(
                lambda a, b: jnp.where(need, b, a), first.original, second.original
            ),
            steps=first.steps + jnp.where(need_b, second.steps, 0),
            best_step=first.best_step,
            fallback=need_b,
        )
