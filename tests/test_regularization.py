"""Regularizers and diagnostics: spectral radius, fixed-point correction over
sampled states, skip loss."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import jaxdeq
from helpers import dense_cell
from jaxdeq import nn


def test_spectral_radius_of_non_symmetric_matrices(getkey):
    # Real dominant eigenvalue of a non-normal matrix: eigenvalues -0.8, 0.5, 0.3.
    upper = jnp.array([[0.5, 2.0, -1.0], [0.0, -0.8, 3.0], [0.0, 0.0, 0.3]])
    rho = jaxdeq.spectral_radius(lambda z: upper @ z, jnp.ones(3), getkey(), 200)
    assert abs(float(rho) - 0.8) < 1e-3
    # A dominant complex pair, 0.9 exp(+-i 0.7), beside an eigenvalue 0.5.
    c, s = 0.9 * np.cos(0.7), 0.9 * np.sin(0.7)
    basis = jax.random.normal(getkey(), (3, 3), jnp.float64)
    blocks = jnp.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 0.5]])
    rotating = basis @ blocks @ jnp.linalg.inv(basis)
    assert np.allclose(np.max(np.abs(np.linalg.eigvals(rotating))), 0.9)
    rho = jaxdeq.spectral_radius(lambda z: rotating @ z, jnp.ones(3), getkey(), 400)
    assert abs(float(rho) - 0.9) < 0.01


def test_spectral_radius_per_sample_and_of_a_cell(getkey):
    scales = jnp.array([0.2, 0.6])
    z = jnp.ones((2, 4))
    rho = jaxdeq.spectral_radius(
        lambda z: scales[:, None] * z, z, getkey(), 20, per_sample=True
    )
    assert rho.shape == (2,) and np.allclose(rho, scales)
    # tanh(W z + ...) at z* has J = diag(1 - z*^2) W.
    cell = dense_cell(4, 0.5)
    x = jax.random.normal(getkey(), (1, 4), jnp.float64)
    ps, st = cell.init(getkey(), (x, x))
    f = lambda z: cell.apply(ps, st, (z, x))[0]  # noqa: E731
    jac = jax.jacobian(lambda v: f(v[None])[0])(x[0])
    expected = np.max(np.abs(np.linalg.eigvals(jac)))
    assert abs(float(jaxdeq.spectral_radius(f, x, getkey(), 300)) - expected) < 1e-3


@pytest.mark.parametrize(
    "weighting,weights",
    [
        ("exp", [0.5**2, 0.5, 1.0]),
        ("linear", [1 - 2 / 3 * 0.5, 1 - 1 / 3 * 0.5, 1.0]),
        ("constant", [1.0, 1.0, 1.0]),
    ],
)
def test_fixed_point_correction_weights(weighting, weights):
    states = {"a": jnp.arange(3.0)[:, None] * jnp.ones((3, 2)), "b": jnp.ones((3, 1))}
    loss = jaxdeq.fixed_point_correction_loss(
        lambda z: jnp.sum(z["a"]) + jnp.sum(z["b"]), states, 0.5, weighting=weighting
    )
    assert np.isclose(loss, sum(w * (2 * k + 1) for k, w in enumerate(weights)))
    with pytest.raises(ValueError, match="weighting"):
        jaxdeq.fixed_point_correction_loss(jnp.sum, states, weighting="cubic")


@pytest.mark.parametrize("joint", [False, True], ids=["per_sample", "joint"])
def test_sampled_states_are_solver_iterates_with_one_step_gradients(joint, getkey):
    cell = dense_cell(3, 0.6)
    x = jax.random.normal(getkey(), (2, 3), jnp.float64)
    model = jaxdeq.DeepEquilibriumNetwork(
        cell,
        optx.FixedPointIteration(rtol=1e-30, atol=1e-30),  # runs all max_steps
        max_steps=8,
        sample_states=4,
        joint_solve=joint,
    )
    ps, st = model.init(getkey(), x)
    _, new_st, new_st_solution = jax.jit(
        functools.partial(model.apply, return_solution=True)
    )(ps, st, x)
    states = new_st_solution.states
    assert states.shape == (4, 2, 3)
    f = lambda ps, z: cell.apply(ps, st["model"], (z, x))[0]  # noqa: E731
    z, iterates = jnp.zeros_like(x), []
    for _ in range(8):
        z = f(ps["model"], z)
        iterates.append(z)
    assert np.allclose(states, jnp.stack(iterates[1::2]), atol=1e-12)

    def correction(ps):
        _, new_st, new_st_solution = model.apply(ps, st, x, return_solution=True)
        return jaxdeq.fixed_point_correction_loss(
            lambda z: jnp.sum(jnp.sin(z)), new_st_solution.states, 0.8
        )

    def one_step(ps):
        # The value of the sampled state, the gradient of one cell application.
        total = 0.0
        for k in range(4):
            step = f(ps["model"], states[k])
            state = states[k] + step - jax.lax.stop_gradient(step)
            total = total + 0.8 ** (3 - k) * jnp.sum(jnp.sin(state))
        return total

    got, want = jax.grad(correction)(ps), jax.grad(one_step)(ps)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sampled_states_after_early_stop_repeat_the_last_iterate(getkey):
    x = jax.random.normal(getkey(), (2, 3), jnp.float64)
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(3, 0.3),
        optx.FixedPointIteration(rtol=1e-10, atol=1e-10),
        max_steps=60,
        sample_states=3,
    )
    ps, st = model.init(getkey(), x)
    z, st, st_solution = model.apply(ps, st, x, return_solution=True)
    assert int(st_solution.nfe.max()) < 40
    assert np.allclose(st_solution.states[-1], z, atol=1e-9)
    with pytest.raises(ValueError, match="sample_states"):
        jaxdeq.DeepEquilibriumNetwork(dense_cell(3), diffrax.Tsit5(), sample_states=2)
    with pytest.raises(ValueError, match="sample_states"):
        jaxdeq.DeepEquilibriumNetwork(
            dense_cell(3), optx.Newton(rtol=1e-3, atol=1e-3), sample_states=50
        )


def test_skip_loss_is_the_mean_gap_and_trains_the_init(getkey):
    x = jax.random.normal(getkey(), (2, 3), jnp.float64)
    model = jaxdeq.SkipDeepEquilibriumNetwork(
        dense_cell(3, 0.5), nn.Dense(3, 3), optx.FixedPointIteration(1e-10, 1e-10)
    )
    ps, st = model.init(getkey(), x)
    _, new_st, new_st_solution = model.apply(ps, st, x, return_solution=True)
    sol = new_st_solution
    assert np.isclose(jaxdeq.skip_loss(sol), jnp.mean(jnp.abs(sol.z_star - sol.u0)))
    grads = jax.grad(
        lambda ps: jaxdeq.skip_loss(model.apply(ps, st, x, return_solution=True)[2])
    )(ps)
    assert float(jnp.abs(grads["init"]["kernel"]).max()) > 0
