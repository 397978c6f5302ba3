"""Container tests build and run the images: minutes, and a Docker engine. The default `pytest` does not even
collect them; `make docker-test` runs them (it sets VITSERVE_CONTAINER_TESTS=1 and points docker at an engine)."""
import os

if os.environ.get("VITSERVE_CONTAINER_TESTS") != "1":
    collect_ignore_glob = ["test_*.py"]
