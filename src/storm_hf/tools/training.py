"""Train small backbones on CIFAR-10 from scratch and write a complete Hugging Face folder.

The whole split is decoded once into a uint8 tensor that lives on the training device; augmentation (random
crop with zero padding + horizontal flip) runs batched there, so no DataLoader workers or torchvision are
needed and a small model is not starved by JPEG decoding. Accelerate handles the device, bf16 autocast and
multi-GPU launches (`accelerate launch scripts/train.py ...`); each process takes its slice of every batch.

Presets live in `configs/cifar10/<name>.json`:
`{"arch": "vmamba" | "plainmamba" | "vim" | "groupmamba" | "vit", "model": {config kwargs}, "training": {...}}`.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .hub import count_params

CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
STORM_ARCHS = ("vmamba", "plainmamba", "vim", "groupmamba")
REFERENCE_ARCHS = ("vit",)
ARCH_TITLES = {
    "vmamba": "VMamba", "plainmamba": "PlainMamba", "vim": "Vision Mamba (Vim)", "groupmamba": "GroupMamba",
    "vit": "ViT (transformers' ViTForImageClassification, the attention reference)",
}
# Parameters that are not weight-decayed besides every 1-D one (norms, biases): SSM dynamics (by parameter
# name) and tokens/embeddings added to the sequence (by substring of the full name).
NO_DECAY_NAMES = ("A_log", "A_logs", "A_b_log", "Ds", "D", "D_b", "skip_scale", "dt_bias", "dt_projs_bias",
                  "direction_Bs")
NO_DECAY_SUBSTRINGS = ("pos_embed", "position_embeddings", "cls_token")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """`../shared/data/cifar10` when it exists (the dev machine), else the git-ignored `.data/cifar10`."""
    shared = Path("../shared/data/cifar10")
    return shared if shared.is_dir() else Path(".data/cifar10")


def split_files(data_dir: Union[str, Path], split: str) -> list[Path]:
    """The parquet shards of a split: `train-*.parquet` / `test*.parquet`, sorted."""
    data_dir = Path(data_dir)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    files = sorted(data_dir.glob(f"{split}-*.parquet")) + sorted(data_dir.glob(f"{split}.parquet"))
    if not files:
        raise FileNotFoundError(
            f"No CIFAR-10 {split} shards ({split}-*.parquet or {split}.parquet) in {data_dir.resolve()}. "
            "Pass --data-dir pointing at the folder of the parquet files (see /work/shared/data/cifar10/README.md)."
        )
    return files


def _decode_image(data: bytes, where: str):
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as err:  # PIL raises several types for corrupt data
        raise ValueError(f"{where}: the image bytes are not a readable image ({err}).") from err
    if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"{where}: expected a {IMAGE_SIZE}x{IMAGE_SIZE} RGB image, got shape {array.shape}.")
    return array


def load_split(
    data_dir: Union[str, Path], split: str, limit: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode a CIFAR-10 split once: (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    Reads the Hugging Face parquet layout (`image` = struct of JPEG `bytes` and `path`, `label` = int).
    `limit` keeps that many rows evenly spaced over the split (`data.subset_indices`: the test split is
    class-sorted, so its first rows would all be airplanes), for smoke runs.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from .data import subset_indices

    blobs, labels, where = [], [], []
    for path in split_files(data_dir, split):
        table = pq.read_table(path)
        if "image" not in table.column_names or "label" not in table.column_names:
            raise ValueError(
                f"{path} has columns {table.column_names}; a CIFAR-10 shard needs 'image' (with JPEG 'bytes') "
                "and 'label'."
            )
        try:
            blobs.extend(table.column("image").combine_chunks().field("bytes").to_pylist())
        except (KeyError, AttributeError, TypeError) as err:
            raise ValueError(f"{path}: the 'image' column must be a struct with a 'bytes' field.") from err
        labels.extend(table.column("label").to_pylist())
        where.extend((path.name, row) for row in range(table.num_rows))
    if not labels:
        raise ValueError(f"The CIFAR-10 {split} split in {data_dir} is empty.")
    keep = subset_indices(len(labels), limit)
    label_tensor = torch.tensor([labels[i] for i in keep], dtype=torch.int64)
    if label_tensor.min() < 0 or label_tensor.max() >= len(CIFAR10_LABELS):
        raise ValueError(
            f"CIFAR-10 labels must lie in 0..{len(CIFAR10_LABELS) - 1}, "
            f"found {label_tensor.min()}..{label_tensor.max()}."
        )
    images = [_decode_image(blobs[i], "{} row {}".format(*where[i])) for i in keep]
    image_tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return image_tensor, label_tensor


# --------------------------------------------------------------------------------------------------
# augmentation and normalization (batched, on any device)
# --------------------------------------------------------------------------------------------------


def crop_flip(
    images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int = 4
) -> torch.Tensor:
    """Crop each zero-padded image at (top, left) of the padded frame, mirrored where `flip` is True.

    images: (B, C, H, W) of any dtype; top/left: (B,) ints in [0, 2*padding]; flip: (B,) bool. Same shape out.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    device = images.device
    rows = top.to(device)[:, None] + torch.arange(height, device=device)  # (B, H)
    cols = left.to(device)[:, None] + torch.arange(width, device=device)  # (B, W)
    cols = torch.where(flip.to(device)[:, None], cols.flip(1), cols)
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: a random crop of the 4-pixel zero-padded image and a random horizontal flip.

    The draws come from `generator` (on the images' device), so a seeded generator gives the same batch.
    """
    batch = images.shape[0]
    device = images.device
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return crop_flip(images, top, left, flip, padding)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 scaled to [0, 1] and standardized with the CIFAR-10 mean/std."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def cifar10_image_processor():
    """The inference preprocessing matching `normalize`: no resize of 32x32 inputs, CIFAR-10 mean/std."""
    from transformers.models.convnext import ConvNextImageProcessorPil

    # ConvNeXt's processor resizes the short side to size/crop_pct then center-crops to size: with
    # crop_pct=1 and size 32 a 32x32 image passes unchanged; larger photos are shrunk to 32x32.
    return ConvNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_pct=1.0, resample=2,
        image_mean=list(CIFAR10_MEAN), image_std=list(CIFAR10_STD),
    )


# --------------------------------------------------------------------------------------------------
# presets and models
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingConfig:
    """Hyper-parameters of one run (the preset's "training" section, then command-line overrides)."""

    epochs: int = 50
    batch_size: int = 512
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr_ratio: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 5.0
    betas: tuple[float, float] = (0.9, 0.999)
    eval_batch_size: int = 1000
    padding: int = 4
    seed: int = 0
    mixed_precision: str = "bf16"
    compile: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any], **overrides: Any) -> "TrainingConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        merged = {**values, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - fields)
        if unknown:
            raise ValueError(f"Unknown training option(s) {unknown}; valid options: {sorted(fields)}.")
        config = cls(**merged)
        config.betas = tuple(float(b) for b in config.betas)
        config.check()
        return config

    def check(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("epochs, batch_size and eval_batch_size must be positive integers.")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be positive; weight_decay and warmup_epochs must be >= 0.")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("min_lr_ratio must lie in [0, 1] and label_smoothing in [0, 1).")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")


