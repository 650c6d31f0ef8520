"""Checks `segtrain export --format onnx` with the ONNX reference tools (not run by CI):
`onnx.checker`, then ONNX Runtime against `segtrain predict --probabilities` on an image of the
model's own size (where `predict` neither resizes nor slides windows), and ONNX Runtime at
other sizes (multiples of 2^depth) for the output's shape and range.

    python bench/check_onnx.py SEGTRAIN RUN_DIR OUT_DIR

Needs numpy, pillow, onnx and onnxruntime (pip install onnx onnxruntime pillow).
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image


def main():
    segtrain, run, out = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    subprocess.run([segtrain, "export", "--run", str(run), "--format", "onnx", "--with-activation",
                    "--out", str(path)], check=True, stdout=subprocess.DEVNULL)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    if props["normalization_in_graph"] != "true":
        sys.exit("this model's normalisation (percentile clipping) is not in the graph: not checked here")
    window = json.loads(props["window"])
    side = window["whole"]["size"] if "whole" in window else window["sliding"]["patch"]
    channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    classes = int(props["classes"])
    print(f"onnx.checker: ok (opset {model.opset_import[0].version}); {channels} channel(s), "
          f"{classes} class(es), side {side}")

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
    pixels = pixels[:, :, 0] if channels == 1 else pixels
    image = out / "probe.png"
    Image.fromarray(pixels).save(image)
    subprocess.run([segtrain, "predict", "--model", str(run / "model.safetensors"), str(image),
                    "--out", str(out / "pred"), "--probabilities"], check=True, stdout=subprocess.DEVNULL)
    names = ["probe_prob.png"] if classes == 1 else [f"probe_prob_c{k}.png" for k in range(classes)]
    want = np.stack([np.asarray(Image.open(out / "pred" / n), np.float64) / 65535 for n in names])

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (pixels.astype(np.float32) / 255).reshape(side, side, -1).transpose(2, 0, 1)[None]
    got = session.run(None, {"image": np.ascontiguousarray(x)})[0][0]
    diff = np.abs(got - want).max()
    print(f"ONNX Runtime {ort.__version__} vs segtrain predict at {side}x{side}: largest difference {diff:.2e}")
    ok = diff <= 1 / 65535 + 1e-4

    step = int(props["input"].split("multiples of ")[1].split()[0].strip(";,"))
    for h, w in [(step, 3 * step), (2 * side, side + step)]:
        x = rng.random((2, channels, h, w), dtype=np.float32)
        y = session.run(None, {"image": x})[0]
        fine = y.shape == (2, classes, h, w) and np.isfinite(y).all() and y.min() >= 0 and y.max() <= 1
        print(f"ONNX Runtime at 2x{channels}x{h}x{w}: output {y.shape}, {'ok' if fine else 'WRONG'}")
        ok &= fine
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
