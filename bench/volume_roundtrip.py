"""Checks `segtrain predict` on a real scan with readers that are not segtrain's (nibabel,
pynrrd): the scan is re-stored with permuted and flipped axes (NIfTI sform only, NIfTI qform
only, NRRD in LPS), each copy is predicted, and each label volume must carry its copy's affine
and, mapped back to the original voxel order, equal the label volume of the original scan
voxel for voxel. With a label volume it also reports Dice against it.

    python bench/volume_roundtrip.py SEGTRAIN MODEL SCAN.nii.gz OUT [--label L.nii.gz --values 37,38]

Needs numpy, nibabel and pynrrd (pip install nibabel pynrrd); not run by CI.
"""

import argparse
import pathlib
import subprocess
import sys

import nibabel as nib
import nrrd
import numpy as np

PERM, FLIP = (2, 0, 1), (True, False, True)  # new axis a = old axis PERM[a], reversed where FLIP[a]


def restore(data, affine):
    """The data and affine of the same voxels stored with PERM and FLIP."""
    new = np.transpose(data, PERM)
    m = np.zeros((4, 4))
    m[3, 3] = 1
    for a, old in enumerate(PERM):
        if FLIP[a]:
            new = np.flip(new, axis=a)
            m[old, a], m[old, 3] = -1, new.shape[a] - 1
        else:
            m[old, a] = 1
    return np.ascontiguousarray(new), affine @ m


def back(data):
    """The inverse of `restore` on the voxels."""
    for a in range(3):
        if FLIP[a]:
            data = np.flip(data, axis=a)
    return np.transpose(data, np.argsort(PERM))


def predict(segtrain, model, scan, out):
    subprocess.run([segtrain, "predict", "--model", model, str(scan), "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    name = scan.name.split(".")[0]
    return nib.load(out / f"{name}_seg.nii.gz")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("segtrain")
    p.add_argument("model")
    p.add_argument("scan", type=pathlib.Path)
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--label", type=pathlib.Path)
    p.add_argument("--values", default="")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    img = nib.load(a.scan)
    data, affine = np.asanyarray(img.dataobj).astype(np.float32), img.affine
    ref = predict(a.segtrain, a.model, a.scan, a.out / "original")
    assert ref.shape == img.shape[:3], (ref.shape, img.shape)
    assert np.allclose(ref.affine, affine, atol=1e-4), (ref.affine, affine)
    assert ref.header["sform_code"] == img.header["sform_code"]
    assert ref.header["qform_code"] == img.header["qform_code"]
    truth = np.asanyarray(ref.dataobj)
    print(f"original: {img.shape[:3]}, {int(truth.sum())} labelled voxels, affine kept")

    new, new_affine = restore(data, affine)
    copies = a.out / "copies"
    copies.mkdir(exist_ok=True)
    sform = nib.Nifti1Image(new, new_affine)
    sform.set_qform(None, code=0)
    sform.set_sform(new_affine, code=1)
    qform = nib.Nifti1Image(new, new_affine)
    qform.set_sform(None, code=0)
    qform.set_qform(new_affine, code=1)
    variants = [("sform", "permuted_sform.nii.gz", sform), ("qform", "permuted_qform.nii.gz", qform)]
    for _, file, image in variants:
        nib.save(image, copies / file)
    lps = np.diag([-1.0, -1.0, 1.0])
    directions = (lps @ new_affine[:3, :3]).T  # one row per voxel axis
    origin = lps @ new_affine[:3, 3]
    nrrd.write(str(copies / "permuted_lps.nrrd"), new, {
        "space": "left-posterior-superior",
        "space directions": directions,
        "space origin": origin,
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    })
    variants.append(("nrrd lps", "permuted_lps.nrrd", None))
    failed = False
    for what, file, _ in variants:
        seg = predict(a.segtrain, a.model, copies / file, a.out / what.replace(" ", "_"))
        same_affine = np.allclose(seg.affine, new_affine, atol=1e-3)
        same_voxels = np.array_equal(back(np.asanyarray(seg.dataobj)), truth)
        print(f"{what}: shape {seg.shape}, affine {'kept' if same_affine else 'DIFFERS'}, "
              f"labels {'equal to the original' if same_voxels else 'DIFFER'}")
        failed |= not (same_affine and same_voxels)

    if a.label:
        values = [int(v) for v in a.values.split(",") if v]
        lab = np.asanyarray(nib.load(a.label).dataobj)
        lab = np.isin(lab, values) if values else lab > 0
        pred = truth > 0
        dice = 2 * (pred & lab).sum() / max(pred.sum() + lab.sum(), 1)
        print(f"Dice against {a.label.name} (values {values or 'non-zero'}): {dice:.4f}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
