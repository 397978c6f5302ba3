"""Container health check: exit 0 when the service answers 200 on /readyz, 1 otherwise (no curl in the image)."""
import os
import sys
import urllib.request

url = f"http://127.0.0.1:{os.environ.get('VITSERVE_PORT', '8000')}/readyz"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "2"))) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as error:  # 503 while loading or draining, refused connection while starting
    print(f"not ready: {error}", file=sys.stderr)
    sys.exit(1)
