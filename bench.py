"""Benchmark (a script, not a test): seconds per training step and peak memory of each method on CPU or CUDA.

    python bench.py --backbone ViT-B/16 --classes 100 --batch-size 32 --methods coop,vpt_deep,upt
Real weights are not needed: --random-init builds the official architecture with random weights (same speed).
CUDA timings use CUDA events after synchronize; warm-up steps are excluded.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import clip_model
import train

ARCHITECTURES = {  # official layouts for --random-init: CLIP(embed, resolution, vision layers, vision width, patch, ...)
    "ViT-B/16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
    "ViT-B/32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
    "RN50": (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--random-init", action="store_true", help=f"random weights; one of {', '.join(ARCHITECTURES)}")
    p.add_argument("--methods", default="coop,cocoop,vpt_shallow,vpt_deep,upt,linear_ft")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="amp", choices=["amp", "fp32"])
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    autocast, scaler, precision = train.setup_precision(args.precision, device)
    if args.random_init:
        clip = clip_model.CLIP(*ARCHITECTURES[args.backbone]).eval().to(device)
    else:
        clip, _ = clip_model.load(args.backbone, device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__} | {name} | {precision} | {args.backbone} | K={args.classes} | batch {args.batch_size}")
    classnames = [f"class name {i}" for i in range(args.classes)]  # 3-4 BPE tokens, like most datasets' names
    res = clip.visual.input_resolution
    for method in args.methods.split(","):
        margs = train.parse_args(["--method", method, "--dataset", "bench"])
        batch = 1 if method == "cocoop" and args.batch_size > 1 and device == "cpu" else args.batch_size
        model = train.build_method(margs, clip, classnames).to(device)
        model.train()
        clip.eval()
        optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-3, momentum=0.9)
        images = torch.randn(batch, 3, res, res, device=device)
        labels = torch.randint(0, args.classes, (batch,), device=device)

        def step():
            with autocast:
                loss = F.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        for _ in range(args.warmup):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                step()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1000 / args.steps
            memory = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB"
        else:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds, memory = (time.perf_counter() - t0) / args.steps, "n/a"
        print(f"{method:12s} batch {batch:3d} | {seconds * 1000:8.1f} ms/step | {batch / seconds:8.1f} img/s | peak {memory}")


if __name__ == "__main__":
    main()