def presets_dir() -> Path:
    from .presets import configs_dir

    return configs_dir() / "cifar10"


def load_preset(name_or_path: Union[str, Path]) -> dict[str, Any]:
    """A CIFAR-10 preset by name (`configs/cifar10/<name>.json`) or by path, validated."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        path = presets_dir() / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in presets_dir().glob("*.json")) if presets_dir().is_dir() else []
        raise ValueError(
            f"Unknown CIFAR-10 preset {str(name_or_path)!r}; known presets: {', '.join(known) or 'none'}."
        )
    preset = json.loads(path.read_text())
    check_preset(preset, str(path))
    return preset


def check_preset(preset: dict[str, Any], where: str = "preset") -> None:
    missing = [k for k in ("arch", "model", "training") if k not in preset]
    if missing:
        raise ValueError(f"{where} lacks {missing}; a CIFAR-10 preset has 'arch', 'model' and 'training' keys.")
    if preset["arch"] not in STORM_ARCHS + REFERENCE_ARCHS:
        raise ValueError(f"{where}: unknown arch {preset['arch']!r}; choose one of {STORM_ARCHS + REFERENCE_ARCHS}.")
    TrainingConfig.from_dict(preset["training"])


def build_model(preset: dict[str, Any]) -> nn.Module:
    """A randomly initialised classifier for CIFAR-10's ten classes from a preset's "model" kwargs."""
    kwargs = dict(preset["model"])
    kwargs.update(
        num_labels=len(CIFAR10_LABELS),
        id2label=dict(enumerate(CIFAR10_LABELS)),
        label2id={name: i for i, name in enumerate(CIFAR10_LABELS)},
    )
    if preset["arch"] == "vit":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(**kwargs))
    from .archs import get_arch

    spec = get_arch(preset["arch"])
    return spec.classifier_cls(spec.config_cls(**kwargs))


def model_gflops(model: nn.Module, image_size: int = IMAGE_SIZE) -> float:
    """Forward GFLOPs at image_size (1 multiply-add = 1 FLOP): the backbone's analytic count for storm-hf
    models; for other models torch's FLOP counter (matmuls, convolutions, attention; norms not counted)."""
    if hasattr(model, "count_flops"):
        return model.count_flops((image_size, image_size)).gflops
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


