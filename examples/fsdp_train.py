"""Train KRAdapter sharded (accelerate, or torch's FSDP2/FSDP1 directly) and save an adapter PEFT loads.

The model is a small BERT classifier built from a config (no download). Every process builds it from the same seed
and takes its own equal slice of each global batch; the engine averages the gradients, so N processes take the
same steps as one process on the whole batch, and the saved adapter gives the same outputs.

    python examples/fsdp_train.py --out single/                                  # one process
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/fsdp_train.py --out fsdp2/   # GPUs
    accelerate launch --config_file examples/accelerate/multi_cpu.yaml examples/fsdp_train.py --out ddp/ # CPUs
    torchrun --nproc_per_node 2 examples/fsdp_train.py --engine fsdp2 --out fsdp2/    # FSDP2 on CPUs (gloo)
    torchrun --nproc_per_node 2 examples/fsdp_train.py --engine fsdp1 --out fsdp1/    # FSDP1 on CPUs (gloo)

Why two ways: accelerate 1.15 enables FSDP only on accelerator devices (GPU, XPU, NPU, ...); on CPUs its
launcher runs a data-parallel (DDP) job and ignores ``fsdp_config``. ``--engine fsdp2|fsdp1`` applies torch's own
sharding, which runs on CPUs with gloo, with the same training loop and the same saving calls accelerate makes.

Saving a sharded adapter: gather the full state dict first (FSDP shards every parameter, the adapter factors too;
saving the shards gives a folder PEFT cannot load), then let the unwrapped PEFT model pick its adapter and
``modules_to_save`` entries from it, on the main process only (the others hold an empty dict):
``if main: model.save_pretrained(out, state_dict=full)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.distributed as dist
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification
from transformers.models.bert.modeling_bert import BertLayer

from kradapter import KRAdapterConfig

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
ENGINES = ("accelerate", "fsdp2", "fsdp1")


def build_model(seed: int) -> BertForSequenceClassification:
    """A 2-block BERT with odd sizes (hidden 30, MLP 37, 3 classes) and no dropout, so runs are deterministic."""
    config = BertConfig(
        vocab_size=97,
        hidden_size=30,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def peft_model(seed: int) -> PeftModel:
    """KRAdapter on every attention and MLP linear layer; the classifier head trains too (``modules_to_save``)."""
    return get_peft_model(build_model(seed), KRAdapterConfig(task_type="SEQ_CLS", target_modules=TARGETS))


def batches(seed: int, steps: int, batch: int, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches in every process: token ids and labels from a seeded stream."""
    g = torch.Generator().manual_seed(seed + 1)
    return [
        (torch.randint(0, 97, (batch, length), generator=g), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(steps)
    ]


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[torch.Tensor], None],
    rank: int,
    world: int,
    args: argparse.Namespace,
    device: torch.device,
) -> list[float]:
    """The training loop every engine shares: this process's slice of each global batch; returns its losses."""
    share = args.batch // world
    losses = []
    model.train()
    for ids, labels in batches(args.seed, args.steps, args.batch, args.length):
        mine = slice(rank * share, (rank + 1) * share)
        loss = model(input_ids=ids[mine].to(device), labels=labels[mine].to(device)).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_accelerate(args: argparse.Namespace) -> tuple[dict, PeftModel, bool, dict]:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available()
    handlers = []
    if deepspeed and cpu:  # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu): accelerate picks no backend by itself
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    # cpu=True would make any engine DDP (accelerate's MULTI_CPU); DeepSpeed chooses its device itself.
    accelerator = Accelerator(cpu=cpu and not deepspeed, kwargs_handlers=handlers)
    check_batch(args.batch, accelerator.num_processes)
    if accelerator.state.deepspeed_plugin is not None:  # no DataLoader here to read the batch sizes from
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = args.batch // accelerator.num_processes
        ds_config["train_batch_size"] = args.batch
    model = peft_model(args.seed)
    optimizer = make_optimizer(model, args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)  # FSDP2 needs both in one call
    rank, world = accelerator.process_index, accelerator.num_processes
    losses = train(model, optimizer, accelerator.backward, rank, world, args, accelerator.device)
    state = accelerator.get_state_dict(model)  # full tensors (on the main process under FSDP)
    info = {"engine": "accelerate", "distributed_type": str(accelerator.distributed_type), "processes": world}
    info["losses_rank0"] = losses
    return state, accelerator.unwrap_model(model), accelerator.is_main_process, info


def run_torch_fsdp(args: argparse.Namespace) -> tuple[dict, PeftModel, bool, dict]:
    """FSDP2 (``fully_shard``) or FSDP1, each BertLayer one unit, then the root; gloo on CPU, NCCL on GPU."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    check_batch(args.batch, world)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    model = peft_model(args.seed).to(device)
    if args.engine == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():
            if isinstance(module, BertLayer):
                fully_shard(module)
        fully_shard(model)
        optimizer = make_optimizer(model, args.lr)  # after sharding: it must hold the sharded parameters
        losses = train(model, optimizer, lambda loss: loss.backward(), rank, world, args, device)
        # What accelerate's get_state_dict does under FSDP2: gather every DTensor to a full CPU tensor on rank 0.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        unwrapped = model
    else:
        import functools

        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: N817
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={BertLayer})
        # use_orig_params: frozen base weights and trainable factors share one FSDP unit.
        wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=device)
        optimizer = make_optimizer(wrapped, args.lr)
        losses = train(wrapped, optimizer, lambda loss: loss.backward(), rank, world, args, device)
        # offload_to_cpu only on GPUs: on CPU tensors it crashes (segfault) in torch 2.13's state_dict hook.
        config = FullStateDictConfig(offload_to_cpu=cuda, rank0_only=True)
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            state = wrapped.state_dict()
        # Not wrapped.module: its module names hold FSDP1's "_fsdp_wrapped_module." and PEFT 0.21 then matches
        # none of its adapter keys to the (clean) state dict keys and saves the head alone. A weightless copy of
        # the model on the meta device gives PEFT the clean names; the values come from the gathered state dict.
        with torch.device("meta"):
            unwrapped = peft_model(args.seed)
    info = {"engine": args.engine, "backend": dist.get_backend(), "processes": world, "losses_rank0": losses}
    return state, unwrapped, rank == 0, info


def check_batch(batch: int, world: int) -> None:
    if batch % world:
        raise SystemExit(f"error: --batch {batch} does not divide by {world} processes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the adapter (adapter_config.json + weights)")
    parser.add_argument("--engine", default="accelerate", choices=ENGINES)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="global batch; must divide by the process count")
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    run = run_accelerate if args.engine == "accelerate" else run_torch_fsdp
    state, unwrapped, main_process, info = run(args)
    if main_process:  # the gathered state dict lives on the main process only
        unwrapped.save_pretrained(args.out, state_dict=state)
        info["seconds"] = time.perf_counter() - start
        Path(args.out, "train_info.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
