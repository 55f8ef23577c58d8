"""The inference actor: threads from its CPUs, device/dtype choice, rows with errors skipped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscore import models, predict


@pytest.mark.parametrize("cpus, threads", [(1.0, 1), (1.5, 2), (2.0, 2)])
def test_actor_runs_torch_on_the_cpus_it_was_given(ray_session, checkpoints, cpus, threads):
    """Ray sets OMP_NUM_THREADS=1 in workers; the Predictor must undo that from its CPU share."""
    info = models.resolve(str(checkpoints["vit"]))
    actor = ray_session.remote(num_cpus=cpus)(predict.Predictor).remote(info, "cpu", "fp32", 3)
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
    p = predict.Predictor(info, "cpu", "fp32", top_k=2)
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


def test_all_rows_failed_batch(checkpoints):
    info = models.resolve(str(checkpoints["vit"]))
    p = predict.Predictor(info, "cpu", "fp32", top_k=3)
    out = p({"id": np.array(["a"], dtype=object), "pixels": np.zeros((1, 3, 224, 224), np.uint8),
             "error": np.array(["read.failed: gone"], dtype=object), "meta": np.array(["m"], dtype=object)})
    assert out.to_pylist() == [{"id": "a", "labels": None, "probs": None, "error": "read.failed: gone",
                                "error_code": "read.failed", "meta": "m"}]