# --------------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices/kernels only, never on norms, biases, SSM A/D/Δ-bias, embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = param.ndim <= 1 or leaf in NO_DECAY_NAMES or any(key in name for key in NO_DECAY_SUBSTRINGS)
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """LR multiplier: linear warm-up from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio`.

    `total_steps` may be lowered during training (time budget); the warm-up part does not depend on it.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> None:
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    model: nn.Module
    history: list[dict[str, float]]
    test_accuracy: float
    output_dir: Optional[Path]


@dataclasses.dataclass
class _Run:
    """What one epoch needs: the prepared objects, the on-device data and the random streams."""

    accelerator: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cfg: TrainingConfig
    train_images: torch.Tensor
    train_labels: torch.Tensor
    augment_rng: torch.Generator  # crops and flips, per process
    shuffle_rng: torch.Generator  # epoch order, identical on every process

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_labels) // self.cfg.batch_size


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int, accelerator) -> float:
    """Top-1 accuracy over this process's share (rows rank::world) of the split, summed over processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = torch.arange(rank, len(labels), world, device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=accelerator.device)
    for start in range(0, len(mine), batch_size):
        index = mine[start:start + batch_size]
        logits = model(pixel_values=normalize(images[index])).logits
        correct += (logits.argmax(-1) == labels[index]).sum()
    total = accelerator.reduce(correct, reduction="sum")
    return total.item() / len(labels)


def _train_epoch(run: _Run, description: str) -> dict[str, float]:
    """One pass over the shuffled training set (last partial batch dropped); returns loss, accuracy, timings."""
    from tqdm.auto import tqdm

    accelerator, model, cfg = run.accelerator, run.model, run.cfg
    device, steps = accelerator.device, run.steps_per_epoch
    per_process = cfg.batch_size // accelerator.num_processes
    offset = accelerator.process_index * per_process
    model.train()
    _synchronize(device)
    start = time.perf_counter()
    warm_step = min(3, steps - 1)  # steps before it carry one-off costs (compilation, autotuning)
    warm_time = start
    order = torch.randperm(len(run.train_labels), generator=run.shuffle_rng).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bar = tqdm(range(steps), desc=description, leave=False, disable=not accelerator.is_local_main_process)
    for step in bar:
        if step == warm_step:
            _synchronize(device)
            warm_time = time.perf_counter()
        index = order[step * cfg.batch_size + offset:][:per_process]
        images = normalize(random_crop_flip(run.train_images[index], run.augment_rng, cfg.padding))
        labels = run.train_labels[index]
        logits = model(pixel_values=images).logits
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.detach().argmax(-1) == labels).sum()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
    _synchronize(device)
    seconds = time.perf_counter() - start
    seen = steps * cfg.batch_size
    return {
        "train_loss": accelerator.reduce(loss_sum, reduction="mean").item() / steps,
        "train_accuracy": accelerator.reduce(correct, reduction="sum").item() / seen,
        "train_seconds": seconds,
        "train_images_per_second": seen / seconds,
        # per-epoch time without the first steps' one-off costs, for the time budget
        "steady_train_seconds": (start + seconds - warm_time) * steps / (steps - warm_step),
    }


