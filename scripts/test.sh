#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (.venv), then runs pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh all,test
# The page tests (tests/test_webpage.py, marker `browser`) drive Debian's Chromium through Playwright (the test
# extra); Playwright's own browser download is never used. Here they must run, not skip. The font: CJK text in
# their screenshots (tests/artifacts/).
if [ ! -x "${TOOLKIT_CHROMIUM:-/usr/bin/chromium}" ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    fonts-wqy-zenhei >/dev/null
fi
export TOOLKIT_REQUIRE_BROWSER=1
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Free disk first (the suite writes about 0.2 GB of models and GGUFs at its peak, more where a test fails):
# on a machine that runs out, the failures it causes then have a visible cause in the log.
df -h . "${TMPDIR:-/tmp}" | awk 'NR == 1 || !seen[$0]++'
python -m pytest "$@"
