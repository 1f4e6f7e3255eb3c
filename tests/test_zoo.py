"""Defaults that work: every zoo builder and README example converges at
initialisation (>= 95 % of samples `successful`) on its example input."""

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

import jaxdeq
from jaxdeq import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def fraction_converged(solution) -> float:
    return float(jnp.mean(solution.result == jaxdeq.RESULTS.successful))


def solve_stats(model, ps, st, x, where=lambda solution: solution):
    """The DEQ's solution of one jitted `apply` (`where` finds it in a container's
    solutions)."""
    apply = jax.jit(functools.partial(model.apply, return_solution=True))
    return where(apply(ps, st, x)[2])


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return (data.images[:32] / 16.0).astype(np.float32)


def test_mdeq_image_classifier_converges_at_init(digits):
    model = jaxdeq.mdeq_image_classifier(
        image_size=8, in_channels=1, channels=(4, 8), num_groups=2
    )
    x = jnp.asarray(digits[:32, ..., None])
    with jax.enable_x64(False):
        ps, st = model.init(jax.random.key(0), x[:2])
        solution = solve_stats(model, ps, st, x, lambda solution: solution)
    assert fraction_converged(solution) >= 0.95


def test_deq_implicit_representation_converges_at_init():
    model = jaxdeq.deq_implicit_representation(width=32, num_frequencies=8)
    ys, xs = np.meshgrid(np.linspace(-1, 1, 12), np.linspace(-1, 1, 12))
    coords = jnp.asarray(np.stack([ys, xs], -1).reshape(-1, 2), jnp.float32)
    with jax.enable_x64(False):
        ps, st = model.init(jax.random.key(0), coords)
        solution = solve_stats(model, ps, st, coords, lambda solutions: solutions[2])
    assert fraction_converged(solution) >= 0.95


def test_deq_sequence_model_converges_at_init():
    from pydoc_data.topics import topics

    text = topics["assert"][:400]
    alphabet = sorted(set(text))
    ids = np.array([alphabet.index(c) for c in text], dtype=np.int32)
    tokens = jnp.asarray(ids[: 8 * 24].reshape(8, 24))
    model = jaxdeq.deq_sequence_model(len(alphabet), width=16, num_heads=2)
    with jax.enable_x64(False):
        ps, st = model.init(jax.random.key(0), tokens)
        solution = solve_stats(model, ps, st, tokens, lambda solutions: solutions[3])
    assert fraction_converged(solution) >= 0.95


def test_readme_quick_start_converges_at_init(digits):
    """The README's cells as written: the quick-start DEQ, Skip DEQ and skip-reg
    behind a Dense + relu embedding of digits (the issue's setting), the seed's
    first DEQ and multiscale examples on their own inputs."""
    text = (ROOT / "README.md").read_text()
    namespace = {}
    with jax.enable_x64(False):
        for block in re.findall(r"```python\n(.*?)```", text, flags=re.S)[:3]:
            exec(compile(block, "README.md", "exec"), namespace)
        assert fraction_converged(namespace["sol"]) >= 0.95
        assert fraction_converged(namespace["ms_sol"]) >= 0.95  # multiscale
        embed = nn.Dense(64, 64, activation=jax.nn.relu)
        x = jnp.asarray(digits.reshape(len(digits), 64))
        embed_ps, _ = embed.init(jax.random.key(1), x)
        h = embed.apply(embed_ps, {}, x)[0]
        for name in ("deq", "skip", "skip_reg"):
            model = namespace[name]
            ps, st = model.init(jax.random.key(0), h[:2])
            assert fraction_converged(solve_stats(model, ps, st, h)) >= 0.95, name


def test_builders_take_an_empty_batch():
    mdeq = jaxdeq.mdeq_image_classifier(
        image_size=8, in_channels=1, channels=(4, 8), num_groups=2
    )
    inr = jaxdeq.deq_implicit_representation(width=32, num_frequencies=4)
    with jax.enable_x64(False):
        for model, x, out in (
            (mdeq, jnp.ones((2, 8, 8, 1)), (0, 10)),
            (inr, jnp.zeros((5, 2)), (0, 3)),
        ):
            ps, st = model.init(jax.random.key(0), x)
            assert model.apply(ps, st, jnp.zeros((0, *x.shape[1:])))[0].shape == out
