"""The GPU session's script stays runnable between GPU sessions (CI has no GPU).

``benchmarks/gpu_check.py`` runs once per lent device; here its pieces run on
the CPU: the public-API checks, and every launch configuration it would tune
lowers for CUDA at the benchmark shapes (built from shapes alone, no memory).
"""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))

import bench  # noqa: E402
import gpu_check  # noqa: E402

from jaxloss._kernels import cross_entropy as ce  # noqa: E402


def test_api_checks_pass_on_cpu():
    report = gpu_check.api_on_device()
    assert report["ok"], report


def test_every_tuning_candidate_lowers_for_cuda():
    s = jax.ShapeDtypeStruct
    for shape, dtype, axis in [*bench.FULL.values(), *gpu_check.TUNE_ONLY.values()]:
        ax = axis % len(shape)
        c = shape[ax]
        pos = shape[:ax] + shape[ax + 1 :]
        layout = "last" if ax == len(shape) - 1 else "mid"
        args = (s(shape, jnp.dtype(dtype)), s(pos, jnp.int32), s((c,), jnp.float32))
        for with_grad in (True, False):
            cands = gpu_check._candidates(c, layout, with_grad)
            assert cands[0] == ce.launch_config(layout, c, 1 << 30, with_grad)
            for cfg in cands:

                def f(x, t, w, cfg=cfg, with_grad=with_grad, ax=ax):
                    return ce.cross_entropy_pallas(
                        x, t, None, w, jnp.float32(1.0), ignore_index=255, eps=0.0,
                        normalize=True, axis=ax, with_grad=with_grad, config=cfg,
                    )

                jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def test_bench_reduction_none_runs_and_agrees_with_optax(tmp_path):
    """``--reduction none``: jaxloss's per-position losses, reduced by the step,
    give optax's weighted mean and gradient."""
    args = bench.parse_args(
        ["--small", "--no-torch", "--cases", "seg19", "--reps", "1", "--reduction", "none"]
    )
    rows = bench.run(args)
    ours = [r for r in rows if r["impl"] == "jaxloss" and r["mode"] == "fwdbwd"]
    assert len(ours) == 1 and ours[0]["reduction"] == "none"
    assert ours[0]["loss_diff_vs_optax"] < 1e-5
    assert ours[0]["grad_maxdiff_vs_optax"] < 1e-9


def test_profile_steps_reports_the_step_fusions(tmp_path):
    report = gpu_check.profile_steps({"seg19": bench.SMALL["seg19"]}, str(tmp_path), calls=2)
    per_call = report["seg19"]["us_per_call"]
    assert any("fusion" in name for name in per_call), per_call
    assert (tmp_path / "hlo-seg19.txt").exists()
    assert not (tmp_path / "trace-seg19").exists()


