"""The web console in a real browser.

Starts a three-node dev cluster (`junction dev`, real processes on free loopback ports, data in
a temp dir) and drives Debian's headless Chromium through the console with Selenium: every
page loads, a station is created from the console, messages produced through REST appear,
a group consumes them and its lag falls, a message dead-lettered by the group is resent from
the console, and the group is moved and deleted from it. A screenshot of each page is saved
under $JUNCTION_SCREENSHOTS. Run by scripts/test-console.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

BIN = os.environ["JUNCTION_BIN"]
SHOTS = Path(os.environ.get("JUNCTION_SCREENSHOTS", "console-screenshots"))
PEER_OFFSET = 100
HTTP_OFFSET = 1000
STEPS: list[str] = []


class Failure(Exception):
    pass


def step(what: str) -> None:
    STEPS.append(what)
    print(f"  step {len(STEPS)}: {what}", flush=True)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = check()
            if v:
                return v
        except (StaleElementReferenceException, NoSuchElementException, urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.1)
    raise Failure(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def click(d: webdriver.Chrome, what: str, css: str) -> None:
    """Finds and clicks the element in one step, again while the page re-renders under it (a
    refreshing page replaces its elements: one found a moment before may be stale)."""
    def found_and_clicked() -> bool:
        d.find_element(By.CSS_SELECTOR, css).click()
        return True
    wait_for(what, found_and_clicked)


def free_base() -> int:
    """A gRPC base port whose three ports, peer ports and HTTP ports are all free."""
    for _ in range(200):
        base = random.randrange(20_000, 28_000)
        wanted = [base + i + off for i in range(3) for off in (0, PEER_OFFSET, HTTP_OFFSET)]
        held = []
        try:
            for p in wanted:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise Failure("no free ports for a dev cluster")


class Rest:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One call; a 503 (no leader known for a moment) is retried as its Retry-After says,
        except for a produce, whose outcome a 503 leaves unknown."""
        data = None if body is None else json.dumps(body).encode()
        deadline = time.monotonic() + 20
        while True:
            req = urllib.request.Request(self.base + "/api/v1" + path, data=data, method=method)
            if data is not None:
                req.add_header("Content-Type", "application/json")
            try:
                with urllib.request.urlopen(req, timeout=40) as r:
                    return json.loads(r.read() or b"null")
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                retry = e.code == 503 and not path.endswith("/messages") and time.monotonic() < deadline
                if not retry:
                    raise Failure(f"{method} {path}: {e.code} {text}") from None
                time.sleep(float(e.headers.get("Retry-After", "1")))


def browser() -> webdriver.Chrome:
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update",
              "--disable-extensions", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=opts)


def text(d: webdriver.Chrome) -> str:
    return d.find_element(By.ID, "view").text


def accept_confirm(d: webdriver.Chrome) -> None:
    def alert() -> Any:
        try:
            return d.switch_to.alert
        except NoAlertPresentException:
            return None
    wait_for("a confirmation", alert, 5).accept()


