"""DDP on CPU (gloo), two processes: replicas stay bit-identical, a DDP step equals the
single-process step on the same global batch, sharded evaluation equals the single-process number,
and the training entry point runs under ``torchrun``."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from posemb.lab.data import RandomWindows, evaluation_chunks
from posemb.lab.evaluate import lm_loss_at_length
from posemb.lab.train import ModelConfig, TrainConfig, build_model, parameter_digest, train_model

MODEL = ModelConfig(dim=32, depth=1, heads=2)
TRAIN = TrainConfig(train_length=16, batch_size=4, steps=4, lr=3e-3, warmup_steps=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data() -> torch.Tensor:
    return torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, world_size: int, port: int, out_dir: str, scheme: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        data = _data()
        # Different initial weights per rank on purpose: DDP must broadcast rank 0's.
        model = build_model(scheme, MODEL, TRAIN.train_length, seed=rank)
        checkpoint = Path(out_dir) / "ckpt.pt"
        result = train_model(model, RandomWindows(data, TRAIN.train_length, TRAIN.batch_size, seed=0), TRAIN,
                             checkpoint_path=checkpoint, progress=False)
        chunks = evaluation_chunks(data, 384, 16)
        evaluation, _ = lm_loss_at_length(model, chunks, 16, batch_tokens=32)
        torch.save({"state": model.state_dict(), "digest": parameter_digest(model), "loss": evaluation["loss"],
                    "final_loss": result.final_loss}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("scheme", ["alibi", "learned"])
def test_two_gloo_replicas_stay_identical_and_match_one_process(tmp_path, scheme):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), scheme), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert rank0["digest"] == rank1["digest"]
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name
    # Sharded evaluation (each rank a share of the windows, all-reduced) gives one number.
    assert rank0["loss"] == rank1["loss"]

    # The same global batches in one process: the same model, up to the order of float sums.
    model = build_model(scheme, MODEL, TRAIN.train_length, seed=0)
    data = _data()
    train_model(model, RandomWindows(data, TRAIN.train_length, TRAIN.batch_size, seed=0), TRAIN, progress=False)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(rank0["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    single = lm_loss_at_length(model, evaluation_chunks(data, 384, 16), 16, batch_tokens=32)[0]["loss"]
    assert rank0["loss"] == pytest.approx(single, rel=1e-4)
    # Rank 0 wrote the checkpoint, at the final step.
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == TRAIN.steps


def test_batch_size_must_split_over_the_processes(monkeypatch):
    from posemb.lab import train as train_module
    from posemb.lab.distributed import DistInfo

    monkeypatch.setattr(train_module, "dist_info", lambda: DistInfo(rank=0, world_size=3))
    with pytest.raises(ValueError, match=r"batch_size \(4\) must be divisible by the number of DDP processes \(3\)"):
        train_model(build_model("nope", MODEL, 16), lambda step: None, TRAIN, progress=False)


@pytest.mark.slow
def test_training_entry_point_under_torchrun(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(400)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "posemb.lab.train", "--scheme", "alibi", "--data", str(corpus),
               "--steps", "3", "--train-length", "16", "--batch-size", "4", "--dim", "32", "--depth", "1",
               "--heads", "2", "--device", "cpu", "--threads", "1", "--no-progress",
               "--checkpoint", str(tmp_path / "alibi.pt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size=2" in done.stdout and "replicas_identical=True" in done.stdout
    assert torch.load(tmp_path / "alibi.pt", weights_only=True)["step"] == 3


@pytest.mark.slow
def test_the_study_under_torchrun_matches_one_process(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(40)))
    common = ["--data", str(corpus), "--schemes", "nope,alibi", "--steps", "3", "--train-length", "16",
              "--eval-lengths", "16,32", "--eval-tokens", "256", "--batch-size", "4", "--dim", "32", "--depth", "1",
              "--heads", "2", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "posemb.cli", "study", "--out", str(tmp_path / "ddp"), *common],
                         capture_output=True, text=True, timeout=180, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "posemb.cli", "study", "--out", str(tmp_path / "single"), *common],
                            capture_output=True, text=True, timeout=180, env=env)
    assert single.returncode == 0, single.stderr[-3000:]

    import csv

    def losses(name):
        with open(tmp_path / name / "results.csv", newline="") as handle:
            return {(r["scheme"], r["eval_length"]): float(r["loss"]) for r in csv.DictReader(handle)}

    a, b = losses("ddp"), losses("single")
    assert a.keys() == b.keys() and len(a) == 4
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert "DDP processes: 2" in (tmp_path / "ddp" / "report.md").read_text()
