#!/usr/bin/env sh
# The build steps of the container image (Dockerfile), also run outside a
# container by scripts/check-deploy.sh: builds `fhirsync` and installs it
# under PREFIX. Usage: deploy/build.sh PREFIX [PROFILE]   (PROFILE: release)
set -eu
prefix="$1"
profile="${2:-release}"
if [ "$profile" = release ]; then
  cargo build --release --locked -p fhirsync
else
  cargo build --locked -p fhirsync
fi
target="${CARGO_TARGET_DIR:-target}"
dir=$([ "$profile" = release ] && echo release || echo debug)
install -D -m 0755 "$target/$dir/fhirsync" "$prefix/bin/fhirsync"