def shot(d: webdriver.Chrome, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    if not d.save_screenshot(str(path)):
        raise Failure(f"no screenshot {path}")
    print(f"    screenshot {path}")


def run(d: webdriver.Chrome, url: str, rest: Rest) -> None:
    d.get(url + "/")
    step("cluster page: three nodes alive and a metadata leader")
    wait_for("3 / 3 nodes alive", lambda: "3 / 3" in text(d) and "Metadata leader" in text(d))
    wait_for("the tenant in the header", lambda: "tenant default" in d.find_element(By.ID, "who").text)
    shot(d, "cluster")

    step("stations page: create a station from the console")
    d.get(url + "/#/stations")
    form = wait_for("the new-station form", lambda: d.find_element(By.ID, "create-station"))
    form.find_element(By.NAME, "name").send_keys("orders")
    part = form.find_element(By.NAME, "partitions")
    part.clear()
    part.send_keys("2")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    accept_confirm(d)
    wait_for("the station in the list", lambda: "default/orders" in text(d))
    shot(d, "stations")

    step("produce 40 messages through REST; the station page shows them and a produce rate")
    d.get(url + "/#/station/default/orders")
    wait_for("the station page", lambda: "Partitions" in text(d))
    msgs = [{"key": f"customer-{i % 8}", "json": {"order": i, "total": i * 3}, "headers": {"source": "console-test"}}
            for i in range(40)]
    got = rest.call("POST", "/stations/default/orders/messages", {"messages": msgs})
    assert len(got["positions"]) == 40
    wait_for("40 messages on the station page", lambda: "40" in d.find_element(By.CLASS_NAME, "cards").text)
    wait_for("a measured produce rate", lambda: "msg/s" in d.find_element(By.CLASS_NAME, "cards").text)
    shot(d, "station")

    step("messages page: browse partition 0 as JSON and as hex")
    d.get(url + "/#/messages/default/orders")
    form = wait_for("the browse form", lambda: d.find_element(By.ID, "browse"))
    Select(form.find_element(By.NAME, "as")).select_by_value("json")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for("a JSON payload", lambda: '"order":' in text(d) and "source: console-test" in text(d))
    shot(d, "messages")
    Select(form.find_element(By.NAME, "as")).select_by_value("hex")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for("a hex payload", lambda: "7b 22" in text(d))

    step("a group consumes through REST; its lag falls on the group page")
    fetched = rest.call("POST", "/stations/default/orders/groups/billing/fetch",
                        {"consumer": "c1", "max": 5, "wait_ms": 2000, "settings": {"max_deliveries": 1}})
    assert fetched["messages"], fetched
    d.get(url + "/#/group/default/orders/billing")
    lag = lambda: d.find_element(By.ID, "group-lag").text.replace(",", "")
    wait_for("lag 40 while nothing is acknowledged", lambda: lag() == "40")
    # One message fails: with one delivery allowed, its nack dead-letters it.
    poison = fetched["messages"][0]
    rest.call("POST", "/stations/default/orders/groups/billing/nack", {"receipts": [poison["receipt"]]})
    done = 0
    batch = fetched["messages"][1:]
    deadline = time.monotonic() + 60
    while True:
        if batch:
            r = rest.call("POST", "/stations/default/orders/groups/billing/ack",
                          {"receipts": [m["receipt"] for m in batch]})
            done += r["accepted"]
        if done >= 39:
            break
        if time.monotonic() > deadline:
            raise Failure(f"only {done} of 39 messages consumed in 60 s")
        batch = rest.call("POST", "/stations/default/orders/groups/billing/fetch",
                          {"consumer": "c1", "max": 20, "wait_ms": 1000})["messages"]
    wait_for("lag 0 once everything is acknowledged or dead-lettered", lambda: lag() == "0")
    assert "rest:c1" in text(d), text(d)
    shot(d, "group")

    step("dead letters page: the nacked message, why and from where; resend it")
    d.get(url + "/#/dead-letters/default/orders")
    wait_for("the dead letter", lambda: "billing" in text(d) and "default/orders" in text(d))
    before = sum(p["next_offset"] for p in rest.call("GET", "/stations/default/orders")["partition_info"])
    shot(d, "dead-letters")
    click(d, "the resend button", "button[data-resend]")
    accept_confirm(d)
    wait_for("the resend confirmed", lambda: "resent" in d.find_element(By.ID, "flash").text)
    after = sum(p["next_offset"] for p in rest.call("GET", "/stations/default/orders")["partition_info"])
    assert after == before + 1, (before, after)

    step("a parking group: the poison key shows on its group page; resume it from the console")
    got = rest.call("POST", "/stations/default/orders/groups/quarantine/fetch",
                    {"consumer": "q1", "max": 1, "wait_ms": 2000,
                     "settings": {"max_deliveries": 1, "on_max_deliveries": "park"}})
    head = got["messages"][0]
    rest.call("POST", "/stations/default/orders/groups/quarantine/nack", {"receipts": [head["receipt"]]})
    key = head["message"]["key"]
    d.get(url + "/#/group/default/orders/quarantine")
    wait_for("the parked key listed", lambda: d.find_elements(By.CSS_SELECTOR, f"button[data-resume='{key}']"))
    assert "then park the key" in text(d), text(d)
    shot(d, "parked")
    click(d, "the resume button", f"button[data-resume='{key}']")
    accept_confirm(d)
    wait_for("no parked key left",
             lambda: not rest.call("GET", "/stations/default/orders/groups/quarantine/parked")["keys"])
    wait_for("the page says so", lambda: "No parked keys." in text(d))

    step("group page: set an isolation budget from the console; every partition holds it")
    d.get(url + "/#/group/default/orders/billing")
    form = wait_for("the budget form", lambda: d.find_element(By.ID, "budget"))
    form.find_element(By.NAME, "max_messages").send_keys("5000")
    form.find_element(By.NAME, "max_age_s").send_keys("3600")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    accept_confirm(d)
    wait_for("the budget on every partition", lambda: all(
        p["budget"] == {"max_messages": 5000, "max_bytes": None, "max_age_ms": 3600000}
        for p in rest.call("GET", "/stations/default/orders/groups/billing")["partitions"]))
    wait_for("the page shows it", lambda: "Isolation budget: 5,000 messages" in text(d))
    assert "held" in text(d), text(d)

    step("group page: seek to earliest from the console, lag comes back; then delete the group")
    d.get(url + "/#/group/default/orders/billing")
    form = wait_for("the seek form", lambda: d.find_element(By.ID, "seek"))
    Select(form.find_element(By.NAME, "to")).select_by_value("earliest")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    accept_confirm(d)
    wait_for("lag 41 after seeking to the start", lambda: lag() == "41")
    click(d, "the delete-group button", "#delete-group")
    accept_confirm(d)
    wait_for("back on the station page without the group",
             lambda: d.current_url.endswith("#/station/default/orders") and "Consumer groups" in text(d)
             and not d.find_elements(By.CSS_SELECTOR, "a[href='#/group/default/orders/billing']")
             and d.find_elements(By.CSS_SELECTOR, "a[href='#/group/default/orders/quarantine']"))

    step("API page: the OpenAPI document rendered")
    d.get(url + "/#/api")
    wait_for("the operations", lambda: "/api/v1/stations/{tenant}/{station}/messages" in text(d))
    shot(d, "api")

    step("stations page: delete the station from the console")
    d.get(url + "/#/stations")
    click(d, "the delete button", "button[data-delete='default/orders']")
    accept_confirm(d)
    wait_for("the station gone",
             lambda: not d.find_elements(By.CSS_SELECTOR, "button[data-delete='default/orders']"), 30)
    assert "default/orders.dls" in text(d), "its dead-letter station stays, listed on its own"

    logs = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
    # A refused request the page reported itself (a 404 while the station is being deleted)
    # is fine; a script error is not.
    errors = [e for e in logs if "Uncaught" in e.get("message", "")]
    if errors:
        raise Failure(f"script errors in the console: {errors}")


def contract(url: str, tmp: Path) -> None:
    """The REST API against its own OpenAPI document: schemathesis generates requests for
    every operation (valid and invalid, with a fixed seed) and checks that none gets a 5xx,
    that every answer matches its documented schema and content type."""
    step("REST contract: generated requests for every operation (schemathesis)")
    Rest(url).call("POST", "/stations", {"name": "contract", "partitions": 1})
    st = Path(sys.executable).parent / "schemathesis"
    r = subprocess.run(
        [str(st), "run", f"{url}/api/v1/openapi.json",
         "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
         "--max-examples", "15", "--seed", "20261206", "--no-color"],
        cwd=tmp, capture_output=True, text=True, timeout=600)
    summary = [l for l in r.stdout.splitlines() if "generated" in l or "Selected" in l or "failures" in l]
    print("    " + " | ".join(s.strip() for s in summary))
    if r.returncode != 0:
        raise Failure(f"schemathesis found problems:\n{r.stdout[-6000:]}\n{r.stderr[-2000:]}")


def main() -> int:
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    base = free_base()
    http_base = base + HTTP_OFFSET
    tmp = Path(tempfile.mkdtemp(prefix="junction-console-"))
    log = open(tmp / "dev.log", "wb")
    dev = subprocess.Popen(
        [BIN, "dev", "--data-dir", str(tmp / "data"), "--base-port", str(base),
         "--http-base-port", str(http_base), "--insecure"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{http_base}"
    d = None
    try:
        def ready() -> bool:
            if dev.poll() is not None:
                raise Failure(f"junction dev exited with {dev.returncode}: {(tmp / 'dev.log').read_text()}")
            with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                return r.status == 200
        wait_for("the dev cluster", ready, 90)
        d = browser()
        run(d, url, Rest(url))
        contract(url, tmp)
        print(f"console test: {len(STEPS)} steps passed; screenshots in {SHOTS}")
        return 0
    except (Failure, AssertionError) as e:
        print(f"console test FAILED at step {len(STEPS)} ({STEPS[-1] if STEPS else 'start'}): {e}", file=sys.stderr)
        if d is not None:
            try:
                shot(d, "failure")
                print(text(d), file=sys.stderr)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        return 1
    finally:
        if d is not None:
            d.quit()
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGINT)
            try:
                dev.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
                dev.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
