#!/usr/bin/env bash
# Checks that every vendored crate is exactly its crates.io release with the changes
# vendor/README.md describes — the listed paths removed, then the listed patches of
# vendor/patches applied in order — and nothing else: an edit made in vendor/ without a patch
# file, or a patch file no crate uses, fails here.
#
# Each release's .crate is taken from Cargo's download cache when it is there, else from
# static.crates.io; either way its sha256 must be the one pinned below (the crates.io index's
# `cksum`). It is unpacked into a temporary directory, trimmed, patched (`patch -p1`, failing on
# any rejected hunk), and compared with the tree in vendor/ by `diff -r`.
#
#   vendor/check.sh    # exit 0: every tree matches; 1: a difference (printed); 2: cannot check
#
# After changing a vendored crate (vendor/README.md, "Updating"), update its line below.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

work=$(mktemp -d "${TMPDIR:-/tmp}/stormgate-vendor-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0
used_patches=()

# fetch NAME VERSION SHA256: prints the path of the verified .crate, or exits 2.
fetch() {
  local name=$1 version=$2 sha=$3 file
  for file in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"$name-$version.crate"; do
    if [[ -f $file ]] && sha256sum --quiet --check <<<"$sha  $file" 2>/dev/null; then
      printf '%s\n' "$file"
      return
    fi
  done
  file=$work/$name-$version.crate
  if ! curl --silent --show-error --fail --location --retry 3 --output "$file" \
    "https://static.crates.io/crates/$name/$name-$version.crate"; then
    echo "vendor/check.sh: cannot download $name $version from static.crates.io" >&2
    exit 2
  fi
  if ! sha256sum --quiet --check <<<"$sha  $file"; then
    echo "vendor/check.sh: $name $version from static.crates.io is not the release pinned here" >&2
    exit 2
  fi
  printf '%s\n' "$file"
}

# check DIR NAME VERSION SHA256 REMOVED PATCHES: vendor/DIR against the release, REMOVED
# (space-separated paths) taken out, PATCHES (space-separated files of vendor/patches) applied.
check() {
  local dir=$1 name=$2 version=$3 sha=$4 removed=$5 patches=$6 crate path p
  crate=$(fetch "$name" "$version" "$sha")
  tar -xzf "$crate" -C "$work"
  local tree=$work/$name-$version
  for path in $removed; do
    rm -rf "${tree:?}/$path"
  done
  for p in $patches; do
    used_patches+=("$p")
    if ! patch --quiet --batch --forward -p1 -d "$tree" <"patches/$p" >"$work/patch.log" 2>&1; then
      echo "vendor/check.sh: patches/$p does not apply to $name $version:" >&2
      cat "$work/patch.log" >&2
      failed=1
      return
    fi
  done
  if diff -r "$tree" "$dir" >"$work/diff" 2>&1; then
    echo "vendor/$dir: $name $version from crates.io${patches:+, patched: $patches}"
  else
    echo "vendor/$dir differs from $name $version${patches:+ with $patches applied}:" >&2
    head -n 60 "$work/diff" >&2
    failed=1
  fi
}

check glommio glommio 0.9.0 \
  e1f8bc1fce949d18098dc0a4e861314e40351a0144ebf61e59bdb5254a2273b2 \
  "" \
  "glommio-0.9.0-readiness.patch glommio-0.9.0-park-with-runnable-queues.patch"
check rdkafka-sys rdkafka-sys 4.10.0+2.12.1 \
  e234cf318915c1059d4921ef7f75616b5219b10b46e9f3a511a15eb4b56a3f77 \
  "librdkafka/tests librdkafka/packaging librdkafka/examples librdkafka/win32" \
  "librdkafka-2.12.1-idempotent-inflight-wakeup.patch"

for p in patches/*.patch; do
  p=${p#patches/}
  if [[ " ${used_patches[*]} " != *" $p "* ]]; then
    echo "vendor/check.sh: patches/$p is applied to no vendored crate (list it above)" >&2
    failed=1
  fi
done
exit "$failed"
