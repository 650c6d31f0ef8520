# segtrain recipes (https://github.com/casey/just)

# train the default experiment on generated data (no download)
demo:
    cargo run --release -- train models/unet-dice-focal.toml --overwrite

# the test suite, as CI runs it
test:
    cargo test --release

# formatting and lints, as CI runs them
lint:
    cargo fmt --all -- --check
    cargo clippy --release --all-targets -- -D warnings

# everything CI runs
ci:
    bash .ci/run

# study 1 (README): imbalance — six losses on synthetic lesions with ~1 % foreground, 3 seeds
study-imbalance:
    cargo run --release -- compare models/unet-bce.toml models/unet-focal.toml models/unet-dice.toml models/unet-dice-focal.toml models/unet-tversky.toml models/unet-focal-tversky.toml --seeds 3 --set data.root=data/lesion-96-fg1 --set data.image_size=96 --set data.synth.size=96 --set data.synth.count=160 --set data.synth.foreground=0.01 --set train.epochs=8 --out runs/study-imbalance

# study 2 (README): label noise — CE vs focal vs focal with p_floor, clean and 30 % noisy masks, 2 seeds
study-noise:
    for noise in 0 0.3; do cargo run --release -- compare models/unet-bce.toml models/unet-focal.toml models/unet-focal-pfloor.toml --seeds 2 --set data.root=data/lesion-96-noise$noise --set data.image_size=96 --set data.synth.size=96 --set data.synth.count=160 --set data.synth.val_count=32 --set data.synth.foreground=0.05 --set data.synth.label_noise=$noise --set train.epochs=6 --out runs/study-noise-$noise; done

# compile check of the CUDA build without a GPU (CUDA from PyPI, a link-only libcuda stub);
# cold ~25 min on 2 cores; `just check-cuda cuda cudnn` checks cuDNN too
check-cuda *features="cuda":
    bash .ci/check-cuda {{features}}

# real brain MRI from Debian's mricron-data (BSD-3; needs apt-get): the Colin27 T1 scan with the
# hippocampus (AAL atlas regions 37 + 38) as the lesion stand-in, on the 40 axial slices that
# hold it; validation = two blocks of 4 neighbouring slices (z 52-55, 72-75), not interleaved;
# context=K: each slice stacked with its K neighbours on each side (2.5-D, import --context K)
data-brain out="data/brain-hippocampus" context="0":
    #!/usr/bin/env bash
    set -euo pipefail
    tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download mricron-data && dpkg -x mricron-data_*.deb x)
    t="$tmp/x/usr/share/mricron/templates"
    cargo run --release -- import --image "$t/ch2.nii.gz" --label "$t/aal.nii.gz" \
        --label-map 37=1,38=1 --only-labelled --context {{context}} --out "$tmp/slices"
    rm -rf "{{out}}"
    for f in "$tmp"/slices/images/*.png; do
        b=$(basename "$f"); z=$((10#${b:5:4}))
        if (( (z >= 52 && z <= 55) || (z >= 72 && z <= 75) )); then s=val; else s=train; fi
        mkdir -p "{{out}}/$s/images" "{{out}}/$s/masks"
        cp "$f" "{{out}}/$s/images/"; cp "$tmp/slices/masks/$b" "{{out}}/$s/masks/"
    done
    for s in train val; do cp "$tmp/slices/import.json" "{{out}}/$s/"; done
    echo "{{out}}: $(ls "{{out}}/train/images" | wc -l) training and $(ls "{{out}}/val/images" | wc -l) validation slices"
