"""The demo in a real browser: headless Debian Chromium driven by Playwright against the app served on 127.0.0.1.

Needs `apt-get install -y chromium` and `pip install playwright gradio matplotlib` (no browser download: Playwright
launches /usr/bin/chromium). Skipped with the reason when any of them is missing.

The page uploads a held-out image from demo/tasks.py, asks its question and checks that the streamed answer is
the right one (the bundled model's answer on an example it gets right under the demo's default ReaLB settings)
and that the heatmap, precision map and balance panels rendered. Without demo/model/ (not trained yet) the same
flow runs on the bundled architecture with random weights, and the answer is checked against the model's own
greedy answer computed in-process. Set REALB_BROWSER_SCREENSHOT=/path.png to keep a screenshot.
"""

import os
import shutil
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium not installed (apt-get install -y chromium)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_bundled_like(path: Path) -> Path:
    """The bundled model's architecture and processor with random weights (until demo/model/ is trained)."""
    import torch
    from transformers import GenerationConfig, Qwen3VLMoeForConditionalGeneration

    train = pytest.importorskip("demo.train", reason="neither demo/model/ nor demo/train.py is here")
    tokenizer = train.build_tokenizer()
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(train.build_config(tokenizer)).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.convert_tokens_to_ids(train.IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(train.PAD),
        do_sample=False,
    )
    model.save_pretrained(path)
    train.build_processor(tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The demo served in this process on a free port of 127.0.0.1, and the answers its page must show."""
    pytest.importorskip("playwright.sync_api", reason="Playwright not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="gradio not installed (pip install 'gradio>=6,<7')")
    from demo import app as demo_app
    from demo import models as demo_models
    from demo.request import run_request
    from demo.settings import DemoSettings
    from demo.tasks import IMAGE_KINDS, TEXT_KINDS, heldout_set

    trained = (demo_models.BUNDLED_MODEL_DIR / "config.json").is_file()
    model = demo_models.BUNDLED_MODEL if trained else str(random_bundled_like(tmp_path_factory.mktemp("random_model")))
    store = demo_models.ModelStore(device="cpu")
    loaded = store.get(model)

    def pick(kinds):
        """A held-out example and the answer the page must show for it: the demo's own request path with its
        default settings (48 copies, ReaLB on); for the trained model, one whose answer is right."""
        for ex in heldout_set(24, seed=0, kinds=kinds):
            images = [ex.image] if ex.image is not None else []
            *_, result = run_request(loaded, ex.question, images, DemoSettings(), store.run_lock)
            if not trained or result.answer == ex.answer:
                return ex, result.answer
        pytest.fail(f"the bundled model answered none of 24 held-out {kinds} questions right")

    image_case, text_case = pick(IMAGE_KINDS), pick(TEXT_KINDS)
    port = free_port()
    app = demo_app.launch(port=port, model=model, block=False, quiet=True, store=store)
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}/",
            app=app,
            model=model,
            image_case=image_case,
            text_case=text_case,
            trained=trained,
        )
    finally:
        app.close()


def test_demo_in_chromium(served, tmp_path):
    from playwright.sync_api import sync_playwright

    url, trained = served.url, served.trained
    (example, expected), (text_example, text_expected) = served.image_case, served.text_case
    image = tmp_path / "question.png"
    example.image.save(image)
    if trained:
        assert (expected, text_expected) == (example.answer, text_example.answer)

    start = time.monotonic()
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = open_page(browser, url, outside)
            assert page.locator("#realb-input input[type=file]").get_attribute("accept") == "image/*"

            page.set_input_files("#realb-input input[type=file]", str(image))
            page.wait_for_selector("#realb-input img", timeout=15_000)  # the upload finished: thumbnail shown
            page.fill("#realb-input textarea", example.question)
            page.press("#realb-input textarea", "Enter")

            # Watch the answer stream in until the panels of the finished request arrive.
            seen: list[str] = []
            bot = page.locator('#realb-chat [data-testid="bot"]').last
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if bot.count():
                    text = bot.inner_text().strip()
                    if text and (not seen or seen[-1] != text):
                        seen.append(text)
                if page.locator("#realb-heatmap-img").count():
                    break
                time.sleep(0.05)
            page.wait_for_selector("#realb-heatmap-img", timeout=5_000)
            answer = bot.inner_text().strip()
            assert answer == expected, f"page answered {answer!r}, expected {expected!r} (stream: {seen})"

            # The heatmap is a decoded PNG with one row per MoE layer and one column per virtual EP rank.
            heat = page.locator('#realb-heatmap [data-panel="heatmap"]')
            assert heat.get_attribute("data-layers") == "4" and heat.get_attribute("data-ranks") == "4"
            assert page.eval_on_selector("#realb-heatmap-img", "img => img.complete && img.naturalWidth > 100")
            precisions = page.locator("#realb-precision td[data-precision]").all_inner_texts()
            assert len(precisions) == 16 and set(precisions) <= {"bf16", "fp8", "nvfp4", "mxfp4"}
            assert page.locator("#realb-balance-table tr").count() == 1 + 4 + 1  # header, layers, mean
            summary = page.inner_text("#realb-summary")
            assert "48 copies" in summary and "(crossed)" in summary and "predicted MoE-layer speedup" in summary

            if os.environ.get("REALB_BROWSER_SCREENSHOT"):
                page.screenshot(path=os.environ["REALB_BROWSER_SCREENSHOT"], full_page=True)

            # A second, text-only turn (the chat history with the image goes back and forth with it).
            page.fill("#realb-input textarea", text_example.question)
            page.press("#realb-input textarea", "Enter")
            page.wait_for_function(
                """([n, answer]) => {
                    const bots = document.querySelectorAll('#realb-chat [data-testid="bot"]');
                    return bots.length === n && bots[n - 1].innerText.trim() === answer;
                }""",
                arg=[2, text_expected],
                timeout=30_000,
            )
            page.wait_for_function(  # the panels now describe the text-only prefill
                "() => document.querySelector('#realb-summary').innerText.includes('(0 image)')", timeout=10_000
            )

            # The page lists the question forms the bundled model knows; a clicked example fills the input (text
            # and image) and, sent, gets its right answer.
            if trained:
                from demo.examples import QUESTION_FORMS, examples

                forms = page.inner_text("#realb-forms")
                assert all(form in forms for form, _ in QUESTION_FORMS.values())
                colour = next(ex for ex in examples() if ex.kind == "colour")
                page.locator("#realb-examples").get_by_text(colour.question).click()
                page.locator('#realb-input [aria-label="File thumbnail"]').first.wait_for(timeout=10_000)
                assert page.input_value("#realb-input textarea") == colour.question
                page.press("#realb-input textarea", "Enter")
                page.wait_for_function(
                    """([n, answer]) => {
                        const bots = document.querySelectorAll('#realb-chat [data-testid="bot"]');
                        return bots.length === n && bots[n - 1].innerText.trim() === answer;
                    }""",
                    arg=[3, colour.answer],
                    timeout=30_000,
                )

        finally:
            browser.close()
    assert outside == [], f"the page tried to reach {outside}"
    assert time.monotonic() - start < 90


def open_page(browser, url: str, outside: list[str]):
    """A page on the demo that may reach nothing but 127.0.0.1 (anything else is recorded in `outside`)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1700})

    def only_local(route):
        if route.request.url.startswith(("http://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url)
    page.wait_for_selector("#realb-input textarea", timeout=30_000)
    return page


def test_refused_inputs_are_shown_inline_and_the_page_stays_usable(served, tmp_path):
    """Four refusals a new user meets: an empty question, 2.5 copies, a .png that is no image, a 48-megapixel image.

    Each is answered in the notice line under the input; nothing shows an "Error" badge, the chat keeps its
    history, a refused attachment leaves the input and the next valid message is answered.
    """
    from PIL import Image
    from playwright.sync_api import expect, sync_playwright

    text_example, text_expected = served.text_case
    fake = tmp_path / "fake.png"  # passes the browser's image filter by name, refused by the server by content
    fake.write_text("this is not a picture")
    huge = tmp_path / "huge.png"  # 48 megapixels, 0.1 MB: under the upload size cap, over the pixel cap
    Image.new("RGB", (8000, 6000), (255, 255, 255)).save(huge)
    outside: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = open_page(browser, served.url, outside)
            bots = page.locator('#realb-chat [data-testid="bot"]')
            thumbnails = page.locator('#realb-input [aria-label="File thumbnail"]')

            def send(question: str, attach=None) -> None:
                if attach is not None:
                    with page.expect_response(lambda r: "/upload" in r.url, timeout=15_000):
                        page.set_input_files("#realb-input input[type=file]", str(attach))
                    thumbnails.first.wait_for(timeout=15_000)
                page.fill("#realb-input textarea", question)
                page.press("#realb-input textarea", "Enter")

            def refused(reason: str, answers: int) -> None:
                try:
                    page.wait_for_function(
                        "reason => document.querySelector('#realb-notice').innerText.includes(reason)",
                        arg=reason,
                        timeout=30_000,
                    )
                except Exception as error:  # say what the page showed instead
                    shown = {
                        "notice": page.inner_text("#realb-notice"),
                        "answers": bots.all_inner_texts(),
                        "input": page.locator("#realb-input textarea").input_value(),
                        "attachments": thumbnails.count(),
                    }
                    raise AssertionError(f"no refusal naming {reason!r}; the page showed {shown}") from error
                assert page.inner_text("#realb-notice").startswith("Refused:")
                assert page.get_by_text("Error", exact=True).count() == 0, "a refusal put an Error badge on the page"
                assert bots.count() == answers and page.locator("#realb-chat").is_visible()
                assert page.locator("#realb-input textarea").is_enabled()

            def answered(answers: int) -> None:
                page.wait_for_function(
                    """([n, answer]) => {
                        const bots = document.querySelectorAll('#realb-chat [data-testid="bot"]');
                        return bots.length === n && bots[n - 1].innerText.trim() === answer;
                    }""",
                    arg=[answers, text_expected],
                    timeout=30_000,
                )
                assert page.inner_text("#realb-notice").strip() == ""  # the last refusal is gone

            send("")
            refused("type a question", 0)

            copies = page.locator("#realb-copies input[type=number]")
            copies.fill("2.5")
            copies.press("Enter")
            send(text_example.question)
            refused("batch of N copies must be a whole number, got 2.5", 0)
            question_box = page.locator("#realb-input textarea")
            expect(question_box).to_have_value(text_example.question)  # back in the input for another try
            copies.fill("48")
            copies.press("Enter")
            page.press("#realb-input textarea", "Enter")
            answered(1)

            send(text_example.question, attach=fake)
            refused("fake.png is not an image", 1)
            expect(question_box).to_have_value(text_example.question)
            expect(thumbnails).to_have_count(0)  # the refused attachment left the input
            page.press("#realb-input textarea", "Enter")  # the same question again, now without the file
            answered(2)

            send(text_example.question, attach=huge)
            refused("huge.png is 8000x6000 pixels; images are limited to 40 megapixels", 2)
            expect(question_box).to_have_value(text_example.question)
            expect(thumbnails).to_have_count(0)
            page.press("#realb-input textarea", "Enter")
            answered(3)
            texts = page.locator('#realb-chat [data-testid="user"]').all_inner_texts()
            assert [t.strip() for t in texts] == [text_example.question] * 3  # refused turns never entered the chat
        finally:
            browser.close()
    assert outside == [], f"the page tried to reach {outside}"


def test_a_new_tab_shows_the_model_loaded_since_the_server_started(served):
    """The status line of a tab opened after the first request names the loaded model ("loads on first use" was
    true only before it)."""
    from playwright.sync_api import expect, sync_playwright

    from demo import app as demo_app
    from demo.models import ModelStore

    text_example, text_expected = served.text_case
    port = free_port()
    lazy = demo_app.launch(port=port, model=served.model, block=False, quiet=True, store=ModelStore("cpu"))
    outside: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                first = open_page(browser, f"http://127.0.0.1:{port}/", outside)
                expect(first.locator("#realb-model-status")).to_have_text("Model loads on first use.")
                first.fill("#realb-input textarea", text_example.question)
                first.press("#realb-input textarea", "Enter")
                expect(first.locator('#realb-chat [data-testid="bot"]')).to_have_text(text_expected, timeout=30_000)
                expect(first.locator("#realb-model-status")).to_contain_text("Loaded", timeout=10_000)
                second = open_page(browser, f"http://127.0.0.1:{port}/", outside)
                expect(second.locator("#realb-model-status")).to_contain_text("Loaded", timeout=10_000)
                assert "first use" not in second.inner_text("#realb-model-status")
            finally:
                browser.close()
    finally:
        lazy.close()
    assert outside == [], f"the page tried to reach {outside}"


def test_server_binds_loopback_only_and_caps_uploads(served):
    from demo import app as demo_app
    from demo import inputs as demo_inputs

    assert served.app.server_name == "127.0.0.1" and served.url.startswith("http://127.0.0.1:")
    assert demo_app.build_parser().parse_args([]).host == "127.0.0.1"
    assert served.app.max_file_size == demo_inputs.MAX_UPLOAD_BYTES == 10 * 2**20