def train(
    preset: dict[str, Any],
    *,
    data_dir: Union[str, Path, None] = None,
    output_dir: Union[str, Path, None] = None,
    overrides: Optional[dict[str, Any]] = None,
    time_budget_minutes: Optional[float] = None,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    cpu: bool = False,
    command: str = "",
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train a preset on CIFAR-10, evaluate on the test split every epoch, save an HF folder to `output_dir`.

    `time_budget_minutes` (training loop only, data decoding excluded) shortens the run after the first epoch
    if the planned epochs would not fit: the cosine part of the schedule is rescaled, the warm-up is unchanged.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    check_preset(preset)
    cfg = TrainingConfig.from_dict(preset["training"], **(overrides or {}))
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    device, world = accelerator.device, accelerator.num_processes
    log = log if accelerator.is_main_process else (lambda *_: None)
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world}).")
    set_seed(cfg.seed)

    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    start = time.perf_counter()
    train_images, train_labels = load_split(data_dir, "train", limit_train)
    test_images, test_labels = load_split(data_dir, "test", limit_test)
    log(f"decoded {len(train_labels)} train / {len(test_labels)} test images from {data_dir} "
        f"in {time.perf_counter() - start:.1f} s")
    if len(train_labels) < cfg.batch_size:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {len(train_labels)} training images; lower --batch-size."
        )
    test_images, test_labels = test_images.to(device), test_labels.to(device)

    model = build_model(preset).to(device)
    params, gflops = count_params(model), model_gflops(model)
    log(f"{preset['arch']}: {params / 1e6:.3f} M parameters, {gflops:.4f} GFLOPs at 32x32")
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda"
    )
    steps_per_epoch = len(train_labels) // cfg.batch_size
    schedule = WarmupCosine(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch), cfg.min_lr_ratio)
    # The scheduler stays outside accelerator.prepare: it steps once per global batch on every process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = _Run(
        accelerator, model, optimizer, scheduler, cfg, train_images.to(device), train_labels.to(device),
        augment_rng=torch.Generator(device=device).manual_seed(cfg.seed * 1000 + accelerator.process_index),
        shuffle_rng=torch.Generator().manual_seed(cfg.seed),
    )

    epochs, history = cfg.epochs, []
    run_start = time.perf_counter()
    while len(history) < epochs:
        epoch = len(history) + 1
        record = {"epoch": epoch, **_train_epoch(run, f"epoch {epoch}/{epochs}")}
        eval_start = time.perf_counter()
        record["test_accuracy"] = evaluate(model, test_images, test_labels, cfg.eval_batch_size, accelerator)
        record["eval_seconds"] = time.perf_counter() - eval_start
        record["lr"] = scheduler.get_last_lr()[0]
        history.append(record)
        log(f"epoch {epoch:3d}/{epochs}  loss {record['train_loss']:.4f}  "
            f"train {100 * record['train_accuracy']:5.2f}%  test {100 * record['test_accuracy']:5.2f}%  "
            f"{record['train_images_per_second']:8.0f} img/s  "
            f"{record['train_seconds']:6.1f} s train + {record['eval_seconds']:4.1f} s eval")
        if epoch == 1 and time_budget_minutes is not None:
            epochs = _fit_epochs(epochs, time.perf_counter() - run_start,
                                 record["steady_train_seconds"] + record["eval_seconds"], time_budget_minutes * 60)
            if epochs < cfg.epochs:
                schedule.total_steps = epochs * steps_per_epoch
                log(f"time budget {time_budget_minutes} min: training {epochs} epochs instead of {cfg.epochs}")
    log(f"done: {epochs} epochs in {(time.perf_counter() - run_start) / 60:.1f} min, "
        f"CIFAR-10 test top-1 {100 * history[-1]['test_accuracy']:.2f}%")

    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drop the autocast wrapper on forward
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    result = TrainResult(model=model, history=history, test_accuracy=history[-1]["test_accuracy"], output_dir=None)
    if output_dir is not None and accelerator.is_main_process:
        card = {
            "arch": preset["arch"],
            "arch_title": ARCH_TITLES[preset["arch"]],
            "gflops": f"{gflops:.4f}",
            "top1": f"{100 * result.test_accuracy:.2f} %",
            "test_images": f"{len(test_labels):,}",
            "epochs": str(epochs),
            "hyperparameters": _hyperparameter_summary(cfg),
            "command": command or "(library call)",
            "device": _device_name(device, world),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        }
        # A copy: saving casts to fp16, and the returned model stays the trained fp32 one.
        result.output_dir = save_cifar10_folder(copy.deepcopy(model).float().cpu(), output_dir, card_fields=card)
        log_payload = {"preset": preset, "training": dataclasses.asdict(cfg), "epochs_run": epochs,
                       "params": params, "gflops": gflops, "history": history, "command": command}
        (result.output_dir / "train_log.json").write_text(json.dumps(log_payload, indent=2))
        log(f"saved {result.output_dir}")
    accelerator.wait_for_everyone()
    return result


