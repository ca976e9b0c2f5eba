# Sourced by scripts/cpu_check.sh and scripts/gpu_check.sh: release binaries built here and
# carried to a machine without a Rust toolchain (in .dev/, which git ignores locally).

# stage_binaries CRATE PREFIX TEST...: kiln and CRATE's test binaries TEST..., stripped, as
# .dev/kiln and .dev/PREFIX-TEST.
stage_binaries() {
  local crate="$1" prefix="$2" out bin t
  shift 2
  cargo build --release --locked
  out="$(cargo test --release --locked -p "$crate" --no-run 2>&1)"
  mkdir -p .dev
  strip -o .dev/kiln target/release/kiln
  for t in "$@"; do
    bin="$(echo "$out" | grep -o "target/release/deps/$t-[0-9a-f]*" | head -1)"
    strip -o ".dev/$prefix-$t" "$bin"
  done
  grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
  ls -la .dev
}

# link_fixtures BINARY CRATE: a test binary finds the fixtures at the path it was built in
# (…/crates/CRATE/../../tests); where that path is missing, it is linked to this checkout.
link_fixtures() {
  local built
  built="$(strings "$1" | grep -o "/[^ ]*/crates/$2" | head -1)"
  if [ -n "$built" ] && [ ! -e "$built" ]; then
    mkdir -p "$(dirname "$(dirname "$(dirname "$built")")")"
    ln -sfn "$repo" "$(dirname "$(dirname "$built")")"
  fi
}
