"""The OpenAPI description and the /docs page, against the real server process: what the schema declares, that
the page works offline in a real browser (Chromium through Selenium) and uploads an image, and that a
schema-driven fuzzer (schemathesis) gets only declared answers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from browser_logs import requested_urls
from serving_harness import API_KEY, Server, png_bytes

from service.docs import ASSET_TYPES
from service.schemas import ClassifyParams, EmbedParams, ReconstructParams

TASKS = {"/classify": ClassifyParams, "/embed": EmbedParams, "/reconstruct": ReconstructParams}


@pytest.fixture(scope="module")
def server(serving_repo):
    """No API key: what the browser and the fuzzer talk to."""
    server = Server(serving_repo)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def keyed_server(serving_repo):
    server = Server(serving_repo, api_key=API_KEY)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def spec(server) -> dict:
    return httpx.get(f"{server.url}/openapi.json").json()


# --- the schema ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", TASKS)
def test_task_endpoints_declare_both_request_bodies(spec, path):
    content = spec["paths"][path]["post"]["requestBody"]["content"]
    form = content["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert form["properties"]["file"]["type"] == "array"
    assert form["properties"]["file"]["items"]["format"] == "binary"  # a file picker per image in Swagger UI
    assert "image/png" in content["multipart/form-data"]["encoding"]["file"]["contentType"]
    body = content["application/json"]["schema"]
    assert body["required"] == ["images"] and body["additionalProperties"] is False
    assert body["properties"]["images"]["items"]["contentEncoding"] == "base64"
    assert body["properties"]["images"]["maxItems"] == 32  # the server's max_images_per_request
    examples = content["application/json"]["examples"]
    assert all(example["value"]["images"] for example in examples.values())


@pytest.mark.parametrize("path", TASKS)
def test_task_parameters_are_declared_once_from_the_params_model(spec, path):
    """Query parameters and JSON fields are the model's fields, with its constraints, defaults and examples."""
    operation = spec["paths"][path]["post"]
    model_fields = TASKS[path].model_json_schema()["properties"]
    query = {p["name"]: p for p in operation["parameters"]}
    assert set(query) == set(model_fields)
    assert all(p["in"] == "query" and not p["required"] and p["description"] for p in query.values())
    assert all(p["schema"].get("examples") for p in query.values()), "every parameter has an example"
    json_fields = operation["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert set(json_fields) == set(model_fields) | {"images"}
    for name, parameter in query.items():
        declared = {k: v for k, v in json_fields[name].items() if k != "description"}
        assert declared == parameter["schema"], name
        if "default" in model_fields[name] and model_fields[name]["default"] is not None:
            assert parameter["schema"]["default"] == model_fields[name]["default"]


def test_the_declared_constraints_are_the_validated_ones(spec):
    params = {p["name"]: p["schema"] for p in spec["paths"]["/reconstruct"]["post"]["parameters"]}
    assert params["mask_ratio"] == {**params["mask_ratio"], "exclusiveMinimum": 0.0, "exclusiveMaximum": 1.0, "type": "number"}
    assert params["visible"]["type"] == "array" and params["visible"]["items"] == {"type": "integer"}
    assert params["size"]["enum"] == ["model", "input"]
    top_k = {p["name"]: p["schema"] for p in spec["paths"]["/classify"]["post"]["parameters"]}["top_k"]
    assert top_k["minimum"] == 1 and top_k["default"] == 5


def test_answers_are_declared_with_their_media_types(spec):
    reconstruct = spec["paths"]["/reconstruct"]["post"]["responses"]
    assert set(reconstruct["200"]["content"]) == {"application/json", "image/png"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    for path in TASKS:
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "404", "413", "415", "422", "503", "504"} <= set(responses)
        assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]


def test_operation_ids_are_unique(spec):
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", TASKS)
def test_the_json_examples_are_answered(server, spec, path):
    """Swagger UI's "Try it out" sends these: they must work on any repository."""
    for example in spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["examples"].values():
        response = httpx.post(f"{server.url}{path}", json=example["value"], timeout=30)
        assert response.status_code == 200, response.text


