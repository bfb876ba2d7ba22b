"""Train a small U-Net on procedural shapes with jaxloss's weighted cross-entropy.

    python examples/segmentation/train.py            # the README's default run
    python examples/segmentation/train.py --help     # every option

The dataset is generated in code (see ``seg_data.py``): textured backgrounds,
five shape classes with rare rings and crosses, void (255) on object borders.
The loss is ``jaxloss.CrossEntropyLoss(weight=..., ignore_index=255,
label_smoothing=...)`` with class weights from ``jaxloss.class_weights``.

Data parallelism
----------------
The script uses every device JAX sees: a 1-D ``Mesh`` named ``"data"``, the
batch sharded along it with ``NamedSharding(mesh, P("data"))``, parameters
and optimiser state replicated with ``NamedSharding(mesh, P())``. The model
runs under the jitted train step (GSPMD); the loss runs under ``shard_map``
with ``axis_name="data"``, so each device computes its slice's loss
numerator and weighted count of non-ignored pixels, and both are summed
across devices before dividing: the result is the exact global weighted
mean, not a mean of per-device means (which would be wrong, since every
device holds a different number of void pixels). (A plain ``jit`` of
``jaxloss.cross_entropy`` over the global batch gives the same value, its GPU
kernel partitioned per device; ``shard_map`` shows the ``axis_name`` route.) The same
code runs on 1 CPU, 1 GPU or N GPUs; the global batch is rounded up to a
multiple of the device count.

Multi-host
----------
On several machines, start the same command on every host with
``--distributed``: the script then calls ``jax.distributed.initialize()``
first (it reads the coordinator address, process count and id from the
cluster environment -- SLURM, Open MPI, Cloud TPU -- or from
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``).
The mesh then spans the devices of every host, each process builds only its
own slice of every global batch (``jax.make_array_from_process_local_data``),
and process 0 writes the outputs. Example for two hosts::

    # host 0                                  # host 1
    JAX_COORDINATOR_ADDRESS=host0:1234 \\      JAX_COORDINATOR_ADDRESS=host0:1234 \\
    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
    python train.py --distributed             python train.py --distributed
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import jaxloss

# isort: split
# This example's own modules (the script's directory is on sys.path).
import seg_data
import seg_metrics
from seg_model import UNet

# U-Net channels per level: 48 -> 24 -> 12 -> 6 pixels at the default size.
FEATURES = (16, 32, 64, 128)

DEFAULTS = {
    "steps": 2800,
    "batch_size": 8,
    "image_size": 48,
    "train_images": 3000,
    "val_images": 256,
    "lr": 3e-3,
    "class_weights": "enet",
    "label_smoothing": 0.05,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(
            "Train a small Flax U-Net on a procedural shapes segmentation dataset with "
            "jaxloss.CrossEntropyLoss (class weights, ignore_index=255, label smoothing), "
            "data-parallel over every local device. Writes metrics.json, predictions.png "
            "and loss_curve.png to --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="number of optimiser steps (one global batch each)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help="global batch size, split across all devices (rounded up to a "
                        "multiple of the device count)")
    p.add_argument("--image-size", type=int, default=DEFAULTS["image_size"],
                   help="side of the square images in pixels (a multiple of 8)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: runs/segmentation-<class-weights>-<seed>)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the dataset, the initialisation and the batch order")
    p.add_argument("--class-weights", choices=["none", "inverse", "median", "enet"],
                   default=DEFAULTS["class_weights"],
                   help="per-class loss weights from the training labels' pixel "
                        "frequencies (jaxloss.class_weights): 'inverse' N/(C*n_c), "
                        "'median' median-frequency balancing, 'enet' 1/ln(1.02+f_c), "
                        "'none' unweighted")
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"],
                   help="label smoothing epsilon in [0, 1] (PyTorch's rule)")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"],
                   help="peak learning rate of the warmup + cosine-decay AdamW schedule")
    p.add_argument("--train-images", type=int, default=DEFAULTS["train_images"],
                   help="size of the fixed training split")
    p.add_argument("--val-images", type=int, default=DEFAULTS["val_images"],
                   help="size of the fixed validation split")
    p.add_argument("--eval-every", type=int, default=0,
                   help="validate every this many steps (0: five times per run)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first (see the "
                        "module docstring)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error(f"--steps and --batch-size must be >= 1; got {args.steps}, {args.batch_size}")
    if args.image_size < 8 or args.image_size % 8:
        p.error(f"--image-size must be a multiple of 8 and >= 8; got {args.image_size}")
    if not 0.0 <= args.label_smoothing <= 1.0:
        p.error(f"--label-smoothing must be in [0, 1]; got {args.label_smoothing}")
    if args.out is None:
        args.out = Path("runs") / f"segmentation-{args.class_weights}-{args.seed}"
    return args


def local_slice(global_rows: int) -> slice:
    """This process's rows of a global batch (all of them on a single host)."""
    per = global_rows // jax.process_count()
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def make_global(batch: np.ndarray, sharding: NamedSharding, global_rows: int) -> jax.Array:
    """A global array sharded along the batch from this process's rows."""
    return jax.make_array_from_process_local_data(
        sharding, batch[local_slice(global_rows)], (global_rows, *batch.shape[1:])
    )


