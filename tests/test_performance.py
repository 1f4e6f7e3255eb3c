"""Regression guards for the cost of a solver iteration, without timing: the work in
the compiled loop body of a per-sample solve against a whole-batch (joint) solve.

Work is counted in XLA's optimised HLO of `model.apply`: the elements written by
each instruction of the solver loop's body (a fusion counts once, by its output),
and the number of instructions. A per-sample solve used to be a `vmap` of the whole
loop, which selects every leaf of its carry each iteration, copies the history
buffers and scatters into them per sample: 1.78x (Anderson) and 1.57x (Broyden) the
elements of a joint solve on the cell below, and still 1.91x / 1.63x with today's
solvers. With the loop's own batching rule (`OptimistixBackend.solve`,
`per_sample`): 1.10x / 1.00x.
"""

import math
import re

import jax
import jax.numpy as jnp
import optimistix as optx
import pytest

import jaxdeq
from helpers import dense_cell

BATCH, WIDTH, MEMORY = 8, 64, 5
# Per-sample / joint work per iteration (measured: elements 1.10 Anderson, 1.00
# Broyden; instructions 1.05 both).
MAX_RATIO = 1.25
# Elements written per Anderson iteration, in units of the state (batch x width):
# its two histories alone are 2 x memory of them (measured: 27 per-sample, 24 joint;
# a vmap of the whole loop: 47).
MAX_STATES_PER_ITERATION = 40

_TRIVIAL = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?[\w.-]+ = (.+?) ([\w-]+)\(")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{\s*$")


def _computations(hlo: str) -> dict[str, list[str]]:
    computations, lines = {}, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            lines = computations[header.group(1)] = []
        elif lines is not None:
            lines.append(line)
    return computations


def _elements(shape: str) -> int:
    return sum(
        math.prod(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shape)
    )


def _work(computations, name) -> tuple[int, int]:
    """(instructions, elements written) of one run of a computation, nested
    while loops counted by their known trip count (else once)."""
    instructions = elements = 0
    for line in computations[name]:
        match = _INSTRUCTION.match(line)
        if not match or match.group(2) in _TRIVIAL:
            continue
        instructions += 1
        elements += _elements(match.group(1))
        body = re.search(r"body=%?([\w.-]+)", line)
        if match.group(2) == "while" and body:
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            inner = _work(computations, body.group(1))
            count = int(trips.group(1)) if trips else 1
            instructions += count * inner[0]
            elements += count * inner[1]
    return instructions, elements


def solver_loop_work(hlo: str) -> tuple[int, int]:
    """The work of the largest while-loop body of an HLO module: the solver's."""
    computations = _computations(hlo)
    bodies = {
        body
        for lines in computations.values()
        for line in lines
        for body in re.findall(r" while\(.*?body=%?([\w.-]+)", line)
    }
    assert bodies, "no while loop in the compiled solve"
    return max((_work(computations, body) for body in bodies), key=lambda w: w[1])


def _compiled_solve(joint: bool, solver) -> str:
    model = jaxdeq.DeepEquilibriumNetwork(
        dense_cell(WIDTH), solver, max_steps=10, joint_solve=joint
    )
    x = jnp.linspace(-1, 1, BATCH * WIDTH, dtype=jnp.float32).reshape(BATCH, WIDTH)
    ps, st = model.init(jax.random.key(0), x)
    return jax.jit(model.apply).lower(ps, st, x).compile().as_text()


SOLVERS = {
    "anderson": lambda: jaxdeq.Anderson(
        rtol=1e-4,
        atol=0.0,
        norm=optx.two_norm,
        termination="normwise",
        memory=MEMORY,
    ),
    "broyden": lambda: jaxdeq.Broyden(rtol=1e-4, atol=1e-6),
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_iteration_costs_a_joint_one(solver):
    per_sample = solver_loop_work(_compiled_solve(False, SOLVERS[solver]()))
    joint = solver_loop_work(_compiled_solve(True, SOLVERS[solver]()))
    instructions, elements = (p / j for p, j in zip(per_sample, joint, strict=True))
    assert elements <= MAX_RATIO, (per_sample, joint)
    assert instructions <= MAX_RATIO, (per_sample, joint)


def test_anderson_iteration_work_is_bounded():
    _, elements = solver_loop_work(_compiled_solve(False, SOLVERS["anderson"]()))
    assert elements <= MAX_STATES_PER_ITERATION * BATCH * WIDTH, elements


def test_counter_sees_doubled_work():
    """The counter itself: a loop body that does twice the work counts twice."""

    def run(repeats):
        def body(carry):
            i, z = carry
            for _ in range(repeats):
                z = jnp.tanh(z @ z.T @ z + 1.0)
            return i + 1, z

        fn = jax.jit(lambda z: jax.lax.while_loop(lambda c: c[0] < 3, body, (0, z))[1])
        return solver_loop_work(fn.lower(jnp.ones((4, 8))).compile().as_text())

    once, twice = run(1), run(2)
    assert twice[1] >= 1.9 * once[1], (once, twice)