def test_an_api_key_is_declared_and_the_pages_stay_open(keyed_server):
    url = keyed_server.url
    spec = httpx.get(f"{url}/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["paths"]["/classify"]["post"]["security"] and "401" in spec["paths"]["/models"]["get"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(f"{url}{page}").status_code == 200, page
    for name in ASSET_TYPES:
        assert httpx.get(f"{url}/docs/assets/{name}").status_code == 200, name
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.get(f"{url}/docs/assets/other.js").status_code == 401  # only the named assets are open


# --- the pages' assets --------------------------------------------------------------------------------------

class _References(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_pages_load_only_assets_this_server_serves(server, page):
    response = httpx.get(f"{server.url}{page}")
    assert response.status_code == 200
    parser = _References()
    parser.feed(response.text)
    assert parser.urls and all(u.startswith("/") and not u.startswith("//") for u in parser.urls), parser.urls
    assert not re.search(r"https?://", response.text.replace("http://www.w3.org", "")), "a page names an outside host"
    for url in parser.urls:
        asset = httpx.get(f"{server.url}{url}")
        assert asset.status_code == 200 and len(asset.content) > 1000, url
        assert asset.headers["content-type"] == ASSET_TYPES[url.rsplit("/", 1)[1]]
    assert httpx.get(f"{server.url}/docs/assets/nothing.js").status_code == 404


# --- a real browser -----------------------------------------------------------------------------------------

# `browser`: the session's headless Chromium, offline (tests/conftest.py)


def _open_operation(driver, operation_id: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    operation = driver.find_element(By.ID, f"operations-default-{operation_id}")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    WebDriverWait(driver, 10).until(lambda _: operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    return operation


def _executed_status(driver, operation) -> tuple[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    operation.find_element(By.CSS_SELECTOR, ".execute").click()
    cell = ".live-responses-table .response .response-col_status"
    WebDriverWait(driver, 30).until(lambda _: operation.find_elements(By.CSS_SELECTOR, cell))
    answer = operation.find_element(By.CSS_SELECTOR, ".live-responses-table .response .response-col_description")
    return operation.find_element(By.CSS_SELECTOR, cell).text, answer.get_attribute("innerHTML")


def test_swagger_ui_renders_offline_and_uploads_an_image(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(f"{server.url}/docs")
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    summaries = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert {"/classify", "/embed", "/reconstruct", "/models", "/metrics"} <= set(summaries)
    outside = {u for u in requested_urls(browser) if u.startswith("http") and not u.startswith(server.url)}
    assert not outside, f"/docs asked for {outside}"

    # "Try it out" on /classify: pick a file, execute, get the labels
    image = tmp_path / "disc.png"
    yy, xx = np.mgrid[:40, :40]
    image.write_bytes(png_bytes(np.where(((yy - 20) ** 2 + (xx - 20) ** 2 < 144)[..., None], 230, 20).astype(np.uint8)
                                .repeat(3, axis=2)))
    classify = _open_operation(browser, "classify_classify_post")
    classify.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
    status, answer = _executed_status(browser, classify)
    assert status == "200", answer
    assert "predictions" in answer and "shapes" in answer

    # /reconstruct, JSON example body, answered as a PNG the page shows
    reconstruct = _open_operation(browser, "reconstruct_reconstruct_post")
    Select(reconstruct.find_element(By.CSS_SELECTOR, "select.content-type")).select_by_value("application/json")
    Select(reconstruct.find_element(By.CSS_SELECTOR, ".response-control-media-type select")).select_by_value("image/png")
    status, answer = _executed_status(browser, reconstruct)
    assert status == "200", answer
    assert "<img" in answer and "image/png" in answer


# --- a schema-driven fuzzer ---------------------------------------------------------------------------------

ST = Path(sys.executable).with_name("st")  # schemathesis' command line: its whole engine (examples, coverage, fuzzing)
# 413 is how this API refuses more images than `maxItems` allows: a rejection like the others. 504 is the declared
# answer when the request's own `timeout_ms` (1 ms, say) passes before the model runs: not a server error.
ST_CONFIG = """
[checks]
negative_data_rejection.expected-statuses = [400, 401, 404, 406, 413, 415, 422]
not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", 504]
"""


def test_fuzzed_requests_get_only_declared_answers(server, tmp_path):
    """schemathesis from /openapi.json: no 5xx, every answer as declared (status, media type, body, headers), and
    a request that breaks the schema is refused. Not `positive_data_acceptance`: a request the schema allows may
    still be refused (a made-up image, an unknown model, `visible` with `mask_ratio`), as declared. The hooks give
    image fields real images most of the time, so requests reach the model."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(ST_CONFIG)
    result = subprocess.run(
        [str(ST), "--config-file", str(config), "run", f"{server.url}/openapi.json", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance", "--max-examples", "100", "--seed", "1",
         "--generation-database", "none", "--include-path-regex", r"^/(classify|embed|reconstruct|models|healthz|readyz|metrics)$",
         "--report", "har", "--report-har-path", str(tmp_path / "requests.har")],
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py")), "NO_COLOR": "1"},
        cwd=tmp_path, capture_output=True, text=True, timeout=240)  # its crash cache stays out of the repository
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:] + "\nserver log:\n" + server.output()[-3000:]
    answered = Counter((entry["request"]["url"].split("?")[0].rsplit("/", 1)[1], entry["response"]["status"])
                       for entry in json.loads((tmp_path / "requests.har").read_text())["log"]["entries"])
    for task in ("classify", "embed", "reconstruct"):
        assert answered[task, 200] >= 10, f"the fuzzer hardly reached /{task}'s model: {answered}"
