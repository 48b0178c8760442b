#!/usr/bin/env bash
# Builds a base image for docker/Dockerfile from Debian's packages, for hosts
# whose Docker engine reaches no image registry (no `FROM python:3.11-slim`).
#
#   docker/base_image.sh [TAG]        # default opd-base:bookworm; needs root
#   docker compose ... build --build-arg BASE_IMAGE=TAG   (or OPD_BASE_IMAGE=TAG)
#
# Choices:
# 1) debootstrap's minimal variant of Debian bookworm (Python 3.11) with
#    python3, its venv module, CA certificates, and the two libraries vLLM's
#    CPU build loads (libgomp1, libnuma1); apt's package lists and downloaded
#    packages stay out of the image (about 170 MB).
# 2) The image trusts what this host trusts: certificate authorities added to
#    the host (Debian's local CA folder) are added to the image, and pip and
#    requests are pointed at the system store, so a host behind a TLS proxy
#    builds as well as one without.
# 3) OPD_DEBIAN_MIRROR picks the mirror (debootstrap's default otherwise).
set -euo pipefail

tag=${1:-opd-base:bookworm}
suite=${OPD_DEBIAN_SUITE:-bookworm}
local_cas=/usr/local/share/ca-certificates

if ! command -v debootstrap > /dev/null; then
    command -v apt-get > /dev/null || { echo "base_image.sh: install debootstrap first" >&2; exit 1; }
    apt-get update -q > /dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap > /dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "base_image.sh: debootstrap $suite (a few minutes)"
nice -n 19 debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,libgomp1,libnuma1 \
    "$suite" "$work/rootfs" ${OPD_DEBIAN_MIRROR:+"$OPD_DEBIAN_MIRROR"} > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

if compgen -G "$local_cas/*.crt" > /dev/null; then
    cp "$local_cas"/*.crt "$work/rootfs$local_cas/"
    chroot "$work/rootfs" update-ca-certificates > /dev/null
fi

bundle=/etc/ssl/certs/ca-certificates.crt
tar -C "$work/rootfs" --exclude='./var/cache/apt/archives/*.deb' --exclude='./var/lib/apt/lists/*' \
    --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' -c . \
    | nice -n 19 docker import \
        --change "ENV PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle SSL_CERT_FILE=$bundle LANG=C.UTF-8" \
        --change 'CMD ["python3"]' - "$tag" > /dev/null
echo "base_image.sh: built $tag"
