"""Time per TRL GRPO step: plain `GRPOTrainer` against `FlowGRPOTrainer` (online update off, on, on in chunks).

Usage:
    python benchmarks/bench_trl_overhead.py                     # CPU: a 23M-parameter Qwen2, 64-token completions
    python benchmarks/bench_trl_overhead.py --steps 8 --hidden 512

Each arm trains a fresh copy of the same random policy (word-level tokenizer built in code) for
``--steps`` steps with the same seed, prompts and rule-based reward (half the rollouts of each group
are correct); the flow is a random `VelocityField` of depth 4. The time of a step is read from
TRL's ``train_runtime`` split per step after the first (warm-up) step is excluded: each arm runs
``steps`` and ``1`` steps and the difference is divided by ``steps - 1``. Prints a table and appends
it to benchmarks/results/trl_overhead.csv (or --csv). Completions are sampled, so the arms see
different completion lengths; the table reports the mean completion length of each arm.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent


def main(argv: Optional[Sequence[str]] = None) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from benchmarks.common import append_csv, bench_parser, print_table
    from flowkern import FlowConfig, VelocityField
    from flowkern.integrations.trl import FlowGRPOTrainer

    parser = bench_parser(__doc__, "only cpu is supported here (TRL's use_cpu)", "trl_overhead.csv")
    parser.set_defaults(device="cpu")
    parser.add_argument("--hidden", type=int, default=384, help="policy hidden size (default 384: 23M parameters)")
    parser.add_argument("--layers", type=int, default=8, help="policy decoder layers")
    parser.add_argument("--completion", type=int, default=64, help="max completion tokens")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=8, help="rollouts per step (groups of 4)")
    args = parser.parse_args(argv)

    vocab = ["<pad>", "<unk>", "</s>"] + [f"w{i}" for i in range(4000)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=6, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in policy.parameters())
    prompts = [" ".join(f"w{(37 * i + 11 * j) % 4000}" for j in range(6)) for i in range(64)]
    flow_config = FlowConfig(depth=4, norm="minmax", threshold=0.6, topk=15, coef=0.01)
    torch.manual_seed(1)
    flow = VelocityField(args.hidden, 4)
    with torch.no_grad():
        for p in flow.parameters():
            p.normal_(0.0, 0.02)

    def reward(completions, **kwargs):
        return [float(i % 2 == 0) for i in range(len(completions))]

    arms = {"GRPOTrainer": {}, "FlowGRPOTrainer, update off": {"online_flow_update": False},
            "FlowGRPOTrainer, update on": {"online_flow_update": True},
            "FlowGRPOTrainer, update on, max_tokens=64": {"online_flow_update": True, "flow_update_max_tokens": 64}}

    def run(kwargs, steps):
        with tempfile.TemporaryDirectory() as out:
            grpo = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=4,
                              max_completion_length=args.completion, max_steps=steps, logging_steps=1,
                              report_to="none", use_cpu=True, seed=0, save_strategy="no", dataloader_num_workers=0,
                              disable_tqdm=True)
            common = dict(args=grpo, train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
            model = Qwen2ForCausalLM(config)
            model.load_state_dict(policy.state_dict())
            if kwargs:
                trainer = FlowGRPOTrainer(model, reward, flow=flow, flow_config=flow_config, **kwargs, **common)
            else:
                trainer = GRPOTrainer(model, reward, **common)
            t0 = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - t0
            lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
            return seconds, sum(lengths) / max(len(lengths), 1)

    rows = []
    for name, kwargs in arms.items():
        warm, _ = run(kwargs, 1)
        total, length = run(kwargs, args.steps + 1)
        rows.append({"arm": name, "policy_params_M": n_params / 1e6, "completion_max": args.completion,
                     "batch": args.batch, "s_per_step": (total - warm) / args.steps, "mean_completion_len": length})
    base = rows[0]["s_per_step"]
    for row in rows:
        row["vs_GRPOTrainer"] = row["s_per_step"] / base
    print_table(rows, f"TRL GRPO step time, {n_params / 1e6:.1f}M-parameter policy, CPU")
    path = append_csv(args.csv or ROOT / "benchmarks" / "results" / "trl_overhead.csv", rows, torch.device("cpu"))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
