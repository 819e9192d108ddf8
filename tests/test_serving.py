"""Online classification (cifar_core/serving.py, jobs/serve.py): a real Ray Serve app on
127.0.0.1 with a real trained M1, called over HTTP; the page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cifar_core  # noqa: F401  (tf_keras before TensorFlow)
from tests.conftest import _free_port
from tests.imaging import bomb_png, encode, sample_image


def post(url: str, body: bytes, content_type: str = "application/octet-stream",
         timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def multipart(files: list[tuple[str, bytes]], field: str = "file") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; "
             f"filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
             .encode() + data + b"\r\n" for name, data in files]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), \
        f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def served(ray_local, trained_run):
    """The app for the trained M1 run folder, on a free loopback port; its base URL."""
    from ray import serve

    from cifar_core.serving import build
    from jobs.serve import start

    url = start(build(str(trained_run)), "127.0.0.1", _free_port(), None)
    yield url
    serve.shutdown()


@pytest.fixture(scope="module")
def two_images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two")
    (folder / "cat_a.png").write_bytes(encode(sample_image(3)))
    (folder / "ship_b.jpg").write_bytes(encode(sample_image(8), "JPEG", quality=90))
    return folder


def test_png_and_jpeg_answer_as_batch_scoring_does(served, two_images, trained_run,
                                                   tmp_path, capsys):
    """Same decoder, same model, same probabilities (to 1e-5) as cifar score on the files."""
    from jobs.score import main

    files = sorted(two_images.iterdir())
    body, kind = multipart([(p.name, p.read_bytes()) for p in files])
    status, answer = post(f"{served}/predict", body, kind)
    assert status == 200, answer
    # The replica holds 1 of the session Ray's 2 CPUs: the scoring job fits in the other one.
    assert main([str(two_images), "--model", str(trained_run), "--out",
                 str(tmp_path / "s.parquet"), "--quiet", "--cpus-per-actor", "0.5",
                 "--decode-cpus", "0.25"]) == 0
    capsys.readouterr()
    scored = pd.read_parquet(tmp_path / "s.parquet").set_index("path")
    for path, prediction in zip(files, answer["predictions"]):
        row = scored.loc[str(path)]
        assert prediction["name"] == path.name and prediction["status"] == "ok"
        assert [t["class"] for t in prediction["top3"]] == [
            row["predicted_class"], row["top2_class"], row["top3_class"]]
        np.testing.assert_allclose([t["probability"] for t in prediction["top3"]],
                                   [row["confidence"], row["top2_confidence"],
                                    row["top3_confidence"]], atol=1e-5)
    assert answer["model"]["trial_id"].startswith("M1-") and answer["model"]["settings_hash"]


def test_raw_bytes_model_and_health(served, two_images, trained_run):
    status, answer = post(f"{served}/predict", (two_images / "cat_a.png").read_bytes(),
                          "image/png")
    assert status == 200 and answer["predictions"][0]["name"] == "body"
    with urllib.request.urlopen(f"{served}/model", timeout=30) as response:
        model = json.loads(response.read())
    evaluation = json.loads((trained_run / "evaluation.json").read_text())
    assert model["model"] == "M1" and model["input_size"] == 32
    assert model["test_accuracy"] == pytest.approx(evaluation["test_accuracy"])
    assert model["trial_id"] == answer["model"]["trial_id"] and model["git_commit"]
    with urllib.request.urlopen(f"{served}/healthz", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}


BAD_REQUESTS = {
    "empty body": (lambda: (b"", "image/png"), 400, "empty body"),
    "not an image": (lambda: (b"hello, world\n" * 20, "text/plain"), 415, "not an image"),
    "a pixel bomb": (lambda: (bomb_png(20_000, 20_000), "image/png"), 413, "too large"),
    "too many files": (lambda: multipart([(f"{i}.png", encode(sample_image()))
                                          for i in range(17)]), 413, "Too many files"),
    "no file field": (lambda: multipart([("a.png", encode(sample_image()))], field="image"),
                      400, "field 'file'"),
    "a broken form": (lambda: (b"--nope\r\n\r\nrubbish", "multipart/form-data; boundary=x"),
                      400, "multipart form: Invalid multipart data"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_replica_lives(served, two_images,
                                                                         case):
    make, expected, words = BAD_REQUESTS[case]
    body, kind = make()
    status, answer = post(f"{served}/predict", body, kind)
    assert status == expected and words in answer["error"], (status, answer)
    good = (two_images / "cat_a.png").read_bytes()
    assert post(f"{served}/predict", good, "image/png")[0] == 200  # still answering


def test_a_body_declared_over_the_cap_is_refused_before_it_is_read(served, two_images):
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(served)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.putrequest("POST", "/predict")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(17 * 2**20))  # 17 MiB announced, none sent
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "cap" in json.loads(response.read())["error"]
    connection.close()
    good = (two_images / "cat_a.png").read_bytes()
    assert post(f"{served}/predict", good, "image/png")[0] == 200


def test_one_bad_image_among_good_ones_is_its_own_error(served, two_images):
    body, kind = multipart([("good.png", (two_images / "cat_a.png").read_bytes()),
                            ("notes.txt", b"not an image")])
    status, answer = post(f"{served}/predict", body, kind)
    assert status == 200
    good, bad = answer["predictions"]
    assert good["status"] == "ok" and len(good["top3"]) == 3
    assert bad["status"] == "error" and bad["error"].startswith("not an image")


def test_bad_options_and_models_exit_2_before_serving(tmp_path, capsys):
    from jobs.serve import main

    assert main(["--model", str(tmp_path / "nothing")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    for argv, words in ((["--replicas", "0"], "--replicas 0"), (["--port", "0"], "--port 0"),
                        (["--max-files", "0"], "--max-files 0"),
                        (["--s3-endpoint", "x:1"], "--s3-endpoint")):
        assert main(["--model", str(tmp_path), *argv]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_the_page_shows_top3_bars_in_a_real_browser(served, two_images, tmp_path):
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as until
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=420,900",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(served + "/")
        WebDriverWait(driver, 60).until(until.text_to_be_present_in_element(
            (By.ID, "model"), "test accuracy"))
        files = [str(two_images / "cat_a.png"), str(two_images / "ship_b.jpg")]
        driver.find_element(By.ID, "file").send_keys("\n".join(files))
        WebDriverWait(driver, 60).until(
            lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card .bar")) == 6)
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        assert [c.find_element(By.CSS_SELECTOR, ".name").text for c in cards] == [
            "cat_a.png", "ship_b.jpg"]
        widths = [float(b.value_of_css_property("width").removesuffix("px"))
                  for b in cards[0].find_elements(By.CSS_SELECTOR, ".fill")]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        driver.save_screenshot(str(tmp_path / "serve-page.png"))  # a test artefact, not git's
        assert (tmp_path / "serve-page.png").stat().st_size > 1000
    finally:
        driver.quit()


def test_ray_serve_s_own_tools_get_the_same_application(trained_run):
    """``serve run cifar_core.serving:app_builder model=...`` builds what cifar serve runs."""
    from ray.serve.deployment import Application

    from cifar_core.checkpoints import CheckpointError
    from cifar_core.serving import app_builder

    assert isinstance(app_builder({"model": str(trained_run), "max_batch_size": "8"}),
                      Application)
    with pytest.raises(CheckpointError):
        app_builder({"model": "/no/such/model"})


@pytest.mark.slow
def test_ray_serve_s_own_metrics_count_the_requests(served, two_images):
    import time

    from jobs.serve import metrics_url

    for _ in range(3):
        assert post(f"{served}/predict", (two_images / "cat_a.png").read_bytes(),
                    "image/png")[0] == 200
    deadline = time.time() + 90  # Ray exports metrics every few seconds
    while time.time() < deadline:
        with urllib.request.urlopen(metrics_url(), timeout=30) as response:
            text = response.read().decode()
        lines = [line for line in text.splitlines()
                 if line.startswith("ray_serve_num_http_requests_total")
                 and 'route="/predict"' in line and 'status_code="200"' in line]
        if lines and sum(float(line.rsplit(" ", 1)[1]) for line in lines) >= 3:
            return
        time.sleep(3)
    raise AssertionError("Serve's request counter for /predict did not appear")
