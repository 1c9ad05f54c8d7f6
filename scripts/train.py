"""Train a CIFAR-10 preset from scratch and save a complete Hugging Face folder (weights, code, card).

    PYTHONPATH=src python scripts/train.py vmamba                         # configs/cifar10/vmamba.json
    PYTHONPATH=src python scripts/train.py vit --epochs 30 --time-budget-minutes 9
    PYTHONPATH=src accelerate launch scripts/train.py vmamba              # several GPUs

Prints per-epoch loss, train/test top-1, img/s and seconds per epoch; the logic is in
`storm_hf.tools.training`.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from storm_hf.tools.training import default_data_dir, load_preset, train


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a name in configs/cifar10/ (vmamba, plainmamba, vim, groupmamba, vit) "
                        "or the path of a preset .json")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"folder of the CIFAR-10 parquet shards (default: {default_data_dir()})")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where the HF folder goes (default: runs/cifar10/<preset>-cifar10)")
    parser.add_argument("--no-save", action="store_true", help="train and evaluate only")
    group = parser.add_argument_group("overrides of the preset's 'training' section")
    group.add_argument("--epochs", type=int)
    group.add_argument("--batch-size", type=int)
    group.add_argument("--lr", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--warmup-epochs", type=float)
    group.add_argument("--label-smoothing", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    group.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    parser.add_argument("--time-budget-minutes", type=float, default=None,
                        help="after epoch 1, cut the epochs so the training loop fits this many minutes")
    parser.add_argument("--limit-train", type=int, default=None, help="use only the first N training images")
    parser.add_argument("--limit-test", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = load_preset(args.preset)
    name = Path(args.preset).stem
    output_dir = None if args.no_save else (args.output_dir or Path("runs/cifar10") / f"{name}-cifar10")
    overrides = {
        key: getattr(args, key)
        for key in ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "seed",
                    "mixed_precision", "compile")
    }
    command = "PYTHONPATH=src python scripts/train.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    train(
        preset,
        data_dir=args.data_dir,
        output_dir=output_dir,
        overrides=overrides,
        time_budget_minutes=args.time_budget_minutes,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        cpu=args.cpu,
        command=command,
    )


if __name__ == "__main__":
    main()
