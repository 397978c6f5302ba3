import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def serving_repo(tmp_path_factory):
    """The end-to-end tests' model repository, exported once per test session."""
    from serving_harness import build_serving_repo

    return build_serving_repo(tmp_path_factory.mktemp("serving"))
