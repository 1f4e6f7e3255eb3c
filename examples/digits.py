"""Train a deep equilibrium classifier on scikit-learn's handwritten digits.

The main job of `make demo`: a real DEQ on a real data set (1797 8x8 digit images
shipped with scikit-learn; no download). The network is

    x -> Dense(64 -> 128, relu) -> DEQ[ z* = tanh(W z* + x) ] -> Dense(128 -> 10)

with the fixed point found per sample by Anderson acceleration and differentiated
implicitly, plus Jacobian regularization to keep the cell contractive (and nfe low);
Adam with gradient clipping and a cosine learning-rate decay.
Per epoch it prints train/test accuracy, mean solver steps (nfe), mean relative
residual and wall time, and at the end saves a PNG of accuracy and nfe over training.

    python examples/digits.py --epochs 20 --out outputs/demo
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxdeq
from jaxdeq import nn


def make_model(width: int = 128, max_steps: int = 30):
    # W ~ N(0, (0.5 / sqrt(width))^2): spectral radius about 0.5, a contraction at init
    small = jax.nn.initializers.normal(0.5 / np.sqrt(width))
    cell = nn.Chain(
        nn.Parallel(
            jnp.add,
            nn.Dense(width, width, use_bias=False, kernel_init=small),
            nn.NoOpLayer(),
        ),
        nn.WrappedFunction(jnp.tanh),
    )
    deq = jaxdeq.DeepEquilibriumNetwork(
        cell,
        # stop when ||f(z) - z|| <= 1e-4 ||f(z)|| per sample, as DEQ practice does
        jaxdeq.Anderson(
            rtol=1e-4, atol=1e-6, norm=optx.two_norm, termination="normwise"
        ),
        jacobian_regularization="forward",
        max_steps=max_steps,
    )
    return nn.Chain(
        nn.Dense(64, width, activation=jax.nn.relu), deq, nn.Dense(width, 10)
    )


def load_data(seed: int = 0):
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--jac-weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=pathlib.Path, default=pathlib.Path("outputs/demo")
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    x_train, x_test, y_train, y_test = load_data(args.seed)
    print(f"digits: {len(x_train)} train / {len(x_test)} test images, 64 features")
    model = make_model()
    ps, st = model.init(jax.random.key(args.seed), jnp.asarray(x_train[:2]))
    schedule = optax.cosine_decay_schedule(args.lr, args.epochs * len(x_train) // 64)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(ps)

    def apply(ps, st, x):
        # nn.Chain's apply returns (y, st); run its layers here to get the DEQ's
        # solution too.
        embed, deq, head = model.layers
        h, st_embed = embed.apply(ps[0], st[0], x)
        z, st_deq, solution = deq.apply(ps[1], st[1], h, return_solution=True)
        logits, st_head = head.apply(ps[2], st[2], z)
        return logits, (st_embed, st_deq, st_head), solution

    def loss_fn(ps, st, x, y):
        logits, st, solution = apply(ps, st, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss = ce + args.jac_weight * solution.jacobian_loss
        return loss, (st, logits, solution)

    @jax.jit
    def train_step(ps, st, opt_state, x, y):
        grads, (st, logits, solution) = jax.grad(loss_fn, has_aux=True)(ps, st, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, ps)
        stats = (
            jnp.sum(jnp.argmax(logits, -1) == y),
            jnp.sum(solution.nfe),
            jnp.sum(solution.relative_residual_norm),
        )
        return optax.apply_updates(ps, updates), st, opt_state, stats

    @jax.jit
    def evaluate(ps, st, x, y):
        logits, _, solution = apply(ps, st, x)
        return jnp.mean(jnp.argmax(logits, -1) == y), jnp.mean(solution.nfe)

    rng = np.random.default_rng(args.seed)
    steps = len(x_train) // args.batch_size
    history = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = rng.permutation(len(x_train))
        correct = nfe = residual = 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch:2d}", leave=False, unit="step")
        for i in bar:
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            ps, st, opt_state, stats = train_step(
                ps, st, opt_state, x_train[idx], y_train[idx]
            )
            correct, nfe, residual = (
                a + float(b)
                for a, b in zip((correct, nfe, residual), stats, strict=True)
            )
        n = steps * args.batch_size
        test_acc, test_nfe = evaluate(ps, st, x_test, y_test)
        record = dict(
            epoch=epoch,
            train_acc=correct / n,
            test_acc=float(test_acc),
            nfe=nfe / n,
            test_nfe=float(test_nfe),
            residual=residual / n,
            seconds=time.perf_counter() - t0,
        )
        history.append(record)
        print(
            f"epoch {epoch:2d}  train acc {record['train_acc']:.3f}  "
            f"test acc {record['test_acc']:.3f}  nfe {record['nfe']:5.1f}  "
            f"rel. residual {record['residual']:.1e}  {record['seconds']:5.1f}s"
        )
    total = time.perf_counter() - start
    print(f"final test accuracy {history[-1]['test_acc']:.4f} in {total:.1f}s")
    (args.out / "history.json").write_text(json.dumps(history, indent=1))
    plot(history, args.out / "training.png")
    print(f"wrote {args.out / 'training.png'} and {args.out / 'history.json'}")
    return history


def plot(history, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax1.plot(epochs, [h["test_acc"] for h in history], label="test")
    ax1.set(xlabel="epoch", ylabel="accuracy", title="DEQ on digits")
    ax1.legend()
    ax2.plot(epochs, [h["nfe"] for h in history], label="train (mean per sample)")
    ax2.plot(epochs, [h["test_nfe"] for h in history], label="test")
    ax2.set(xlabel="epoch", ylabel="solver steps (nfe)", title="Anderson steps")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
