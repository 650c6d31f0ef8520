#!/usr/bin/env python3
"""Brightness-threshold baseline: the best single global threshold (chosen on the training
images), Dice on the validation images (pooled, and mean over images with a lesion)."""
import sys, glob, os
import numpy as np
from PIL import Image

def load(folder):
    out = []
    for f in sorted(glob.glob(os.path.join(folder, "images", "*.png"))):
        im = np.asarray(Image.open(f).convert("L"), dtype=np.float64)
        m = np.asarray(Image.open(os.path.join(folder, "masks", os.path.basename(f)))) > 0
        if m.ndim == 3:
            m = m.any(axis=2)
        out.append((im, m))
    return out

def dice(p, t):
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else 2 * (p & t).sum() / s

train, val = load(sys.argv[1]), load(sys.argv[2])
best = max(((t, sign) for t in range(0, 256, 2) for sign in (1, -1)),
           key=lambda ts: dice(np.concatenate([((im * ts[1]) > ts[0] * ts[1]).ravel() for im, _ in train]),
                               np.concatenate([m.ravel() for _, m in train])))
t, sign = best
preds = [((im * sign) > t * sign, m) for im, m in val]
pooled = dice(np.concatenate([p.ravel() for p, _ in preds]), np.concatenate([m.ravel() for _, m in preds]))
lesion = np.mean([dice(p, m) for p, m in preds if m.any()])
print(f"threshold {'>' if sign > 0 else '<'} {t}: pooled Dice {pooled:.3f}, lesion-image Dice {lesion:.3f}")
