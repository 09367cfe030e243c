#!/usr/bin/env bash
# Unpacks Mesa 25's lavapipe Vulkan driver (Debian bookworm-backports) under $1, without
# installing anything: a private apt state under $1/apt, `apt-get download`, `dpkg -x`, and an ICD
# file with an absolute library path. Bookworm's own lavapipe (Mesa 22) is rejected by Dawn; this
# one gives Node WebGPU an adapter with shader-f16 and subgroups (size 8), which the test project
# 'node-lavapipe-f16' (vitest.config.ts) runs the kernel tests on, with VK_ICD_FILENAMES=$1/lvp_icd.json.
# Needs Debian bookworm's apt and keyring and the Debian mirror; about 10 s and 11 MB. Idempotent.
set -euo pipefail
T=$(realpath -m "${1:?usage: lavapipe25.sh TARGET_DIR}")
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$T/root; A=$T/apt; DEBS=$T/debs
if [ -f "$T/lvp_icd.json" ] && [ -f "$T/.done" ]; then exit 0; fi
mkdir -p "$ROOT" "$DEBS" "$A/state/lists/partial" "$A/cache/archives/partial" "$A/etc/sources.list.d" "$A/etc/preferences.d"
KEY=/usr/share/keyrings/debian-archive-keyring.gpg
cat > "$A/etc/sources.list" <<SRC
deb [signed-by=$KEY] $MIRROR bookworm main
deb [signed-by=$KEY] $MIRROR bookworm-updates main
deb [signed-by=$KEY] $MIRROR bookworm-backports main
SRC
APT=(-o Dir::Etc::SourceList="$A/etc/sources.list" -o Dir::Etc::SourceParts="$A/etc/sources.list.d"
     -o Dir::Etc::PreferencesParts="$A/etc/preferences.d" -o Dir::State="$A/state"
     -o Dir::State::status=/var/lib/dpkg/status -o Dir::Cache="$A/cache"
     -o Debug::NoLocking=1 -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User="$(id -un)")
apt-get "${APT[@]}" -qq update
# Which packages installing mesa-vulkan-drivers from backports would bring (a simulation against
# the machine's dpkg status); download exactly those versions (a plain name would get bookworm's).
PKGS=$(apt-get "${APT[@]}" -s install --no-install-recommends mesa-vulkan-drivers/bookworm-backports \
       | awk '/^Inst /{v=($3 ~ /^\[/)?$4:$3; sub(/^\(/,"",v); print $2"="v}')
case "$PKGS" in *mesa-vulkan-drivers=*) ;; *) PKGS="$PKGS mesa-vulkan-drivers/bookworm-backports";; esac
# shellcheck disable=SC2086
(cd "$DEBS" && rm -f ./*.deb && apt-get "${APT[@]}" -qq download $PKGS)
rm -rf "$ROOT"; mkdir -p "$ROOT"
for d in "$DEBS"/*.deb; do dpkg -x "$d" "$ROOT"; done
LVP=$(find "$ROOT" -name libvulkan_lvp.so | head -1)
[ -n "$LVP" ] || { echo "lavapipe25: no libvulkan_lvp.so in $PKGS" >&2; exit 1; }
# The driver loads against the system's libraries (LLVM, xcb, wayland, libdrm): refuse, rather than
# leave an ICD that gives no adapter, when one is missing.
if ldd "$LVP" | grep -q 'not found'; then
  echo "lavapipe25: $LVP needs libraries this system lacks:" >&2; ldd "$LVP" | grep 'not found' >&2; exit 1
fi
# The package's own ICD file, with an absolute library_path.
sed "s|\"library_path\": *\"[^\"]*\"|\"library_path\": \"$LVP\"|" \
    "$ROOT/usr/share/vulkan/icd.d/lvp_icd.json" > "$T/lvp_icd.json"
touch "$T/.done"
