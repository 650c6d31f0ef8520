"""PyTorch side of `segtrain bench`: the same U-Net, DiceFocal loss and AdamW step, one JSON
line per measurement, for side-by-side figures on the same machine.

    python bench/pytorch_bench.py [--batch 8 --size 128 --channels 3 --base-width 16 --depth 4
                                   --steps 20] [--infer | --loss]

Needs torch (pip install torch); --loss also uses torchvision and MONAI when installed.
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
from torch.nn.functional import max_pool2d, relu


class DoubleConv(nn.Module):
    def __init__(s, a, b):
        super().__init__()
        s.conv1, s.bn1 = nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        s.conv2, s.bn2 = nn.Conv2d(b, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)

    def forward(s, x):
        return relu(s.bn2(s.conv2(relu(s.bn1(s.conv1(x))))))


class Down(DoubleConv):
    def forward(s, x):
        return super().forward(max_pool2d(x, 2))


class Up(DoubleConv):
    def __init__(s, a, b):
        super().__init__(a, b)
        s.up = nn.ConvTranspose2d(a, a // 2, 2, stride=2)

    def forward(s, x, skip):
        return super().forward(torch.cat([skip, s.up(x)], 1))


class UNet(nn.Module):
    def __init__(s, in_ch, out_ch, f=16, d=4):
        super().__init__()
        s.d = d
        s.inc = DoubleConv(in_ch, f)
        for i in range(1, d + 1):
            setattr(s, f"down{i}", Down(f * 2 ** (i - 1), f * 2 ** i))
        for i in range(1, d + 1):
            a = f * 2 ** (d - i + 1)
            setattr(s, f"up{i}", Up(a, a // 2))
        s.head = nn.Conv2d(f, out_ch, 1)

    def forward(s, x):
        skips = [s.inc(x)]
        for i in range(1, s.d + 1):
            skips.append(getattr(s, f"down{i}")(skips[-1]))
        x = skips.pop()
        for i in range(1, s.d + 1):
            x = getattr(s, f"up{i}")(x, skips.pop())
        return s.head(x)


def dice_focal(logits, target):
    """MONAI DiceFocalLoss(sigmoid=True): per-image Dice (smooth 1e-5) + focal (γ 2, mean)."""
    try:
        from monai.losses import DiceFocalLoss

        return DiceFocalLoss(sigmoid=True)(logits, target)
    except ImportError:
        p = torch.sigmoid(logits)
        dims = (2, 3)
        inter = (p * target).sum(dims)
        dice = 1 - (2 * inter + 1e-5) / (p.sum(dims) + target.sum(dims) + 1e-5)
        ce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        return dice.mean() + (ce * (1 - p_t) ** 2).mean()


def timed(fn, steps, warmup=2):
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ms), min(ms)


def forward_flops(c, f, d, s):
    conv = lambda a, b, k, px: 2 * a * b * k * k * px
    fl = conv(c, f, 3, s * s) + conv(f, f, 3, s * s)
    for i in range(1, d + 1):
        side = s >> i
        fl += conv(f << (i - 1), f << i, 3, side * side) + conv(f << i, f << i, 3, side * side)
    for i in range(1, d + 1):
        a = f << (d - i + 1)
        side = s >> (d - i)
        fl += conv(a, a // 2, 3, side * side) + conv(a // 2, a // 2, 3, side * side)
        fl += conv(a, a // 2, 2, (side // 2) ** 2)
    return fl + conv(f, 1, 1, s * s)


def report(what, a, ms, flops_per_image, images=None, size=None):
    med, mn = ms
    images = a.batch if images is None else images
    print(json.dumps({
        "what": what, "kernels": "pytorch", "batch": a.batch, "size": size or a.size,
        "ms_median": med, "ms_min": mn, "images_per_second": images / (med / 1e3),
        "gflops": flops_per_image * images / (med / 1e3) / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--channels", type=int, default=3)
    ap.add_argument("--base-width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--infer", action="store_true")
    ap.add_argument("--loss", action="store_true")
    ap.add_argument("--sliding", type=int, metavar="SIDE",
                    help="MONAI sliding_window_inference of one SIDE x SIDE image (roi --size, "
                         "overlap 0.5, gaussian, sw_batch_size --batch)")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.loss:
        x = (torch.randn(a.batch, 1, a.size, a.size) * 2).requires_grad_()
        y = (torch.rand(a.batch, 1, a.size, a.size) < 0.02).float()
        try:
            from torchvision.ops import sigmoid_focal_loss
        except ImportError:
            sigmoid_focal_loss = None
        if sigmoid_focal_loss is not None:
            report("loss_focal", a, timed(lambda: sigmoid_focal_loss(x, y, reduction="mean").backward(), a.steps), 0)
        report("loss_dice_focal", a, timed(lambda: dice_focal(x, y).backward(), a.steps), 0)
        return
    net = UNet(a.channels, 1, a.base_width, a.depth)
    fl = forward_flops(a.channels, a.base_width, a.depth, a.size)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    if a.sliding:
        from monai.inferers import sliding_window_inference

        net.eval()
        image = torch.rand(1, a.channels, a.sliding, a.sliding)
        stride = a.size // 2
        windows = (-(-(a.sliding - a.size) // stride) + 1) ** 2

        def step():
            with torch.no_grad():
                torch.sigmoid(sliding_window_inference(image, (a.size, a.size), a.batch, net,
                                                       overlap=0.5, mode="gaussian"))

        report("sliding_window", a, timed(step, a.steps), fl * windows, images=1, size=a.sliding)
        return
    if a.infer:
        net.eval()

        def step():
            with torch.no_grad():
                net(x)

        report("inference", a, timed(step, a.steps), fl)
        return
    y = (torch.rand(a.batch, 1, a.size, a.size) < 0.05).float()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        dice_focal(net(x), y).backward()
        opt.step()

    report("train_step", a, timed(step, a.steps), 3 * fl)


if __name__ == "__main__":
    main()
