"""What the session's Chromium (tests/conftest.py `browser`) logged: the URLs a page requested."""
from __future__ import annotations

import json


def requested_urls(driver) -> set[str]:
    """Every URL the page asked for since the test began (the performance log, emptied per test)."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.add(message["params"]["request"]["url"])
    return urls