def test_ab_times_a_base_commit_against_the_tree():
    """``ab.py`` imports the base commit's jaxloss beside the tree's and times
    both (here the base is HEAD itself, so the two losses agree)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, ".git")):
        import pytest

        pytest.skip("not a git checkout")
    import ab

    jaxloss_before = sys.modules["jaxloss"]
    args = ab.parse_args(["--base", "HEAD", "--small", "--cases", "seg150", "--reps", "1"])
    rows = ab.run(args)
    assert [r["mode"] for r in rows] == ["fwd", "fwdbwd"]
    assert all(r["base_ms"] > 0 and r["new_ms"] > 0 for r in rows)
    # --vmap: the steps vmapped over a batch of examples of the shape.
    flags = ["--vmap", "3", "--shape", "8x5", "--soft", "--reduction", "none", "--reps", "1"]
    rows = ab.run(ab.parse_args(["--base", "HEAD", *flags]))
    assert [r["mode"] for r in rows] == ["fwd", "fwdbwd"]
    # The modules the other tests imported are in place again.
    assert sys.modules["jaxloss"] is jaxloss_before


def test_sweep_runs_and_reports_both_modes():
    import sweep

    assert sweep.shape_of(2000, 5, -1, 4) == (400, 5)
    assert sweep.shape_of(200_000, 5, -1, 4) == (312, 128, 5)
    assert sweep.shape_of(2000, 5, 1, 4) == (25, 5, 4, 4)
    assert sweep.shape_of(20, 5, 1, 4) is None
    rows = sweep.main(
        ["--elements", "2000", "--classes", "5", "--dtypes", "float32", "--axes=1",
         "--spatial", "4", "--reps", "1", "--reduction", "none"]
    )
    assert [r["shape"] for r in rows] == [(25, 5, 4, 4)]
    assert set(rows[0]["ratio"]) == {"fwd", "fwdbwd"}
    assert all(v > 0 for v in rows[0]["ms"].values())
    soft = sweep.main(
        ["--elements", "2000", "--classes", "5", "--dtypes", "bfloat16", "--axes=-1",
         "--reps", "1", "--soft", "--label-smoothing", "0.1"]
    )
    assert [r["shape"] for r in soft] == [(400, 5)]
    assert all(v > 0 for v in soft[0]["ms"].values())
    soft_none = sweep.main(
        ["--elements", "2000", "--classes", "5", "--dtypes", "float32", "--axes=1",
         "--spatial", "4", "--reps", "1", "--soft", "--reduction", "none"]
    )
    assert [r["shape"] for r in soft_none] == [(25, 5, 4, 4)]
    assert all(v > 0 for v in soft_none[0]["ms"].values())


def test_soft_impls_per_position_losses_agree_with_optax():
    """``bench.soft_impls(reduction="none")`` (``sweep.py --soft --reduction
    none``): jaxloss's per-position losses averaged by the step equal optax's
    mean and the library's own mean, loss and gradient, both layouts, with
    label smoothing."""
    import optax

    import jaxloss

    for axis, shape in ((-1, (4, 6, 5, 19)), (1, (4, 19, 6, 5))):
        x, _, w, ax = bench.make_case(shape, jnp.float32, axis)
        q = bench.soft_targets(x, ax)
        got = {}
        for reduction in ("mean", "none"):
            impls = bench.soft_impls(jnp, jax, optax, jaxloss, ax, label_smoothing=0.1,
                                     reduction=reduction)
            got[reduction] = jax.jit(jax.value_and_grad(impls["jaxloss"]))(x, q, w)
        want_loss, want_grad = jax.jit(jax.value_and_grad(impls["optax"]))(x, q, w)
        for reduction, (loss, grad) in got.items():
            assert abs(float(loss - want_loss)) < 1e-5 * abs(float(want_loss)), (axis, reduction)
            assert float(jnp.max(jnp.abs(grad - want_grad))) < 1e-6, (axis, reduction)


def test_unweighted_impls_agree_with_label_smoothing():
    """``bench.jax_impls(weighted=False)`` (``ab.py --unweighted``): without
    class weights PyTorch's smoothing rule is optax's smoothed one-hot, so
    the three losses and their gradients agree (10% of the labels ignored,
    ``label_smoothing=0.1``, both layouts, mean and "none")."""
    import optax

    import jaxloss

    for axis, shape in ((-1, (4, 6, 5, 19)), (1, (4, 19, 6, 5))):
        x, y, w, ax = bench.make_case(shape, jnp.float32, axis)
        for reduction in ("mean", "none"):
            impls = bench.jax_impls(
                jnp, jax, optax, jaxloss, ax, reduction=reduction, label_smoothing=0.1,
                weighted=False,
            )
            got = {k: jax.jit(jax.value_and_grad(f))(x, y, w) for k, f in impls.items()}
            want_loss, want_grad = got["optax"]
            for k, (loss, grad) in got.items():
                assert abs(float(loss - want_loss)) < 1e-5 * abs(float(want_loss)), (k, axis)
                assert float(jnp.max(jnp.abs(grad - want_grad))) < 1e-6, (k, axis, reduction)
            weighted = bench.jax_impls(jnp, jax, optax, jaxloss, ax, reduction=reduction,
                                       label_smoothing=0.1)
            # with weights the losses differ: the flag is what made them agree
            assert abs(float(weighted["jaxloss"](x, y, w) - want_loss)) > 1e-3


@pytest.mark.parametrize(
    "flags,ref",
    [(["--soft"], "optax"), (["--label-smoothing", "0.1"], "log_softmax"),
     (["--soft", "--label-smoothing", "0.1"], "optax")],
    ids=["soft", "smoothing", "soft-smoothing"],
)
def test_bench_soft_and_smoothing_run_and_agree(tmp_path, flags, ref):
    """``--soft`` and ``--label-smoothing``: jaxloss's loss and gradient equal
    the reference's (optax for probability targets; log_softmax, PyTorch's
    weighted smoothing, for index targets, where optax's smoothing is not
    weighted), and the rows say what ran."""
    args = bench.parse_args(
        ["--small", "--no-torch", "--cases", "seg19_nchw", "--reps", "1", *flags]
    )
    rows = bench.run(args)
    ours = [r for r in rows if r["impl"] == "jaxloss" and r["mode"] == "fwdbwd"]
    assert len(ours) == 1
    assert ours[0]["targets"] == ("probabilities" if "--soft" in flags else "indices")
    assert ours[0]["label_smoothing"] == (0.1 if "--label-smoothing" in flags else 0.0)
    assert ours[0][f"loss_diff_vs_{ref}"] < 1e-5
    assert ours[0][f"grad_maxdiff_vs_{ref}"] < 1e-9


def test_mosaic_probe_lowers_and_its_prototypes_match_numpy(tmp_path, monkeypatch):
    """``mosaic_probe.py``, the Mosaic GPU port's first step: its prototypes
    (NCHW and channels-last) lower for CUDA at 1 to 192 classes, match NumPy
    float64 in interpret mode, and its device part (run here in interpret
    mode) agrees with jaxloss and writes its timings."""
    import json

    import mosaic_probe

    monkeypatch.setenv("OUT", str(tmp_path))
    assert mosaic_probe.main(["--small", "--interpret-device-run", "--reps", "1"]) == 0
    [path] = tmp_path.glob("mosaic_probe-*.json")
    report = json.loads(path.read_text())
    lowering = {(r["design"], r["dtype"], r["c"]): r["lowering"] for r in report["lowering"]}
    for design in ("nchw_prototype", "last_prototype"):
        for dtype in ("float32", "bfloat16"):
            for c in (1, 19, 150, 192):
                assert lowering[design, dtype, c] == "ok", (design, dtype, c)
    # A channels-last row of 19 float32 classes is 76 bytes: no TMA tile of rows.
    assert "16 bytes" in lowering["last_wgmma", "float32", 19]
    assert lowering["last_wgmma", "float32", 64] == "ok"
    checked = {(r["layout"], r["c"], r["dtype"]) for r in report["interpret"]}
    assert checked >= {("nchw", 19, "float32"), ("last", 19, "float32"), ("last", 150, "bfloat16")}
    assert set(report["device"]) == {"seg19", "seg19_nchw", "seg150", "seg150_nchw"}
    for entry in report["device"].values():
        assert "error" not in entry, entry
        assert entry["loss_rel"] < 1e-6 and entry["grad_maxabs"] < 1e-6, entry
        assert set(entry["ms_p50"]) == {"prototype", "jaxloss", "copy"}


def test_vmap_bench_runs_and_agrees_with_optax(tmp_path):
    """``vmap_bench.py``: per-example losses and gradients under ``jax.vmap``,
    jaxloss against optax (index and probability targets)."""
    import vmap_bench

    for flags in ([], ["--soft"], ["--reduction", "none"], ["--soft", "--reduction", "none"]):
        rows = vmap_bench.run(vmap_bench.parse_args(["--reps", "1", "--cases", "seqs", *flags]))
        ours = [r for r in rows if r["impl"] == "jaxloss" and r["mode"] == "fwdbwd"]
        assert len(ours) == 1, rows
        assert ours[0]["loss_diff_vs_optax"] < 1e-5
        assert ours[0]["grad_maxdiff_vs_optax"] < 1e-7