def normalise(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 127.5 - 1.0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.distributed:
        jax.distributed.initialize()
    is_main = jax.process_index() == 0

    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    n_dev = len(devices)
    batch = -(-args.batch_size // n_dev) * n_dev
    if batch != args.batch_size and is_main:
        print(f"global batch {args.batch_size} -> {batch} (a multiple of {n_dev} devices)")

    # ---- data: fixed splits, a pure function of the seed ----
    t0 = time.perf_counter()
    train_x, train_y = seg_data.make_split(args.seed, "train", args.train_images, args.image_size)
    val_x, val_y = seg_data.make_split(args.seed, "val", args.val_images, args.image_size)
    num_classes = seg_data.NUM_CLASSES
    if is_main:
        print(f"devices: {n_dev} x {devices[0].platform} ({devices[0].device_kind}); "
              f"data {time.perf_counter() - t0:.1f}s: {len(train_x)} train / {len(val_x)} val "
              f"images of {args.image_size}px")
        fracs = seg_data.class_pixel_fractions(train_y)
        print("train pixel fractions: " + ", ".join(
            f"{c} {f:.2%}" for c, f in zip(seg_data.CLASSES, fracs, strict=True)))

    if args.class_weights == "none":
        weight = None
    else:
        w = jaxloss.class_weights(train_y, num_classes, method=args.class_weights,
                                  ignore_index=seg_data.VOID)
        weight = tuple(float(v) for v in np.asarray(w))
        if is_main:
            print(f"class weights ({args.class_weights}): "
                  + ", ".join(f"{v:.2f}" for v in weight))
    loss_module = jaxloss.CrossEntropyLoss(
        weight=weight,
        ignore_index=seg_data.VOID,
        label_smoothing=args.label_smoothing,
        axis_name="data",  # the weighted mean over the global batch (below)
    )
    # The loss runs per device under shard_map: each device's slice of the
    # logits, with the numerator and the weighted count of counted pixels
    # summed over the "data" axis (axis_name) before dividing. A plain jit
    # would compute the same value, but on GPUs jaxloss's Pallas kernel cannot
    # be partitioned by GSPMD, and XLA would gather every device's logits.
    global_loss = jax.shard_map(
        lambda logits, labels: loss_module.apply({}, logits, labels),
        mesh=mesh,
        in_specs=(P("data"), P("data")),
        out_specs=P(),
    )

    # ---- model, optimiser, replicated state ----
    model = UNet(num_classes=num_classes, features=FEATURES)
    key = jax.random.key(args.seed)
    dummy = jnp.zeros((1, args.image_size, args.image_size, 3), jnp.float32)
    params = jax.jit(model.init)(key, dummy)
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=args.lr, warmup_steps=max(1, args.steps // 20),
        decay_steps=args.steps, end_value=args.lr * 0.02,
    )
    tx = optax.adamw(schedule, weight_decay=1e-4)
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    state = jax.device_put(state, replicated)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(replicated, replicated))
    def train_step(state, images, labels):
        def loss_fn(params):
            logits = state.apply_fn(params, normalise(images))
            return global_loss(logits, labels)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    @functools.partial(jax.jit, out_shardings=replicated)
    def eval_step(params, images, labels):
        preds = jnp.argmax(model.apply(params, normalise(images)), axis=-1)
        return seg_metrics.confusion_matrix(labels, preds, num_classes, seg_data.VOID)

    @functools.partial(jax.jit, out_shardings=replicated)
    def predict(params, images):
        return jnp.argmax(model.apply(params, normalise(images)), axis=-1).astype(jnp.uint8)

    eval_batch = max(batch, 64 // n_dev * n_dev or n_dev)

    def evaluate(params) -> dict:
        cm = np.zeros((num_classes, num_classes), np.int64)
        for start in range(0, len(val_x), eval_batch):
            xs, ys = val_x[start:start + eval_batch], val_y[start:start + eval_batch]
            pad = eval_batch - len(xs)
            if pad:  # pad with void labels: skipped by the confusion matrix
                xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), xs.dtype)])
                ys = np.concatenate([ys, np.full((pad, *ys.shape[1:]), seg_data.VOID, ys.dtype)])
            cm += np.asarray(eval_step(params, make_global(xs, batch_sharding, eval_batch),
                                       make_global(ys, batch_sharding, eval_batch)))
        return seg_metrics.metrics_from_confusion(cm) | {"confusion_matrix": cm}

    # ---- training ----
    order_rng = np.random.default_rng([args.seed, 2])
    eval_every = args.eval_every or max(1, args.steps // 5)
    losses: list[float] = []
    pending: list[jax.Array] = []
    val_history: list[tuple[int, float]] = []
    log_every = 10
    t_train = time.perf_counter()
    t_log, images_since = t_train, 0
    bar = tqdm(total=args.steps, desc="train", disable=not is_main, mininterval=1.0,
               dynamic_ncols=True)
    for step in range(1, args.steps + 1):
        idx = order_rng.integers(0, len(train_x), batch)
        xs, ys = train_x[idx], train_y[idx]
        # Random flips (every class is symmetric under them).
        if order_rng.random() < 0.5:
            xs, ys = xs[:, :, ::-1], ys[:, :, ::-1]
        if order_rng.random() < 0.5:
            xs, ys = xs[:, ::-1], ys[:, ::-1]
        state, loss = train_step(state, make_global(np.ascontiguousarray(xs), batch_sharding,
                                                    batch),
                                 make_global(np.ascontiguousarray(ys), batch_sharding, batch))
        pending.append(loss)
        images_since += batch
        bar.update(1)
        if step % log_every == 0 or step == args.steps:
            losses.extend(float(v) for v in jax.device_get(pending))
            pending.clear()
            now = time.perf_counter()
            bar.set_postfix(loss=f"{losses[-1]:.4f}",
                            img_s=f"{images_since / (now - t_log):.0f}", refresh=False)
            t_log, images_since = now, 0
        if step % eval_every == 0 or step == args.steps:
            m = evaluate(state.params)
            val_history.append((step, m["miou"]))
            bar.write(f"step {step}: val mIoU {m['miou']:.4f}, pixel acc "
                      f"{m['pixel_accuracy']:.4f}")
    bar.close()
    train_seconds = time.perf_counter() - t_train

    final = m
    per_class = {c: float(v) for c, v in zip(seg_data.CLASSES, final["per_class_iou"],
                                             strict=True)}
    metrics = {
        "miou": final["miou"],
        "per_class_iou": per_class,
        "rare_classes": {c: per_class[c] for c in seg_data.RARE_CLASSES},
        "pixel_accuracy": final["pixel_accuracy"],
        "steps": args.steps,
        "batch_size": batch,
        "image_size": args.image_size,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "devices": {"count": n_dev, "platform": devices[0].platform,
                    "kind": devices[0].device_kind, "processes": jax.process_count()},
        "class_weights_method": args.class_weights,
        "class_weights": weight,
        "label_smoothing": args.label_smoothing,
        "seed": args.seed,
        "final_train_loss": losses[-1],
        "val_miou_history": val_history,
        "confusion_matrix": final["confusion_matrix"].tolist(),
        "classes": list(seg_data.CLASSES),
        "jax_version": jax.__version__,
    }
    if is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # Predictions on the first validation images (every process takes part).
    k = min(8, len(val_x))
    show = -(-k // n_dev) * n_dev
    xs = np.resize(val_x[:k], (show, *val_x.shape[1:]))
    preds = np.asarray(predict(state.params, make_global(xs, batch_sharding, show)))
    if is_main:
        import plots  # matplotlib only where outputs are written

        plots.predictions_png(args.out / "predictions.png", val_x[:k], val_y[:k], preds[:k])
        plots.loss_curve_png(args.out / "loss_curve.png", losses, val_history)
        print(f"mIoU {metrics['miou']:.4f}, pixel accuracy {metrics['pixel_accuracy']:.4f}, "
              f"train {train_seconds:.0f}s; outputs in {args.out}")
        print("per-class IoU: " + ", ".join(f"{c} {v:.3f}" for c, v in per_class.items()))
    return metrics


if __name__ == "__main__":
    main()
