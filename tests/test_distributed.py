"""Data parallelism. With torchrun (gloo, 2 CPU processes) against one process with the same global batch:
same weights, and every validation video counted exactly once. Through a recording process group (a world
of two in one process, tests/recording_group.py): every collective of the helpers hands an NCCL-like backend
tensors on its device, here a stand-in accelerator (tests/stand_in_device.py), and never a CPU tensor."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from evl.engine.distributed import (
    DistEnv,
    all_gather_objects,
    barrier,
    mean_over_processes,
    rank_seed,
    wrap_ddp,
)
from evl.engine.feature_cache import DONE, FeatureCache
from evl.engine.run import load_run
from evl.synth import make_dataset
from recording_group import Call, recording_world
from stand_in_device import available as stand_in_available
from stand_in_device import use_stand_in

CPU = torch.device("cpu")
needs_stand_in = pytest.mark.skipif(
    not stand_in_available(), reason="this torch cannot drive a Python-defined device (PrivateUse1)"
)

STEPS, LR = 6, 1e-6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    # 7 validation videos: not divisible by 2 processes, so a dropped or padded remainder would show.
    return make_dataset(
        root, num_train_per_class=2, num_val_per_class=2, num_frames=10, size=48, progress=False
    )


def args(dataset, run_dir):
    val = run_dir.parent / "val7.txt"
    val.write_text("".join(dataset.val_list.read_text().splitlines(keepends=True)[:7]))
    return [
        "train",
        "--data-root", str(dataset.root),
        "--train-list", str(dataset.train_list),
        "--val-list", str(val),
        "--classes", str(dataset.classes_file),
        "--backbone", "random:ViT-T/16@112",
        "--num-frames", "4",
        "--frame-stride", "2",
        "--steps", str(STEPS),
        "--batch-size", "4",
        # Adam divides by sqrt(v): an entry with a near-zero gradient moves by ~lr whatever the rounding of
        # the gradient sum (which differs between an all-reduce and one batch); a small lr keeps that
        # well below the 1e-6 the two runs are compared at (1e-5 was not, on some generated videos).
        "--lr", str(LR),
        "--eval-every", str(STEPS),
        "--save-every", str(STEPS),
        "--num-workers", "0",
        "--decoder-layers", "2",
        # Dropout masks come from each process's own generator; without dropout the two runs must agree.
        "--set", "decoder.mlp_dropout=0.0",
        "--set", "decoder.head_dropout=0.0",
        "--set", "data.rand_augment=null",
        "--output-dir", str(run_dir),
        "--quiet",
    ]  # fmt: skip


def test_two_gloo_processes_match_one_process(dataset, tmp_path):
    # Both runs one thread per process, so that only the split of the batch differs between them.
    # A process that dies of a signal prints where it was (faulthandler), ahead of the launcher's report.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    single = tmp_path / "single"
    done = subprocess.run(
        [sys.executable, "-m", "evl", *args(dataset, single)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary_single = json.loads(done.stdout.strip().splitlines()[-1])

    double = tmp_path / "double"
    # The random backbone of the one-process run, so both start from the same weights.
    double.mkdir()
    (double / "backbone.safetensors").write_bytes((single / "backbone.safetensors").read_bytes())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "evl", *args(dataset, double)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    # The ranks' own output comes first; the launcher's traceback at the end says only which rank died.
    assert done.returncode == 0, f"{done.stdout[-1500:]}\n{done.stderr[:4000]}\n...\n{done.stderr[-800:]}"
    summaries = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1  # from the first process
    assert summaries[0]["val"]["num_videos"] == 7 == summary_single["val"]["num_videos"]
    assert summaries[0]["val"]["top1"] == pytest.approx(summary_single["val"]["top1"])

    a = load_run(single).model.trainable_state_dict()
    b = load_run(double).model.trainable_state_dict()
    assert a.keys() == b.keys()
    # The runs did move the weights (the cross-attention tables start at zero; Adam moves an entry by about
    # lr per step), by more than the tolerance they are compared at.
    assert a["decoder.cross_attention.0.w_prev"].abs().max() > 3 * LR
    assert summaries[0]["final_loss"] == pytest.approx(summary_single["final_loss"], abs=1e-6)
    for key in a:
        if key.endswith("attn.k_proj.bias"):
            # Its gradient is zero in exact arithmetic (it shifts all scores of a query equally): what is
            # left is rounding noise, which Adam's normalisation turns into steps of up to lr either way.
            assert (a[key] - b[key]).abs().max() <= 2 * STEPS * LR
            continue
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_two_gloo_processes_extract_the_same_cache_as_one(dataset, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    flags = ["extract", "--data-root", str(dataset.root), "--train-list", str(dataset.train_list),
             "--classes", str(dataset.classes_file), "--backbone", "random:ViT-T/16@112",
             "--num-frames", "4", "--frame-stride", "2", "--decoder-layers", "2", "--num-workers", "0",
             "--batch-size", "3", "--quiet"]  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "double"
    done = subprocess.run([sys.executable, "-m", "evl", *flags, "--output", str(single)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    double.mkdir()
    (double / "backbone.safetensors").write_bytes((single / "backbone.safetensors").read_bytes())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "evl", *flags, "--output", str(double)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-1500:]}\n{done.stderr[:4000]}"
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["extracted_now"] for r in reports] == [8]  # one report, counting both processes' videos

    a, b = FeatureCache.open(single), FeatureCache.open(double)
    assert a.entries() == b.entries() and (a.status() == DONE).all() and (b.status() == DONE).all()
    for name in sorted(p.name for p in single.glob("block*.npy")):
        # Each clip runs through the backbone alone on CPUs, whatever process or batch it falls in.
        np.testing.assert_array_equal(np.load(single / name), np.load(double / name), err_msg=name)


def nccl_like(device: torch.device) -> DistEnv:
    """Rank 0 of two whose backend, like NCCL, takes tensors on ``device`` only."""
    return DistEnv(rank=0, world_size=2, backend="nccl", collective_device=device)


@needs_stand_in
def test_loss_average_hands_the_backend_tensors_on_its_device():
    with use_stand_in() as device, recording_world(device) as group:
        # What the training loop averages: the micro-batches' losses summed in float64 on the CPU.
        loss = torch.tensor(1.25, dtype=torch.float64)
        assert mean_over_processes(nccl_like(device), loss) == 1.25  # both ranks: 1.25
        assert loss.item() == 1.25  # the caller's tensor is left alone
        # A float32 loss already on the device: summed in float64 all the same.
        assert mean_over_processes(nccl_like(device), torch.tensor(0.5).to(device)) == 0.5
    assert group.received() == [Call("allreduce", device, torch.float64)] * 2


@pytest.mark.parametrize(
    ("other_rank", "expected"), [(lambda t: 3 * t, 2.5), (lambda t: torch.full_like(t, math.nan), math.nan)]
)
def test_loss_average_over_processes(other_rank, expected):
    # gloo: the CPU is the collective device. A non-finite loss on another rank reaches this one.
    with recording_world(CPU, peer=other_rank) as group:
        mean = mean_over_processes(DistEnv(rank=0, world_size=2), torch.tensor(1.25, dtype=torch.float64))
    assert mean == pytest.approx(expected, nan_ok=True)
    assert group.received() == [Call("allreduce", CPU, torch.float64)]


@needs_stand_in
def test_object_gather_and_barrier_stay_on_the_backend_device():
    scores = {"indices": [0, 2, 4], "failed": [("a.mp4", "bad header")]}
    with use_stand_in() as device, recording_world(device) as group:
        assert all_gather_objects(nccl_like(device), scores) == [scores, scores]
        barrier(nccl_like(device))
    assert {call.device for call in group.received()} == {device}
    assert Call("allgather", device, torch.uint8) in group.received()  # the pickled objects
    assert group.received("barrier") == [Call("barrier", device, None)]


def test_barrier_with_gloo_needs_no_device():
    with recording_world(CPU) as group:
        barrier(DistEnv(rank=0, world_size=2))
    assert group.received() == [Call("barrier", CPU, None)]


@needs_stand_in
def test_ddp_step_runs_its_collectives_on_the_backend_device():
    # A process of its own: running backward on the stand-in makes it that process's accelerator.
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(tests / "ddp_on_stand_in.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    device = "privateuseone:0"
    # Built: parameter shapes compared, parameters (and buffer) copied from rank 0.
    assert {"allgather", "broadcast"} <= {name for name, _, _ in report["construction"]}
    assert report["forward"] == []  # the constant buffer is not re-broadcast before every forward
    assert report["backward"] == [["allreduce", device, "torch.float32"]]  # the trained layers' gradients
    for name, on, _ in report["construction"] + report["backward"]:
        assert on == device, name
    assert report["grads_match"]
    assert report["grad_devices"] == [device]


def test_wrap_ddp_wants_the_model_on_the_collective_device():
    model = nn.Linear(3, 2)
    assert wrap_ddp(model, DistEnv()) is model  # one process: no DDP
    with pytest.raises(ValueError, match="cuda:1"):
        wrap_ddp(model, nccl_like(torch.device("cuda", 1)))
    with pytest.raises(ValueError, match="needs an index"):
        nccl_like(torch.device("cuda"))


def test_rank_seed_gives_each_process_its_own_dropout():
    seed, world = 17, 64
    seeds = [rank_seed(seed, DistEnv(rank=r, world_size=world)) for r in range(world)]
    assert seeds[0] == seed  # one process, or rank 0: the run's seed itself
    assert len(set(seeds)) == world
    assert seeds == [rank_seed(seed, DistEnv(rank=r, world_size=world)) for r in range(world)]
    assert all(0 <= s < 2**63 for s in seeds)
    # Not the next run's rank 0, nor another seed's rank 1.
    assert seeds[1] not in (seed + 1, rank_seed(seed + 1, DistEnv(rank=1, world_size=2)))

    def dropout_mask(rank: int) -> torch.Tensor:
        torch.manual_seed(rank_seed(seed, DistEnv(rank=rank, world_size=2)))
        return nn.functional.dropout(torch.ones(256), p=0.5)

    assert torch.equal(dropout_mask(0), dropout_mask(0))
    assert not torch.equal(dropout_mask(0), dropout_mask(1))
