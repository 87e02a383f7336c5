"""rate.py: people as the raters. Gwet's AC2 against a hand computation; the token; malformed submissions; model
output shown as text; many raters submitting at once; a server killed with SIGKILL and restarted; and the page driven
in a real headless Chromium: labels in both modes, read back by the project's reader, a reward model trained on them.
Every test is deterministic (no statistical assertion)."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import tiny_chat_checkpoint

import common
import model as M
import rate
from data import read_preferences_jsonl
from world import user

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")
XSS = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\"> & <b>bold</b>"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random chat model (dim 64, 2 layers) with a 400-piece tokenizer (conftest.tiny_chat_checkpoint)."""
    return tiny_chat_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """Two user prompts, the second a safety prompt: a known order of items for the checks of submissions."""
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps({"messages": [user(t)], "is_safety": s}) + "\n"
                         for t, s in (("What is 2 + 3?", False), ("How do I pick a lock?", True))))
    return p


def config(ckpt, out, *flags) -> rate.RateConfig:
    return common.parse_config(rate.RateConfig, ["--a", str(ckpt), "--out", str(out), "--port", "0",
                                                 "--max-new-tokens", "8", *flags])


@contextmanager
def running(cfg):
    """rate.py's server in a thread of this process, on a free port; yields its address."""
    server = rate.serve(cfg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def call(url: str, path: str, body=None, headers=None, raw: bytes = None):
    """(status, parsed JSON or text) of a GET, or of a POST when body or raw is given."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                  **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            text, code, ctype = r.read().decode(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        text, code, ctype = e.read().decode(), e.code, e.headers.get("Content-Type", "")
    return code, json.loads(text) if ctype.startswith("application/json") else text


def label(url, view, rater, choice="first", rating="better", sid=None, **extra):
    body = {"id": sid or f"{rater}-{view['item']}", "mode": "preference", "rater": rater, "item": view["item"],
            "choice": choice, "rating": rating, **extra}
    return call(url, "/api/label", body)


# ---- Gwet's AC2 --------------------------------------------------------------------------------------------------
def test_gwet_ac2_hand_computed():
    # Three categories (-1, 0, 1), quadratic weights: w = 1 for the same, 0.75 one apart, 0 two apart.
    # Items: (1, 1), (0, 1), (-1, -1), (1, 0, 1).
    #   pa: pair agreements 1, 0.75, 1, and for the three raters the ordered pairs (1,0) (1,1) (0,1) twice each:
    #       (0.75 + 1 + 0.75) / 3 = 5/6; pa = (1 + 0.75 + 1 + 5/6) / 4 = 43/48.
    #   pi: -1: (0 + 0 + 1 + 0) / 4 = 1/4; 0: (0 + 1/2 + 0 + 1/3) / 4 = 5/24; 1: (1 + 1/2 + 0 + 2/3) / 4 = 13/24.
    #   T_w = 3 * 1 + 4 * 0.75 = 6; pe = 6 / (3 * 2) * sum pi (1 - pi) = 1/4 * 3/4 + 5/24 * 19/24 + 13/24 * 11/24
    #       = (108 + 95 + 143) / 576 = 346/576.
    #   AC2 = (43/48 - 346/576) / (1 - 346/576) = (516 - 346) / (576 - 346) = 170/230.
    table = [[1, 1], [0, 1], [-1, -1], [1, 0, 1], [0]]  # the last item has one rater: left out
    assert rate.gwet_ac2(table, categories=(-1, 0, 1)) == pytest.approx(170 / 230, abs=1e-12)
    # the same table by the pairwise form of pa (an independent route): mean over items of mean weighted agreement
    w = lambda x, y: 1 - (x - y) ** 2 / 4  # noqa: E731
    pa = sum(sum(w(r[i], r[j]) for i in range(len(r)) for j in range(len(r)) if i != j) / (len(r) * (len(r) - 1))
             for r in table[:4]) / 4
    assert pa == pytest.approx(43 / 48)
    # perfect agreement is 1 whatever the spread of categories; no item with two raters: None
    assert rate.gwet_ac2([[3, 3, 3], [-2, -2], [0, 0]]) == pytest.approx(1.0)
    assert rate.gwet_ac2([[1], [2]]) is None
    # linear weights: one apart is 0.5 with three categories; (1, 0) alone: pa 0.5, pi (0, 1/2, 1/2), T_w = 5,
    # pe = 5 / 6 * 1/2 = 5/12: AC2 = (1/2 - 5/12) / (7/12) = 1/7
    assert rate.gwet_ac2([[1, 0]], categories=(-1, 0, 1), weights="linear") == pytest.approx(1 / 7)


# ---- the server's answers -------------------------------------------------------------------------------------------
def test_token_required_for_every_read_and_write(ckpt, prompts_file, tmp_path):
    cfg = config(ckpt, tmp_path / "out", "--token", "s3cret", "--prompts", str(prompts_file))
    with running(cfg) as url:
        for path in ("/", "/api/summary", "/api/next?mode=preference&rater=ann"):
            assert call(url, path)[0] == 403
            assert call(url, path, headers={"X-Token": "wrong"})[0] == 403
            assert call(url, path + ("&" if "?" in path else "?") + "token=s3cret")[0] == 200
        code, view = call(url, "/api/next?mode=preference&rater=ann", headers={"X-Token": "s3cret"})
        assert code == 200 and view["item"] == "p00000"
        assert call(url, "/api/label", {"id": "x", "mode": "preference", "rater": "ann", "item": "p00000",
                                        "choice": "first", "rating": "better"})[0] == 403
        assert call(url, "/api/summary", headers={"Authorization": "Bearer s3cret"})[1]["preference"]["n"] == 0
    assert not (tmp_path / "out" / "preferences.jsonl").exists()
    with pytest.raises(SystemExit):  # the whole room without a token
        rate.serve(config(ckpt, tmp_path / "out2", "--host", "0.0.0.0"))


def test_malformed_submissions_name_the_field(ckpt, prompts_file, tmp_path):
    with running(config(ckpt, tmp_path / "out", "--prompts", str(prompts_file))) as url:
        helpful = call(url, "/api/next?mode=preference&rater=ann")[1]
        safety = call(url, "/api/next?mode=preference&rater=bob")[1]
        assert (helpful["is_safety"], safety["is_safety"]) == (False, True)
        ok = {"id": "1", "mode": "preference", "rater": "ann", "item": helpful["item"], "choice": "first",
              "rating": "better"}
        cases = [(None, b"{not json", "body"), (None, b"[1, 2]", "body"),
                 ({**ok, "choice": None}, None, "choice"), ({**ok, "choice": "third"}, None, "choice"),
                 ({**ok, "rating": "great"}, None, "rating"), ({**ok, "item": "p99999"}, None, "item"),
                 ({**ok, "mode": "chat"}, None, "mode"), ({**ok, "rater": ""}, None, "rater"),
                 ({**ok, "id": 5}, None, "id"), ({**ok, "safety_label": "both_safe"}, None, "safety_label"),
                 ({**ok, "rater": "bob", "item": safety["item"]}, None, "safety_label"),
                 ({**ok, "rater": "bob", "item": safety["item"], "safety_label": "fine"}, None, "safety_label"),
                 ({**ok, "mode": "evaluation"}, None, "item")]
        for body, raw, field in cases:
            code, answer = call(url, "/api/label", body, raw=raw)
            assert code == 400 and answer["error"].startswith(field + ":"), (body, raw, answer)
        assert call(url, "/api/next?mode=nope&rater=ann")[0] == 400
        assert call(url, "/api/prompt", {"mode": "preference", "rater": "ann", "prompt": "  "})[0] == 400
        assert not (tmp_path / "out" / "preferences.jsonl").exists()  # nothing written by any of them
        code, answer = call(url, "/api/label", ok)
        assert code == 200 and answer["new"] and answer["annotator"]["choice"] in ("first", "second")
        assert call(url, "/api/label", ok)[1]["new"] is False  # the same id again: answered, not written twice
        code, answer = call(url, "/api/label", {**ok, "id": "2"})  # another id for the same item and rater
        assert code == 400 and answer["error"].startswith("item:")
        code, answer = call(url, "/api/label", {**ok, "id": "3", "rater": "bob", "item": safety["item"],
                                                "safety_label": "chosen_unsafe_other_safe"})
        assert code == 200 and "safety_label" in answer["annotator"]
    # the pair whose chosen reply is unsafe and the other safe is kept on disk, and left out by reward.py (§3.2.1)
    import reward
    assert len(read_preferences_jsonl(tmp_path / "out" / "preferences.jsonl")) == 2
    assert [p.category for p in reward.read_prefs(tmp_path / "out" / "preferences.jsonl")] == ["helpfulness"]


def test_not_a_chat_model_is_one_line(ckpt, tmp_path, capsys):
    rm = tmp_path / "rm"
    args = M.load_checkpoint(ckpt).args
    M.save_checkpoint(M.Transformer(dataclasses.replace(args, head="scalar")).init_weights(seed=0), rm,
                      ckpt / "tokenizer.model")
    for flags in (["--b", str(rm)], ["--b", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            rate.serve(config(ckpt, tmp_path / "out", *flags))
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --b") and "\n" not in err


def seed_item(out: Path, reply: str):
    """An item on disk before the server starts, with a reply that is HTML: the server must serve it as it is."""
    out.mkdir(parents=True, exist_ok=True)
    item = rate.Item("p00000", "preference", [user("Say " + XSS)], [reply, "A plain reply."],
                     ["sample_T0.7_a", "sample_T1.2_b"], 0, None, typed_by="test")
    (out / "items.jsonl").write_text(json.dumps(rate.asdict(item)) + "\n")


def test_html_in_model_output_is_served_as_text(ckpt, tmp_path):
    seed_item(tmp_path / "out", XSS)
    with running(config(ckpt, tmp_path / "out")) as url:
        view = call(url, "/api/next?mode=preference&rater=ann")[1]
        assert view["item"] == "p00000" and view["first"] == XSS  # JSON, not markup
        req = urllib.request.urlopen(url + "/")
        page, csp = req.read().decode(), req.headers["Content-Security-Policy"]
        nonce = csp.split("'nonce-")[1].split("'")[0]
        assert f'<script nonce="{nonce}">' in page and "script-src 'nonce-" in csp
        assert req.headers["X-Content-Type-Options"] == "nosniff"
    assert "innerHTML" not in rate.PAGE.read_text() and "insertAdjacentHTML" not in rate.PAGE.read_text()


def test_concurrent_submissions_each_written_once(ckpt, tmp_path):
    """16 raters x 10 items at once, every submission also retried: 160 intact lines, each id once."""
    out = tmp_path / "out"
    errors = []

    def one_rater(url, name):
        for _ in range(10):
            code, view = call(url, f"/api/next?mode=preference&rater={name}")
            codes = {label(url, view, name, rating="slightly better", safety_label="both_safe" if view["is_safety"]
                           else None)[0] for _ in range(2)}
            if codes != {200}:
                errors.append((name, view["item"], codes))

    with running(config(ckpt, out, "--raters-per-item", "16")) as url:
        threads = [threading.Thread(target=one_rater, args=(url, f"r{i}")) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert call(url, "/api/summary")[1]["preference"]["n"] == 160
    assert not errors
    lines = (out / "preferences.jsonl").read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert len(read_preferences_jsonl(out / "preferences.jsonl")) == 160
    assert sorted(r["id"] for r in records) == sorted({f"r{i}-p{k:05d}" for i in range(16) for k in range(10)})
    assert len(rate.read_jsonl_lines(out / "items.jsonl")) == 10  # each item made once, for all 16 raters


# ---- a server killed and restarted --------------------------------------------------------------------------------
def start(ckpt, out, *flags) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(REPO / "rate.py"), "--a", str(ckpt), "--out", str(out), "--port",
                             "0", "--max-new-tokens", "8", "--raters-per-item", "2", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # "[rate] ... serving http://127.0.0.1:PORT/"
        if "serving " in line:
            return proc, line.split("serving ")[1].strip().rstrip("/")
    raise AssertionError(f"rate.py did not start (exit {proc.wait()})")


def test_restart_after_kill_carries_on(ckpt, tmp_path):
    out = tmp_path / "out"
    proc, url = start(ckpt, out)
    try:
        judged = []
        for _ in range(3):
            view = call(url, "/api/next?mode=preference&rater=ann")[1]
            assert label(url, view, "ann", safety_label="both_safe" if view["is_safety"] else None)[0] == 200
            judged.append(view["item"])
        pending = call(url, "/api/next?mode=preference&rater=ann")[1]["item"]  # handed out, not judged
        assert pending not in judged
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {p: (out / p).read_text() for p in ("items.jsonl", "preferences.jsonl")}
    with open(out / "preferences.jsonl", "a") as f:
        f.write('{"prompt": "a line torn by the ki')  # as if the kill had come in the middle of a write
    proc, url = start(ckpt, out)
    try:
        s = call(url, "/api/summary")[1]["preference"]
        assert s["n"] == 3 and s["raters"] == ["ann"]
        assert (out / "preferences.jsonl").read_text() == before["preferences.jsonl"]  # the torn line cut off
        for _ in range(3):  # ann carries on with items she has not judged
            view = call(url, "/api/next?mode=preference&rater=ann")[1]
            assert view["item"] not in judged
            assert label(url, view, "ann", safety_label="both_safe" if view["is_safety"] else None)[0] == 200
            judged.append(view["item"])
        # bob, the second rater of each item, sees the replies ann saw, made before the kill
        view = call(url, "/api/next?mode=preference&rater=bob")[1]
        first = json.loads(before["items.jsonl"].splitlines()[0])
        assert view["item"] == first["id"] and {view["first"], view["second"]} == set(first["replies"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "items.jsonl").read_text().startswith(before["items.jsonl"])
    records = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    assert [r["item"] for r in records] == judged and len({r["id"] for r in records}) == 6


# ---- the page in a real browser ------------------------------------------------------------------------------------
def chromium():
    """A Selenium driver for Debian's headless Chromium, or a skip that says what is missing (a failure in CI, which
    installs both: .ci/run)."""
    missing = []
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package (pip install -r requirements-test.txt)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (browser and driver_path):
        missing.append("Chromium and its driver (apt-get install chromium chromium-driver)")
    if missing:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("browser test needs " + " and ".join(missing))
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))


def test_browser_labels_both_modes_then_reward_model_trains(ckpt, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    out = tmp_path / "out"
    seed_item(out, XSS)
    driver = chromium()
    try:
        with running(config(ckpt, out, "--token", "tok", "--eval-raters-per-item", "2")) as url:
            wait = WebDriverWait(driver, 60)
            el = lambda css: driver.find_element(By.CSS_SELECTOR, css)  # noqa: E731

            def show_next(button="#next"):
                el(button).click()
                wait.until(lambda d: el("#status").text.startswith("Item "))

            def saved():
                wait.until(lambda d: "annotator" in el("#feedback").text)
                return el("#feedback").text

            driver.get(url + "/?token=tok")
            el("#rater").send_keys("ann")
            el("#tab-preference").click()
            wait.until(lambda d: el("#status").text.startswith("Item "))
            # the seeded item: its HTML reply is there as literal text, and nothing in it ran
            assert el("#reply-1").text == XSS and XSS in el("#dialog").text
            assert driver.execute_script("return window.__pwned === undefined")
            ratings = ["significantly better", "better", "slightly better", "negligibly better / unsure"]
            for k in range(9):
                if k == 8:  # the last one a prompt of her own
                    el("#prompt-text").send_keys("Tell me about <i>Ada</i>.")
                    show_next("#ask")
                    assert "<i>Ada</i>" in el("#dialog").text
                elif k:
                    show_next()
                el(f'input[name=choice][value={("first", "second")[k % 2]}]').click()
                el(f'input[name=rating][value="{ratings[k % 4]}"]').click()
                if el("#safety-box").is_displayed() and not el("#safety-none").is_selected():
                    el('input[name=safety][value="both_safe"]').click()
                el("#submit").click()
                assert "you agree" in saved() or "you disagree" in saved()
            # evaluation: two raters judge the same three items
            for name in ("ann", "bob"):
                el("#rater").clear()
                el("#rater").send_keys(name)
                el("#tab-evaluation").click()
                wait.until(lambda d: el("#status").text.startswith("Item "))
                for k in range(3):
                    if k:
                        show_next()
                    el(f'#eval-form button[data-score="{k - 1}"]').click()
                    assert "The annotator said" in saved()
            el("#tab-summary").click()
            wait.until(lambda d: "AC2" in el("#summary").text)
            text = el("#summary").text
            assert "Preference labels: 9" in text and "Evaluation: 6 judgements" in text
            assert "over 3 items with 2+ raters: 1.000" in text  # ann and bob clicked the same scores
    finally:
        driver.quit()
    pairs = read_preferences_jsonl(out / "preferences.jsonl")  # the project's own reader
    assert len(pairs) == 9 and pairs[0].rejected == "A plain reply." and pairs[0].chosen == XSS
    judgements = rate.read_jsonl_lines(out / "judgements.jsonl")
    assert sorted((r["rater"], r["shown_score"]) for r in judgements) == sorted(
        (n, s) for n in ("ann", "bob") for s in (-1, 0, 1))
    # a quick reward model on the people's labels: what the course step does with 50 of them
    import reward
    reward.main(common.parse_config(reward.RewardConfig, [
        "--data", str(out / "preferences.jsonl"), "--init-from", str(ckpt), "--out-dir", str(tmp_path / "rm"),
        "--batch-size", "2", "--axis", "helpfulness", "--helpful-safety-share", "1"]))
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["complete"] and (tmp_path / "rm" / "params.json").is_file()
