"""Layer initialisers as one compiled program with few random hashes.

A model's `init` runs the initialisers of all its layers: a few random draws per
layer (flax folds the key with the parameter's name, then draws bits for a truncated
normal), each on its own small shape. Eagerly, every op compiles for every shape;
under one `jax.jit`, XLA:CPU still compiles one threefry hash (a while loop of
several kernels) per draw, about 0.1 s each, so a 16-layer multiscale model spends
seconds compiling its initialisers.

`init_program(fn, *args)` traces `fn` once to a jaxpr and evaluates that jaxpr under
one `jax.jit`, but schedules its random operations level by level: every
`random_fold_in`, `random_split` and `random_bits` whose inputs are ready is
computed by one shared threefry hash over the concatenated counters of all of them
(the hash is elementwise in its counters, so every draw gets exactly the bits it
would have got alone). The number of hashes is the depth of the key derivation
(about 4-6: split, fold-ins, bits), whatever the number of layers.

The values are bit-for-bit those of `jax.jit(fn)(*args)`: the batched path covers
scalar threefry keys (JAX's default) with `jax_threefry_partitionable` (JAX's default
since 0.5); any other random operation (another PRNG implementation, key arrays,
the non-partitionable layout) is evaluated as it is, and a jaxpr with side effects
runs as `jax.jit(fn)`.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

_RANDOM = ("random_fold_in", "random_split", "random_bits")
# Call primitives whose body is inlined, so that draws inside them are batched too.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr"}


def init_program(fn: Callable, *args: Any) -> Any:
    """`fn(*args)`, compiled as one program whose random draws share few hashes."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(args)):
        # Inside a transformation (`jax.jit`, `jax.vmap`, `jax.eval_shape` of
        # `init`): the outputs can't be sliced on the host; the enclosing program
        # compiles the initialisers as one anyway.
        return fn(*args)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    if closed.effects:
        return jax.jit(fn)(*args)
    program, layout = _program(closed)
    plain, buffers = jax.jit(program)(*jtu.tree_leaves(args))
    host = [np.asarray(buffer) for buffer in buffers]
    outs = [
        value
        if where is None
        # (device_put: jnp.asarray would compile a copy per shape)
        else jax.device_put(
            host[where[0]][where[1] : where[1] + where[2]].reshape(where[3])
        )
        for value, where in zip(plain, layout, strict=True)
    ]
    return jtu.tree_unflatten(jtu.tree_structure(out_shape), outs)


def program_jaxpr(fn: Callable, *args: Any):
    """The jaxpr of the program `init_program(fn, *args)` compiles (for tests)."""
    closed = jax.make_jaxpr(fn)(*args)
    return jax.make_jaxpr(_program(closed)[0])(*jtu.tree_leaves(args))


def _program(closed) -> tuple[Callable, list]:
    """The program, flat arguments -> `(outputs, buffers)`, and the layout it fills
    in when traced: `None` for an output returned as it is, `(buffer, start, size,
    shape)` for one that is part of a batch's buffer. (Sliced inside the program,
    XLA would fuse the batch's whole chain into each slice: one kernel per output
    again.)"""
    layout = []

    def program(*flat):
        outs = evaluate(closed, flat, materialize=False)
        buffers, plain = {}, []
        layout.clear()
        for out in outs:
            if isinstance(out, _Segment):
                index = buffers.setdefault(id(out.buffer), (len(buffers), out.buffer))[
                    0
                ]
                layout.append((index, out.start, out.size, out.shape))
                plain.append(None)
            else:
                layout.append(None)
                plain.append(out)
        return plain, [buffer for _, buffer in buffers.values()]

    return program, layout


