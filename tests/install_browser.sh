#!/bin/sh
# Headless Chromium for the explorer's browser test (tests/test_latent_explorer.py).
# Installs Debian's chromium + chromium-driver when they are missing and we may use apt-get;
# otherwise says why and exits 0: the browser test then skips with that reason.
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: chromium/chromedriver missing and apt-get is not usable as root here; the browser test will skip." >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if timeout 300 apt-get update -qq && \
   timeout 900 apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; then
    echo "install_browser: installed $(chromium --version 2>/dev/null)" >&2
else
    echo "install_browser: apt-get could not install chromium; the browser test will skip." >&2
fi
exit 0
