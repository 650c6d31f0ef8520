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
