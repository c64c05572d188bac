#!/usr/bin/env bash
# STAND-INS FOR OFFLINE MACHINES. Makes local images under the two names the Dockerfile starts
# from, `rust:1-slim-bookworm` and `gcr.io/distroless/cc-debian12:nonroot`, out of Debian
# packages and this machine's Rust toolchain, for a machine that reaches Debian's package
# mirror but no container registry. They are not the published images: they only have what
# the Dockerfile needs of them, so that `docker build` (legacy builder or BuildKit) and
# deploy/smoke.sh can be run there. Anywhere a registry is reachable, use the real images and
# do not run this.
#
#   deploy/offline-base-images.sh          (as root; needs debootstrap, dpkg-deb, apt-get, docker)
#
# - rust:1-slim-bookworm: a Debian 12 minbase tree (debootstrap, from the mirror apt on this
#   machine uses) with gcc, libc6-dev, binutils and ca-certificates, as the real one has, this
#   machine's own CA certificates (/usr/local/share/ca-certificates) added to them, and the
#   toolchain that `rustc` on this machine belongs to copied to /usr/local/rust (without
#   its documentation). CARGO_HOME=/usr/local/cargo, whose bin/ is on PATH, as in the real one.
# - gcr.io/distroless/cc-debian12:nonroot: no shell and no package manager, like the real one:
#   the files of libc6, libgcc-s1, libstdc++6, base-files, netbase, tzdata and ca-certificates
#   (unpacked, not installed), the CA bundle, /etc/passwd and /etc/group with root, nobody and nonroot
#   (65532), /tmp, and USER 65532 with WORKDIR /home/nonroot.
#
# DOCKER may name another client (the engine's own /usr/bin/docker, say). Re-running replaces
# both tags.
set -euo pipefail

docker=${DOCKER:-docker}
builder_tag=rust:1-slim-bookworm
runtime_tag=gcr.io/distroless/cc-debian12:nonroot

for tool in debootstrap dpkg-deb apt-get rustc; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The mirror apt already uses here (deb822 sources first, then the one-line format), so that
# this script names no host of its own.
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
  grep -v -- '-security' | head -n 1 || true)
if [ -z "$mirror" ]; then
  mirror=$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\) bookworm .*/\2/p' /etc/apt/sources.list 2>/dev/null |
    head -n 1 || true)
fi
[ -n "$mirror" ] || { echo "no Debian mirror found in apt's sources" >&2; exit 1; }
echo "Debian mirror (from apt's sources): $mirror"

echo "== $builder_tag (stand-in)"
root="$work/builder"
debootstrap --variant=minbase --include=ca-certificates,gcc,libc6-dev,binutils \
  bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
sysroot=$(rustc --print sysroot)
echo "Rust toolchain: $(rustc --version) from $sysroot"
mkdir -p "$root/usr/local/rust" "$root/usr/local/cargo/bin"
tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$root/usr/local/rust" -xf -
# The certificate authorities this machine adds to Debian's (a machine whose way out goes
# through a TLS-inspecting proxy has its CA there): cargo in the build then reaches crates.io
# as it does on the machine itself.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null
fi
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
tar -C "$root" -cf - . | "$docker" import \
  -c 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV CARGO_HOME=/usr/local/cargo' \
  -c 'CMD ["bash"]' \
  -m 'stand-in made by deploy/offline-base-images.sh, not the published image' \
  - "$builder_tag"

echo "== $runtime_tag (stand-in)"
root="$work/runtime"
mkdir -p "$work/debs" "$root"
# apt downloads as its own user where it can.
chmod 755 "$work"
chown _apt "$work/debs" 2>/dev/null || true
(cd "$work/debs" && apt-get download -q \
  libc6 libgcc-s1 libstdc++6 base-files netbase tzdata ca-certificates >/dev/null)
for deb in "$work/debs"/*.deb; do dpkg-deb -x "$deb" "$root"; done
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/lintian"
mkdir -p "$root/etc/ssl/certs" "$root/tmp" "$root/home/nonroot" "$root/root"
# The bundle ca-certificates' install script would make.
cat "$root"/usr/share/ca-certificates/mozilla/*.crt >"$root/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$root/tmp"
chown 65532:65532 "$root/home/nonroot"
cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$root/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
tar -C "$root" -cf - . | "$docker" import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'USER 65532' \
  -c 'WORKDIR /home/nonroot' \
  -m 'stand-in made by deploy/offline-base-images.sh, not the published image' \
  - "$runtime_tag"

"$docker" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' |
  grep -E '^(rust:1-slim-bookworm|gcr.io/distroless/cc-debian12:nonroot) '
