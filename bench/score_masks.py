#!/usr/bin/env python3
"""Lesion-image Dice of `segtrain predict` masks: mean Dice over the images whose true mask
has a lesion, at native resolution; also the pooled Dice."""
import sys, glob, os
import numpy as np
from PIL import Image
pred_dir, data_dir = sys.argv[1], sys.argv[2]
scores, inter, total = [], 0, 0
for f in sorted(glob.glob(os.path.join(data_dir, "masks", "*.png"))):
    stem = os.path.splitext(os.path.basename(f))[0]
    t = np.asarray(Image.open(f)) > 0
    if t.ndim == 3:
        t = t.any(axis=2)
    p = np.asarray(Image.open(os.path.join(pred_dir, stem + "_mask.png"))) > 0
    inter += (p & t).sum(); total += p.sum() + t.sum()
    if t.any():
        scores.append(2 * (p & t).sum() / (p.sum() + t.sum()))
print(f"lesion-image Dice {np.mean(scores):.4f} over {len(scores)} images; pooled Dice {2 * inter / max(total, 1):.4f}")
