"""Feeding the model (`batchscore.inference.feed`) and the sizing line (`batchscore.inference.sizing`): chunking,
the copy/compute overlap order, batch candidates by GPU memory, and the decode-bound line,
as pure logic; the CUDA staging path runs only where a GPU is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchscore.inference import feed, predict, sizing


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7])
def test_overlap_schedule_copies_the_next_chunk_while_one_computes(n):
    steps = feed.overlap_schedule(n, ahead=1)
    assert sorted(steps) == sorted([("copy", i) for i in range(n)] + [("compute", i) for i in range(n)])
    at = {s: k for k, s in enumerate(steps)}
    for i in range(n):
        assert at[("copy", i)] < at[("compute", i)]  # a chunk is staged before it is computed
        if i + 2 < n:
            # chunk i+2 reuses chunk i's staging buffer: queued only after chunk i's compute
            assert at[("compute", i)] < at[("copy", i + 2)] < at[("compute", i + 1)]
    in_flight = 0
    for step, _ in steps:  # never more copies ahead than buffers
        in_flight += 1 if step == "copy" else -1
        assert 0 <= in_flight <= 2


def test_spans_cover_a_batch_in_chunks():
    assert feed.spans(30, 12) == [(0, 12), (12, 24), (24, 30)] == predict.chunks(30, 12)
    assert feed.spans(0, 8) == []


@pytest.mark.parametrize("source", ["numpy", "tensor"])
def test_feeder_runs_every_chunk_in_order_on_this_device(source):
    pixels = np.arange(10 * 3 * 2 * 2, dtype=np.uint8).reshape(10, 3, 2, 2)
    batch = pixels if source == "numpy" else torch.from_numpy(pixels)
    feeder = feed.Feeder(torch.device("cpu"))
    seen = []
    out = feeder.run(batch, 4, lambda x: (seen.append(x.shape[0]), x.float().sum((1, 2, 3)))[1])
    assert seen == [4, 4, 2]
    assert torch.equal(torch.cat(out), torch.from_numpy(pixels).float().sum((1, 2, 3)))
    assert feeder.trace == feed.overlap_schedule(3)


def test_compile_time_is_taken_once_per_chunk_size(caplog):
    feeder = feed.Feeder(torch.device("cpu"), compiled=True)
    with caplog.at_level("INFO", logger="batchscore.inference.feed"):
        feeder.run(np.zeros((10, 3, 2, 2), np.uint8), 4, lambda x: x)
        feeder.run(np.zeros((8, 3, 2, 2), np.uint8), 4, lambda x: x)
    assert set(feeder.compile_seconds) == {4, 2}
    assert sum("torch.compile: batch" in r.message for r in caplog.records) == 2
    net = torch.nn.Linear(2, 2)
    assert feed.maybe_compile(net, False) is net


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned staging and the copy stream need CUDA")
def test_cuda_staging_reuses_pinned_buffers_and_gives_the_same_results():
    pixels = np.random.default_rng(0).integers(0, 256, (70, 3, 8, 8), dtype=np.uint8)
    feeder = feed.Feeder(torch.device("cuda"))
    out = torch.cat(feeder.run(pixels, 16, lambda x: x.float().mean((1, 2, 3))))
    buffers = [b.data_ptr() for b in feeder._pinned]
    assert all(b.is_pinned() for b in feeder._pinned)
    again = torch.cat(feeder.run(pixels, 16, lambda x: x.float().mean((1, 2, 3))))
    assert [b.data_ptr() for b in feeder._pinned] == buffers  # reused, not reallocated
    ref = torch.from_numpy(pixels).float().mean((1, 2, 3))
    assert torch.allclose(out.cpu(), ref) and torch.allclose(again.cpu(), ref)


def test_batch_candidates_grow_with_gpu_memory():
    assert feed.gpu_batch_candidates(80)[-1] == 1024 and feed.gpu_batch_candidates(141)[-1] == 1024
    assert feed.gpu_batch_candidates(24)[-1] == 512  # L4, A10G
    assert feed.gpu_batch_candidates(16)[-1] == 256  # T4, V100
    assert feed.gpu_batch_candidates(8)[-1] == 128
    assert feed.gpu_batch_candidates(None)[-1] == 256
    assert predict.batch_candidates(None, on_gpu=True, gpu_memory_gib=80) == (16, 32, 64, 128, 256, 512, 1024)
    assert predict.batch_candidates(None, on_gpu=False, gpu_memory_gib=80) == predict.CPU_BATCH_CANDIDATES
    assert predict.batch_candidates(48, on_gpu=True, gpu_memory_gib=80) == (48,)


def test_gpu_memory_from_rays_accelerator_types():
    assert feed.accelerator_memory_gib({"CPU": 16, "GPU": 1, "accelerator_type:H100": 1}) == 80
    assert feed.accelerator_memory_gib({"accelerator_type:H100": 1, "accelerator_type:L4": 1}) == 24  # smallest
    assert feed.accelerator_memory_gib({"accelerator_type:XYZ": 1, "accelerator_type:H100": 1}) is None
    assert feed.accelerator_memory_gib({"CPU": 2}) is None


def test_object_store_holds_three_actor_batches():
    assert feed.queue_mb(256, 32, (224, 224)) == 256  # CPU runs: unchanged
    assert feed.queue_mb(256, 1024, (224, 224)) == 441  # 3 x 1,024 x 147 KiB


def test_decode_bound_line_says_what_to_do():
    """A GPU busy 41% of the time: its model does 3,000 images/s when busy, so it scored
    1,230/s; the decode tasks took 5 ms per image at 0.5 CPU each (400 images/s per CPU)."""
    a = sizing.assess(images=12_300, busy_seconds=4.1, wall_seconds=10.0, decode_seconds=12_300 * 0.005,
                      decode_cpus=0.5, on_gpu=True, decode_device="cpu")
    assert a.line.startswith("GPU busy 41%: add CPUs or use decode_device=cuda")
    assert a.model_images_per_second == pytest.approx(3000)
    assert a.decode_images_per_cpu_second == pytest.approx(400)
    assert a.decode_cpus_needed == pytest.approx(7.5) and "~8 decode CPUs per actor" in a.line
    busy = sizing.assess(images=9000, busy_seconds=9.0, wall_seconds=10.0, decode_seconds=0.0, decode_cpus=0.5,
                         on_gpu=True, decode_device="cuda")
    assert busy.line.startswith("GPU busy 90%: model-bound") and busy.decode_cpus_needed is None
    gpu_decode = sizing.assess(images=100, busy_seconds=1.0, wall_seconds=10.0, decode_seconds=1.0, decode_cpus=0.5,
                               on_gpu=True, decode_device="cuda")
    assert gpu_decode.line.startswith("GPU busy 10% with JPEGs decoded on the GPU: add CPUs for reading")
    cpu = sizing.assess(images=100, busy_seconds=5.0, wall_seconds=10.0, decode_seconds=1.0, decode_cpus=0.5,
                        on_gpu=False, decode_device="cpu")
    assert cpu.line.startswith("model actor busy 50%: add CPUs for decode")


def test_busy_clock_starts_after_the_first_call_and_says_when_a_line_is_due():
    now = [0.0]
    clock = sizing.BusyClock(every_seconds=10, clock=lambda: now[0])
    for start, stop, due in [(0, 5, False), (6, 7, False), (9, 10, False), (15, 16, True), (17, 18, False)]:
        now[0] = start
        clock.enter()
        now[0] = stop
        assert clock.leave(100, decode_seconds=0.5) is due
    f = clock.figures()
    assert f == {"images": 400, "busy_seconds": 4.0, "wall_seconds": 13.0, "decode_seconds": 2.0}
