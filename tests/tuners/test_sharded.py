"""Sharded training of KRAdapter with two processes (gloo on CPU): torch's FSDP2 and FSDP1, accelerate (DDP on
CPUs) and DeepSpeed ZeRO-3 (its CPU accelerator, when installed). Each saved adapter must load with
``PeftModel.from_pretrained`` and give the outputs of the same steps run plainly in one process.

The recipe under test is ``examples/fsdp_train.py``: this file runs its training loop in-process as the
single-process reference, and is itself the two-process worker for the torch engines (``torchrun`` runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests import support

pytestmark = pytest.mark.slow  # each test launches two processes: 50-240 s on a busy 2-core machine

ROOT = support.ROOT
EXAMPLE = support.EXAMPLES / "fsdp_train.py"
CONFIGS = support.EXAMPLES / "accelerate"
STEPS, BATCH, LENGTH, SEED = 4, 8, 11, 3
TOLERANCE = 1e-5  # float32: the engines sum gradients in another order than one process


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fsdp_train_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_args(out: Path, engine: str = "accelerate") -> list[str]:
    sizes = ["--steps", str(STEPS), "--batch", str(BATCH), "--length", str(LENGTH), "--seed", str(SEED)]
    return ["--out", str(out), "--engine", engine, *sizes]


def accelerate_launch(config: str, out: Path, **env: str) -> None:
    """The example under ``accelerate launch`` with a shipped config file."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config)]
    launch([*launcher, str(EXAMPLE), *example_args(out)], **env)


def launch(command: list[str], timeout: int = 600, **env: str) -> None:
    """Run a two-process launcher; the timeout leaves room for a busy machine (DeepSpeed took 240 s at load 8)."""
    done = subprocess.run(
        command, capture_output=True, text=True, env=support.child_env(**env), timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


@pytest.fixture(scope="module")
def example() -> ModuleType:
    pytest.importorskip("accelerate")
    return load_example()


@pytest.fixture(scope="module")
def reference(example: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same steps in one process, a plain PyTorch loop on the whole batch (no engine), saved by PEFT."""
    out = tmp_path_factory.mktemp("single") / "adapter"
    args = argparse.Namespace(seed=SEED, steps=STEPS, batch=BATCH, length=LENGTH, lr=1e-2)
    model = example.peft_model(SEED)
    optimizer = example.make_optimizer(model, args.lr)
    example.train(model, optimizer, lambda loss: loss.backward(), 0, 1, args, torch.device("cpu"))
    model.save_pretrained(out)
    return out


def outputs(example: ModuleType, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(example.build_model(SEED).eval(), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_adapter(example: ModuleType, got: Path, want: Path, generator: torch.Generator) -> float:
    """Same tensors (full shapes, not shards) and the same outputs on fresh inputs; returns the max output gap."""
    from safetensors.torch import load_file

    a, b = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=TOLERANCE, msg=key)
    ids = torch.randint(0, 97, (5, 13), generator=generator)
    reference_out, sharded_out = outputs(example, want, ids), outputs(example, got, ids)
    untrained = example.build_model(SEED).eval()
    with torch.no_grad():
        base_out = untrained(input_ids=ids).logits
    assert (reference_out - base_out).abs().max() > 100 * TOLERANCE  # the steps moved the model
    gap = float((sharded_out - reference_out).abs().max())
    assert gap < TOLERANCE, gap
    return gap


def test_torch_fsdp2_and_fsdp1_two_processes(example, reference, tmp_path, generator) -> None:
    """torchrun, 2 processes, gloo: FSDP2 (fully_shard) then FSDP1 (use_orig_params), in one process group."""
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path)])
    for engine in ("fsdp2", "fsdp1"):
        info = json.loads((tmp_path / engine / "train_info.json").read_text())
        assert info["processes"] == 2 and info["backend"] == "gloo"
        gap = assert_same_adapter(example, tmp_path / engine, reference, generator)
        print(f"{engine}: max |logits - single process| = {gap:.2e}")


def test_accelerate_launch_two_processes(example, reference, tmp_path, generator) -> None:
    """``accelerate launch`` with the shipped CPU config: two processes, gloo, accelerate's DDP."""
    out = tmp_path / "ddp"
    accelerate_launch("multi_cpu.yaml", out)
    info = json.loads((out / "train_info.json").read_text())
    assert info["processes"] == 2 and info["distributed_type"].endswith("MULTI_CPU")
    gap = assert_same_adapter(example, out, reference, generator)
    print(f"accelerate DDP: max |logits - single process| = {gap:.2e}")


def test_deepspeed_zero3_two_processes(example, reference, tmp_path, generator) -> None:
    """ZeRO-3 through accelerate on DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu), two processes."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (optional: see docs/sharded.md)")
    out = tmp_path / "zero3"
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    accelerate_launch("deepspeed_zero3.yaml", out, **env)
    info = json.loads((out / "train_info.json").read_text())
    assert info["processes"] == 2 and info["distributed_type"].endswith("DEEPSPEED")
    gap = assert_same_adapter(example, out, reference, generator)
    print(f"DeepSpeed ZeRO-3: max |logits - single process| = {gap:.2e}")


def worker(out: Path) -> None:
    """Two-process body for torchrun: train and save with FSDP2, then FSDP1, in one process group."""
    import torch.distributed as dist

    example = load_example()
    torch.set_num_threads(1)
    for engine in ("fsdp2", "fsdp1"):
        parser = argparse.Namespace(
            out=str(out / engine), engine=engine, steps=STEPS, batch=BATCH, length=LENGTH, lr=1e-2, seed=SEED
        )
        state, unwrapped, main_process, info = example.run_torch_fsdp(parser)
        if main_process:
            unwrapped.save_pretrained(parser.out, state_dict=state)
            Path(parser.out, "train_info.json").write_text(json.dumps(info))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    worker(Path(sys.argv[1]))
