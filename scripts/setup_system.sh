#!/usr/bin/env bash
# System packages the workbench uses: Debian's chromium (static figure export via
# kaleido, and the JupyterLab browser test). Idempotent; needs root for apt.
set -u
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null \
        && exit 0
fi
echo "spt: chromium is not installed (needs root and apt): static figure export is off, figures are saved as HTML only."
