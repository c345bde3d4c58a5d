#!/usr/bin/env python3
"""Container health probe: exit 0 when ``GET URL`` answers 2xx within the timeout, else 1.

Stdlib only (the slim image has no curl). URL: first argument, else ``$HEALTHCHECK_URL``,
else the gateway's ``http://127.0.0.1:8080/health``.
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("HEALTHCHECK_URL", "http://127.0.0.1:8080/health")
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT", "5"))) as resp:
            ok = 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    if not ok:
        print(f"unhealthy: {url}: HTTP {resp.status}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