def _fit_epochs(planned: int, elapsed_s: float, epoch_s: float, budget_s: float) -> int:
    """How many epochs fit in the budget, given the time so far (one epoch done) and the per-epoch time."""
    affordable = 1 + int(max(0.0, budget_s - elapsed_s) // max(epoch_s, 1e-9))
    return max(1, min(planned, affordable))


def _hyperparameter_summary(cfg: TrainingConfig) -> str:
    return (
        f"batch {cfg.batch_size}, AdamW lr {cfg.lr:g} (betas {cfg.betas[0]:g}/{cfg.betas[1]:g}), weight decay "
        f"{cfg.weight_decay:g}, warm-up {cfg.warmup_epochs:g} epochs, cosine to {cfg.min_lr_ratio:g}x, label smoothing "
        f"{cfg.label_smoothing:g}, grad clip {cfg.grad_clip:g}, {cfg.mixed_precision}, seed {cfg.seed}"
    )


def _device_name(device: torch.device, world: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return f"{world}x {name}" if world > 1 else name


# --------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------


def save_cifar10_folder(model: nn.Module, output_dir: Union[str, Path], card_fields: dict[str, Any]) -> Path:
    """Config, fp16 safetensors, model code, a 32x32 CIFAR-10 preprocessor config and the cifar10 model card.

    storm-hf models go through `hub.save_model_folder` (which copies the model code); the transformers ViT
    reference is saved the same way by hand since it needs no remote code.
    """
    from .hub import model_card_template, save_model_folder

    output_dir = Path(output_dir)
    if getattr(model.config, "model_type", "").startswith("storm_"):
        fields = {**card_fields, "usage_note": (
            "Token reduction is off in this folder's config; switch it on without reloading the weights, e.g. "
            '`model.set_storm(method="storm_tome", flops_ratio=0.3)`.')}
        save_model_folder(model, output_dir, safe_dtype=torch.float16, card_fields=fields, card_template="cifar10",
                          image_processor=cifar10_image_processor())
    else:
        output_dir.mkdir(parents=True, exist_ok=True)
        model = model.to(torch.float16)
        model.save_pretrained(output_dir)
        fields = {
            "title": output_dir.name, "repo": f"<org>/{output_dir.name}",
            "params": f"{count_params(model) / 1e6:.2f} M", "storm": "n/a (not a storm-hf backbone)",
            "usage_note": "This is a plain transformers model (no remote code needed); it is the attention "
                          "baseline the vision Mambas are compared with.",
            **card_fields,
        }
        (output_dir / "README.md").write_text(model_card_template("cifar10").format(**fields))
        cifar10_image_processor().save_pretrained(output_dir)
    return output_dir