# Elementwise primitives (operands of the output's shape, or scalars): ready ones of
# the same kind run as one operation on their concatenated operands, so that the
# per-layer chains of an initialiser (bits -> uniform -> erf_inv -> clip -> scale)
# compile once, not once per layer.
_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp cos cosh div
    eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma
    digamma log log1p logistic lt max min mul ne neg nextafter not or pow real rem
    round rsqrt select_n shift_left shift_right_arithmetic shift_right_logical sign
    sin sinh sqrt square stop_gradient sub tan tanh xor convert_element_type
    bitcast_convert_type""".split()
)


class _Node:
    __slots__ = ("eqn", "group", "inputs", "outputs")

    def __init__(self, eqn, inputs, outputs):
        self.eqn = eqn
        self.inputs = inputs  # ids of values (ints) or ("literal", value)
        self.outputs = outputs
        self.group = _group(eqn)  # None: run as soon as ready


def _group(eqn):
    """The batch this equation can join (`"random"`, or an elementwise kind), or
    None."""
    if _batchable_draw(eqn):
        return "random"
    name = eqn.primitive.name
    if name not in _ELEMENTWISE or len(eqn.outvars) != 1:
        return None
    out = eqn.outvars[0].aval
    if not hasattr(out, "shape") or not all(
        hasattr(v.aval, "shape") and _broadcasts(v.aval.shape, out.shape)
        for v in eqn.invars
    ):
        return None
    if getattr(out, "sharding", None) is not None and not out.sharding.mesh.empty:
        return None
    try:
        params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
    except TypeError:  # pragma: no cover - unorderable parameter names
        return None
    dtypes = tuple((str(v.aval.dtype), v.aval.weak_type) for v in eqn.invars)
    return (name, params, dtypes, str(out.dtype), out.weak_type)


def _broadcasts(shape, target) -> bool:
    """`shape` is `()` or `target` with some axes of size 1."""
    if shape == () or shape == target:
        return True
    return len(shape) == len(target) and all(
        a in (1, b) for a, b in zip(shape, target, strict=True)
    )


def _batchable_draw(eqn) -> bool:
    """A random operation the shared hash computes exactly: scalar threefry keys,
    fold-ins with a scalar uint32, partitionable bits and splits."""
    name = eqn.primitive.name
    if name not in _RANDOM:
        return False
    key = eqn.invars[0].aval
    impl = getattr(key.dtype, "_impl", None)
    if key.shape != () or impl is None or impl.name != "threefry2x32":
        return False
    if name == "random_fold_in":
        msg = eqn.invars[1].aval
        return msg.shape == () and msg.dtype == np.uint32
    return bool(jax.config.jax_threefry_partitionable)


def _flatten(jaxpr, consts, inputs, nodes, counter) -> list:
    """Append `jaxpr`'s equations to `nodes` with call primitives inlined; returns
    the ids (or literals) of its outputs."""
    env = {}

    def read(var):
        if isinstance(var, jex.core.Literal):
            return ("literal", var.val)
        return env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = ("literal", value)
    for var, value in zip(jaxpr.invars, inputs, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        param = _CALLS.get(eqn.primitive.name)
        if param is not None and param in eqn.params:
            sub = eqn.params[param]
            outs = _flatten(sub.jaxpr, sub.consts, ins, nodes, counter)
        else:
            outs = []
            for _ in eqn.outvars:
                counter[0] += 1
                outs.append(counter[0])
            nodes.append(_Node(eqn, ins, outs))
        for var, value in zip(eqn.outvars, outs, strict=True):
            if not isinstance(var, jex.core.DropVar):
                env[var] = value
    return [read(v) for v in jaxpr.outvars]


class _Segment:
    """A value stored as `buffer[start:start + size].reshape(shape)` of a flat
    buffer shared with the other equations of its batch (kept as a view, so that the
    next batch over the same equations reuses the buffer as it is)."""

    __slots__ = ("buffer", "shape", "size", "start")

    def __init__(self, buffer, start, size, shape):
        self.buffer, self.start, self.size, self.shape = buffer, start, size, shape


class _KeyRow:
    """A scalar PRNG key stored as row `row` of an `(n, 2)` buffer of key data (the
    keys of one batch of fold-ins), so that the next batch gathers its keys at once."""

    __slots__ = ("buffer", "impl", "row")

    def __init__(self, buffer, row, impl):
        self.buffer, self.row, self.impl = buffer, row, impl


class _Values:
    """Values by id: arrays, or `_Segment`s materialised on first plain use."""

    def __init__(self, ids, arrays):
        self.store = dict(zip(ids, arrays, strict=True))

    def ready(self, node) -> bool:
        return all(isinstance(ref, tuple) or ref in self.store for ref in node.inputs)

    def read(self, ref):
        if isinstance(ref, tuple):
            return ref[1]
        value = self.store[ref]
        if isinstance(value, _Segment):
            buffer = value.buffer
            value = buffer[value.start : value.start + value.size].reshape(value.shape)
            self.store[ref] = value
        elif isinstance(value, _KeyRow):
            value = jax.random.wrap_key_data(value.buffer[value.row], impl=value.impl)
            self.store[ref] = value
        return value

    def key_data(self, refs, sizes):
        """The data of the scalar keys `refs`, `refs[i]`'s repeated `sizes[i]` times:
        one gather when they are rows of one buffer."""
        rows = [self.store.get(ref) for ref in refs]
        index = np.repeat(np.arange(len(refs), dtype=np.int32), sizes)
        if all(isinstance(row, _KeyRow) for row in rows) and all(
            row.buffer is rows[0].buffer for row in rows
        ):
            return rows[0].buffer[np.array([row.row for row in rows])[index]]
        data = jnp.stack([jax.random.key_data(self.read(ref)) for ref in refs])
        if len(refs) == 1:
            return jnp.broadcast_to(data[0], (sizes[0], 2))
        return data[index]

    def flat_operand(self, refs, vars_, sizes, shapes):
        """The operands `refs` of a batch, flattened and concatenated: the shared
        buffer itself (or a slice of it) when they are its consecutive segments."""
        segments = [None if isinstance(ref, tuple) else self.store[ref] for ref in refs]
        if all(isinstance(seg, _Segment) for seg in segments):
            buffer = segments[0].buffer
            position = segments[0].start
            contiguous = True
            for seg, size in zip(segments, sizes, strict=True):
                if (
                    seg.buffer is not buffer
                    or seg.start != position
                    or seg.size != size
                ):
                    contiguous = False
                    break
                position += size
            if contiguous:
                start = segments[0].start
                if start == 0 and position == buffer.shape[0]:
                    return buffer
                return buffer[start:position]
        if all(var.aval.shape == () for var in vars_):
            return _spread([self.read(ref) for ref in refs], sizes)
        parts = []
        for ref, var, shape in zip(refs, vars_, shapes, strict=True):
            value = self.read(ref)
            if var.aval.shape == shape:
                parts.append(jnp.reshape(value, (-1,)))
            else:
                parts.append(jnp.reshape(jnp.broadcast_to(value, shape), (-1,)))
        return jax.lax.concatenate(parts, 0)

    def write_batch(self, nodes, buffer, sizes, shapes):
        start = 0
        for node, size, shape in zip(nodes, sizes, shapes, strict=True):
            self.store[node.outputs[0]] = _Segment(buffer, start, size, shape)
            start += size


def evaluate(closed, flat_args, materialize: bool = True) -> list:
    """Evaluate the closed jaxpr `closed` on `flat_args` with its random draws and
    its elementwise operations batched level by level (see the module docstring).
    With `materialize=False`, outputs that are parts of a batch come back as
    `_Segment`s."""
    nodes, counter = [], [0]
    in_ids = []
    for _ in closed.jaxpr.invars:
        counter[0] += 1
        in_ids.append(counter[0])
    out_refs = _flatten(closed.jaxpr, closed.consts, in_ids, nodes, counter)
    values = _Values(in_ids, flat_args)

    # Only what the outputs need (flax's init also runs the layer's forward pass).
    needed = {ref for ref in out_refs if not isinstance(ref, tuple)}
    live = []
    for node in reversed(nodes):
        if any(out in needed for out in node.outputs):
            live.append(node)
            needed.update(ref for ref in node.inputs if not isinstance(ref, tuple))
    live.reverse()
    # Equations on constants only stay alone: XLA folds them at compile time (with
    # its own evaluator, whose last bits may differ from the compiled kernels').
    constant = set()
    for node in live:
        if all(isinstance(ref, tuple) or ref in constant for ref in node.inputs):
            constant.update(node.outputs)
            node.group = None

    pending = live
    while pending:
        # Everything that batches with nothing, in order, as far as it can go (one
        # pass: the nodes are in topological order).
        waiting = []
        for node in pending:
            if node.group is None and values.ready(node):
                _run(node, [values.read(ref) for ref in node.inputs], values.store)
            else:
                waiting.append(node)
        pending = waiting
        # Then every ready batchable equation, one operation per kind.
        groups = {}
        for node in pending:
            if node.group is not None and values.ready(node):
                groups.setdefault(node.group, []).append(node)
        draws = groups.get("random", [])
        if any(n.eqn.primitive.name != "random_bits" for n in draws) and any(
            n.eqn.primitive.name == "random_bits" for n in draws
        ):
            # Bits wait for the keys still being derived (fold-ins, splits), so that
            # every layer's bits (and the chains on them) come in one batch.
            groups["random"] = [
                n for n in draws if n.eqn.primitive.name != "random_bits"
            ]
        if not groups and pending:  # pragma: no cover - a cycle cannot happen
            raise RuntimeError("init_program: unschedulable jaxpr")
        for group, members in groups.items():
            if group == "random":
                _draw_all(members, values)
            else:
                _run_elementwise(members, values)
        done = {id(node) for members in groups.values() for node in members}
        pending = [node for node in pending if id(node) not in done]
    if materialize:
        return [values.read(ref) for ref in out_refs]
    return [
        values.store[ref]
        if not isinstance(ref, tuple) and isinstance(values.store[ref], _Segment)
        else values.read(ref)
        for ref in out_refs
    ]


def _bind(eqn, operands):
    bound = eqn.primitive.get_bind_params(eqn.params)
    # (older JAX: `(subfuns, params)`; newer: `params`)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
        return eqn.primitive.bind(*subfuns, *operands, **params)


def _run(node, invals, store) -> None:
    outs = _bind(node.eqn, invals)
    if not node.eqn.primitive.multiple_results:
        outs = [outs]
    store.update(zip(node.outputs, outs, strict=True))


def _run_elementwise(nodes, values) -> None:
    """Equations of one elementwise kind as one operation on their concatenated,
    flattened operands (smaller operands broadcast to their equation's shape)."""
    if len(nodes) == 1:
        (node,) = nodes
        _run(node, [values.read(ref) for ref in node.inputs], values.store)
        return
    shapes = [node.eqn.outvars[0].aval.shape for node in nodes]
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    operands = [
        values.flat_operand(
            [node.inputs[i] for node in nodes],
            [node.eqn.invars[i] for node in nodes],
            sizes,
            shapes,
        )
        for i in range(len(nodes[0].inputs))
    ]
    values.write_batch(nodes, _bind(nodes[0].eqn, operands), sizes, shapes)


_DRAW_ORDER = {"random_bits": 0, "random_split": 1, "random_fold_in": 2}


def _spread(values, sizes):
    """`values[i]` repeated `sizes[i]` times, concatenated: one gather with constant
    indices (not one broadcast per value)."""
    if len(values) == 1:
        return jnp.broadcast_to(values[0], (sizes[0],))
    index = np.repeat(np.arange(len(values), dtype=np.int32), sizes)
    return jnp.stack(values)[index]


def _draw_all(draws, values) -> None:
    """Every draw in `draws` through one threefry hash (bits first, consecutive, so
    that the next batch reads them as one slice). The hash's counters are JAX's:
    for bits and splits the flat index of each entry as (high, low) words, for a
    fold-in with `m` the seed words of `m`, `(m >> 32, m) = (0, m)`."""
    draws = sorted(draws, key=lambda node: _DRAW_ORDER[node.eqn.primitive.name])
    sizes, counts, msgs = [], [], []
    for node in draws:
        if node.eqn.primitive.name == "random_fold_in":
            msgs.append(values.read(node.inputs[1]))
            sizes.append(1)
        else:
            size = int(np.prod(node.eqn.params["shape"], dtype=np.int64))
            if size >= 2**32:  # pragma: no cover - a parameter of 2**32 entries
                raise ValueError("init_program: a random draw of 2**32 entries")
            counts.append(np.arange(size, dtype=np.uint32))
            sizes.append(size)
    keys = values.key_data([node.inputs[0] for node in draws], sizes)
    low = np.concatenate(counts) if counts else np.zeros((0,), np.uint32)
    if msgs:
        low = jnp.concatenate([low, jnp.stack(msgs).astype(jnp.uint32)])
    total = sum(sizes)
    bits1, bits2 = _threefry2x32(
        keys[:, 0], keys[:, 1], jnp.zeros((total,), jnp.uint32), jnp.asarray(low)
    )
    # The fold-ins' new keys: the two halves of their (last) part of the hash.
    folded = total - len(msgs)
    fold_keys = jnp.stack([bits1[folded:], bits2[folded:]], axis=-1) if msgs else None
    # Random bits as JAX's threefry makes them from the two halves of the hash: one
    # buffer per bit width, shared by the draws of that width.
    buffers = {}
    start = 0
    for node, size in zip(draws, sizes, strict=True):
        name = node.eqn.primitive.name
        if name == "random_bits":
            width = node.eqn.params["bit_width"]
            if width not in buffers:
                buffers[width] = _bits(width, bits1, bits2)
            values.store[node.outputs[0]] = _Segment(
                buffers[width], start, size, tuple(node.eqn.params["shape"])
            )
        elif name == "random_fold_in":
            impl = node.eqn.invars[0].aval.dtype._impl
            values.store[node.outputs[0]] = _KeyRow(fold_keys, start - folded, impl)
        else:
            b1, b2 = bits1[start : start + size], bits2[start : start + size]
            impl = node.eqn.invars[0].aval.dtype._impl
            shape = tuple(node.eqn.params["shape"])
            data = jnp.stack([b1, b2], axis=-1).reshape((*shape, 2))
            values.store[node.outputs[0]] = jax.random.wrap_key_data(data, impl=impl)
        start += size


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """The Threefry-2x32 hash (Salmon et al., 2011; 20 rounds), as JAX's
    `threefry2x32` primitive computes it, written out: XLA:CPU compiles the
    primitive as a loop of several kernels, this as one fused kernel, several times
    faster to compile (`tests/test_init_program.py` checks the bits against JAX's)."""

    def rotate_left(v, d):
        return (v << np.uint32(d)) | (v >> np.uint32(32 - d))

    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = rotate_left(x2, r) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def _bits(width, b1, b2):
    dtype = jnp.dtype(f"uint{width}")
    if width == 64:
        return (b1.astype(dtype) << dtype.type(32)) | b2.astype(dtype)
    if width == 32:
        return b1 ^ b2
    return (b1 ^ b2).astype(dtype)
