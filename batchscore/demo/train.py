"""Builds the demo checkpoint and samples shipped in batchscore/demo/.

    python -m batchscore.demo.train          # ~2 min on 2 CPU cores; rewrites checkpoint/ and samples/

A tiny ViT (4 layers, width 64, patch 4, 32x32 RGB input) trained on scikit-learn's digits
(1,797 real 8x8 scans of handwritten digits) rendered as 32x32 RGB images. 80% train; the
other 20% become the sample images (PNG and JPEG) with their true labels in labels.csv, so
the demo's accuracy is measured on images the model never saw. The checkpoint is a plain
Hugging Face one: config.json with id2label, preprocessor_config.json, model.safetensors.
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent
SIZE = 32
SEED = 0


def render(digit_8x8: np.ndarray, colour: tuple[int, int, int]) -> Image.Image:
    """An 8x8 digit (values 0..16) as a 32x32 RGB image: coloured ink on a dark background."""
    grey = Image.fromarray((digit_8x8 * (255 / 16)).astype(np.uint8), mode="L").resize((SIZE, SIZE),
                                                                                         Image.BILINEAR)
    ink = np.asarray(grey, dtype=np.float32)[..., None] / 255.0
    rgb = ink * np.array(colour, dtype=np.float32) + (1 - ink) * 20.0
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), mode="RGB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)

    # lazy: torch, scikit-learn and transformers for the training only, not for --help
    import torch
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    digits = load_digits()
    order = rng.permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    colours = rng.integers(120, 256, size=(len(order), 3))
    images = [render(digits.images[i], tuple(colours[i])) for i in range(len(order))]

    def tensor(idx):
        arr = np.stack([np.asarray(images[i]) for i in idx]).astype(np.float32) / 255.0
        return (torch.from_numpy(arr).permute(0, 3, 1, 2) - 0.5) / 0.5

    train_idx, test_idx = order[:n_train], order[n_train:]
    x_train, y_train = tensor(train_idx), torch.from_numpy(digits.target[train_idx])
    x_test, y_test = tensor(test_idx), torch.from_numpy(digits.target[test_idx])

    labels = {i: str(i) for i in range(10)}
    config = ViTConfig(image_size=SIZE, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    model = ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * ((len(train_idx) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train_idx))
        for start in range(0, len(perm), 64):
            b = perm[start:start + 64]
            x = x_train[b]
            # Shift by up to 2 pixels so the model does not rely on exact placement.
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y_train[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 10 == 9 or epoch == args.epochs - 1:
            model.eval()
            with torch.no_grad():
                acc = (model(pixel_values=x_test).logits.argmax(-1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}")

    ckpt, samples = args.out / "checkpoint", args.out / "samples"
    for d in (ckpt, samples):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    model.eval()
    model.save_pretrained(ckpt, safe_serialization=True)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, resample=Image.BILINEAR, image_mean=[0.5] * 3,
                      image_std=[0.5] * 3).save_pretrained(ckpt)
    with open(samples / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label"])
        for n, i in enumerate(test_idx):
            name = f"digit-{n:04d}." + ("jpg" if n % 4 == 3 else "png")
            if name.endswith(".jpg"):
                images[i].save(samples / name, quality=95)
            else:
                images[i].save(samples / name)
            w.writerow([name, int(digits.target[i])])
    print(f"wrote {ckpt} and {len(test_idx)} samples to {samples}")


if __name__ == "__main__":
    main()
