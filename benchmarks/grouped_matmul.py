"""The dropless grouped SwiGLU, forward + backward, per implementation, as a ratio to a dense
SwiGLU of the same FLOPs (width top_k x hidden) timed in the same run, with each output and
gradient checked against the `ragged_dot` path. On a GPU it sweeps the Pallas kernel's tiles and
times tokamax's ragged dot (its default choice and each GPU implementation), which decides
`model.grouped_kernel: auto` on GPUs (kernels/backend.py), and the FP8 rows (`model.fp8`: inputs
rounded to e4m3 before the kernel; their error against the unrounded reference is FP8's).
Rows whose backend is missing (tokamax not installed) are skipped with the reason.

    python -m benchmarks.grouped_matmul          # GPU: the gpu_check MoE layer (16k rows, E 8, k 2, 2048 -> 5632)
    python -m benchmarks.grouped_matmul --smoke  # CPU: tiny shapes, the kernels in interpret mode
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mixtral_jax.kernels import fp8
from mixtral_jax.kernels.grouped import GroupedSwiGLU, pallas_slot_swiglu, ragged_slot_swiglu, tokamax_slot_swiglu
from mixtral_jax.kernels.grouped_pallas import DEFAULT

SWEEP = [  # (rows per block, kernel config); the first is what the model runs
    (128, DEFAULT), (128, DEFAULT._replace(num_warps=8)), (128, DEFAULT._replace(num_stages=4)),
    (128, DEFAULT._replace(bn=256, num_warps=8)), (64, DEFAULT), (256, DEFAULT._replace(num_warps=8)),
]


def timed(fn, args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loss_and_grads(slot_fn):
    def loss(x, wg, wu, wd, ids):
        return jnp.sum(slot_fn(x, ids, wg, wu, wd).astype(jnp.float32) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def tokamax_rows(smoke: bool) -> dict:
    """tokamax's ragged dot in our grouped SwiGLU: its own choice, then each GPU implementation
    (a CPU has only XLA's, which `tokamax` then is)."""
    try:
        import tokamax  # noqa: F401
    except ImportError as err:
        print(f"tokamax rows skipped: tokamax does not import ({err}); pip install 'mixtral_jax[gpu]'")
        return {}
    impls = [None] if smoke else [None, "triton", "mosaic"]
    return {"tokamax" + (f" {impl}" if impl else ""): (
        lambda x, ids, wg, wu, wd, impl=impl: tokamax_slot_swiglu(x, ids, wg, wu, wd, implementation=impl), None)
        for impl in impls}


def with_fp8(fn):
    return fp8.grouped(GroupedSwiGLU("row", tokens=fn, buffer=fn)).tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    n, e, k, d, h = (64, 4, 2, 32, 64) if args.smoke else (8192, 8, 2, 2048, 5632)
    dtype = jnp.float32 if args.smoke else jnp.bfloat16
    reps = args.reps or (1 if args.smoke else 10)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    ws = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dtype) for s in ((e, d, h), (e, d, h), (e, h, d))]
    logits = rng.normal(size=(n, e)) + np.linspace(0, 1, e)  # mildly unbalanced, as routers are
    ids = jnp.asarray(np.argsort(-logits, axis=1)[:, :k], jnp.int32)
    dense_w = [jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]), dtype) for s in ((d, k * h), (d, k * h), (k * h, d))]

    @jax.jit
    def dense(x, wg, wu, wd):
        return jax.grad(lambda *p: jnp.sum((jax.nn.silu(p[0] @ p[1]) * (p[0] @ p[2]) @ p[3]).astype(jnp.float32) ** 2),
                        argnums=(0, 1, 2, 3))(x, wg, wu, wd)

    @jax.jit
    def dense_forward(x, wg, wu, wd):
        return jax.nn.silu(x @ wg) * (x @ wu) @ wd

    print(f"device {jax.devices()[0].device_kind}; rows {n} x top-{k}, {e} experts, {d} -> {h}, "
          f"{jnp.dtype(dtype).name}, median of {reps}; forward alone and the rest (backward) as ratios too")
    base = timed(dense, (x, *dense_w), reps)
    base_forward = timed(dense_forward, (x, *dense_w), reps)
    ref_loss, ref_grads = loss_and_grads(ragged_slot_swiglu)(x, *ws, ids)
    print(f"equal-FLOPs dense SwiGLU: {base * 1e3:.2f} ms, forward {base_forward * 1e3:.2f} ms")
    rows = {"ragged_dot": (ragged_slot_swiglu, None)}
    for block, config in (SWEEP[:1] if args.smoke else SWEEP):
        def fn(x, ids, wg, wu, wd, block=block, config=config):
            return pallas_slot_swiglu(x, ids, wg, wu, wd, block=block, config=config, interpret=args.smoke)
        rows[f"pallas {block} rows {tuple(config)}"] = (fn, config)
    rows.update(tokamax_rows(args.smoke))
    pallas_fn = rows[next(name for name in rows if name.startswith("pallas"))][0]
    rows["pallas +fp8"] = (with_fp8(pallas_fn), None)
    if "tokamax" in rows:
        rows["tokamax +fp8"] = (with_fp8(rows["tokamax"][0]), None)
    for name, (fn, _) in rows.items():
        try:
            step = loss_and_grads(fn)
            value, grads = step(x, *ws, ids)
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))) /
                            (float(jnp.max(jnp.abs(r.astype(jnp.float32)))) + 1e-30)) for g, r in zip(grads, ref_grads))
            seconds = timed(step, (x, *ws, ids), reps)
            forward = timed(jax.jit(fn), (x, ids, *ws), reps)
            print(f"{name:<28} {seconds * 1e3:8.2f} ms  {seconds / base:6.2f}x dense  (forward "
                  f"{forward / base_forward:.2f}x, backward {(seconds - forward) / (base - base_forward):.2f}x)  "
                  f"max grad error / max |grad| {err:.1e}  loss {float(value):.4g} vs {float(ref_loss):.4g}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a tile config the card rejects is reported, not fatal
            print(f"{name:<28} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
            if args.smoke:
                raise


if __name__ == "__main__":
    main()
