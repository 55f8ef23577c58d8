"""The inference actor: threads from its CPUs, device/dtype choice, rows with errors skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscore.checkpoints import models
from batchscore.inference import predict


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (1.5, 2), (2.0, 2)])
def test_actor_runs_torch_on_the_cpus_it_was_given(ray_session, checkpoints, cpus, threads):
    """Ray sets OMP_NUM_THREADS=1 in workers; the Predictor must undo that from its CPU share."""
    info = models.resolve(str(checkpoints["vit"]))
    actor = ray_session.remote(num_cpus=cpus)(predict.Predictor).remote(info, predict.PredictSpec("cpu", "fp32", 3))
    got = ray_session.get(actor.__ray_call__.remote(lambda self: torch.get_num_threads()))
    ray_session.kill(actor)
    assert got == threads


def test_auto_dtype_on_this_cpu():
    device, dtype = predict.resolve_runtime("auto", "auto")
    if torch.cuda.is_available():
        assert (device.type, dtype) == ("cuda", torch.float16)
    else:
        expected = torch.bfloat16 if predict.cpu_has_native_bf16() else torch.float32
        assert (device.type, dtype) == ("cpu", expected)
    assert predict.resolve_runtime("cpu", "fp16")[1] == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="device=cuda, but torch sees no CUDA device"):
        predict.resolve_runtime("cuda", "auto")


def test_rows_with_errors_skip_the_model_and_keep_their_error(checkpoints):
    info = models.resolve(str(checkpoints["vit"]))
    p = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=2))
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    out = p({"id": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
             "error": np.array(["", "decode.empty: empty file", ""], dtype=object),
             "meta": np.array(["m0", "m1", "m2"], dtype=object)}).to_pylist()
    assert [r["error"] for r in out] == [None, "decode.empty: empty file", None]
    assert [r["meta"] for r in out] == ["m0", "m1", "m2"]
    assert out[1]["labels"] is None and out[1]["probs"] is None
    assert len(out[0]["labels"]) == 2 and out[0]["probs"][0] >= out[0]["probs"][1]
    # The same image alone gives the same probabilities: the bad row did not shift anything.
    alone = p({"id": np.array(["c"], dtype=object), "pixels": pixels[2:],
               "error": np.array([""], dtype=object), "meta": np.array(["m2"], dtype=object)}).to_pylist()[0]
    assert alone["labels"] == out[2]["labels"] and np.allclose(alone["probs"], out[2]["probs"], atol=1e-5)


def test_a_non_finite_output_is_that_rows_error(checkpoints):
    """An image whose logits hold NaN or inf (an fp16 overflow on a GPU; here the classifier's
    output for row 1 made NaN by a hook) becomes a `predict.nonfinite` error row; the other
    rows keep exactly the probabilities they have without it."""
    info = models.resolve(str(checkpoints["vit"]))
    p = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=2, batch_size=4))
    pixels = np.random.default_rng(1).integers(0, 256, (3, 3, 224, 224), dtype=np.uint8)
    batch = {"id": np.array(["a", "b", "c"], dtype=object), "pixels": pixels,
             "error": np.array(["", "", ""], dtype=object), "meta": np.array(["m0", "m1", "m2"], dtype=object)}
    clean = p(batch).to_pylist()

    def poison(module, args, out):
        out = out.clone()
        out[1, 0] = float("nan")
        return out

    p.net.classifier.register_forward_hook(poison)
    out = p(batch).to_pylist()
    assert [r["error_code"] for r in out] == [None, "predict.nonfinite", None]
    assert out[1]["labels"] is None and out[1]["probs"] is None
    for i in (0, 2):
        assert out[i]["labels"] == clean[i]["labels"] and np.allclose(out[i]["probs"], clean[i]["probs"], atol=1e-6)


def test_all_rows_failed_batch(checkpoints):
    info = models.resolve(str(checkpoints["vit"]))
    p = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=3))
    out = p({"id": np.array(["a"], dtype=object), "pixels": np.zeros((1, 3, 224, 224), np.uint8),
             "error": np.array(["read.failed: gone"], dtype=object), "meta": np.array(["m"], dtype=object)})
    assert out.to_pylist() == [{"id": "a", "labels": None, "probs": None, "error": "read.failed: gone",
                                "error_code": "read.failed", "meta": "m"}]


def test_batch_sizer_keeps_the_fastest_size_per_image_and_ignores_warmup():
    sizer = predict.BatchSizer((8, 16, 32), rounds=3)
    cost = {8: 0.10, 16: 0.08, 32: 0.12}  # seconds per image; 16 is fastest
    used = []
    for _ in range(9):
        size = sizer.next_size()
        used.append(size)
        warmup = 50.0 if used.count(size) == 1 else 0.0  # a very slow first batch must not count
        sizer.record(size, 32, 32 * cost[size] + warmup)
    assert used == [8, 16, 32] * 3
    assert sizer.chosen == 16 and sizer.next_size() == 16
    sizer.record(16, 32, 1000.0)  # decided: later timings change nothing
    assert sizer.chosen == 16


def test_batch_sizer_takes_each_sizes_best_time_and_counts_short_batches():
    sizer = predict.BatchSizer((8, 16), rounds=3)
    # Batches come short when rows with errors skip the model; they count at their images.
    # 8: warm-up, then 0.2 and 0.05 s/image (one batch slowed by a neighbour); 16: 0.1 twice.
    for size, images, per_image in [(8, 32, 9.9), (16, 27, 9.9), (8, 30, 0.2), (16, 32, 0.1), (8, 25, 0.05)]:
        assert sizer.next_size() == size and sizer.chosen is None
        sizer.record(size, images, images * per_image)
    sizer.record(16, 32, 32 * 0.1)
    assert sizer.chosen == 8
    sizer2 = predict.BatchSizer((8, 16))
    sizer2.record(8, 0, 0.0)  # a batch of error rows only ran nothing: not a turn
    assert sizer2.next_size() == 8


def test_fixed_batch_size_is_not_probed():
    sizer = predict.BatchSizer(predict.batch_candidates(12, on_gpu=False))
    assert sizer.chosen == 12 and sizer.next_size() == 12
    assert predict.chunks(30, 12) == [(0, 12), (12, 24), (24, 30)]
    assert predict.batch_candidates(None, on_gpu=False) == predict.CPU_BATCH_CANDIDATES
    assert max(predict.batch_candidates(None, on_gpu=True)) > max(predict.CPU_BATCH_CANDIDATES)


def test_probed_predictor_gives_the_same_rows_as_a_fixed_batch(checkpoints):
    """Chunking a batch for the probe changes neither the order nor the numbers of the rows."""
    info = models.resolve(str(checkpoints["vit"]))
    rng = np.random.default_rng(1)
    probed = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=3))
    fixed = predict.Predictor(info, predict.PredictSpec("cpu", "fp32", top_k=3, batch_size=32))
    assert probed.sizer.chosen is None and fixed.sizer.chosen == 32
    for n in (32,) * 9 + (20,):  # 3 batches at each of 8, 16 and 32 for the probe to decide, then one more
        pixels = rng.integers(0, 256, (n, 3, 224, 224), dtype=np.uint8)
        errors = np.array(["decode.empty: empty file" if i % 7 == 3 else "" for i in range(n)], dtype=object)
        batch = {"id": np.array([f"i{i}" for i in range(n)], dtype=object), "pixels": pixels, "error": errors,
                 "meta": np.array(["m"] * n, dtype=object)}
        a, b = probed(batch).to_pylist(), fixed(batch).to_pylist()
        assert [r["id"] for r in a] == [r["id"] for r in b] == list(batch["id"])
        assert [r["labels"] for r in a] == [r["labels"] for r in b]
        for ra, rb in zip(a, b):
            assert (ra["probs"] is None) == (rb["probs"] is None)
            if ra["probs"] is not None:
                assert np.allclose(ra["probs"], rb["probs"], atol=1e-5)
    assert probed.sizer.chosen in predict.CPU_BATCH_CANDIDATES
