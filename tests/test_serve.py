"""`realb-hf serve` on the bundled model: a real server process on 127.0.0.1, spoken to with the OpenAI client.

Answers (text, an image as a data: URI, 16 at once) equal `generate` of the same model loaded with the same ReaLB
settings; /metrics carries the realb_ series and the per-request ones; the model is pinned; bad flags are named.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import realb_hf  # noqa: E402
from realb_hf.bundled import bundled_model_dir  # noqa: E402
from realb_hf.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from demo import tasks  # noqa: E402

STARTUP_S = 180  # bounded wait for the server to answer /health (imports and loading on a 2-core CPU)
# virtual EP=4 and thresholds at 0: image-heavy ranks are lowered to fp8 even in a one-request batch
KNOBS = dict(ep_size=4, batch_threshold=0, modality_threshold=0.5, imbalance_threshold=0.0)
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in KNOBS.items()]
EXAMPLES = tasks.heldout_set(16, seed=3)  # two of every kind: half with an image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def post(url: str, body: bytes = b"{}") -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, log file) of `realb-hf serve` in its own process, stopped by its PID afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    command = [sys.executable, "-m", "realb_hf.cli", "serve", str(bundled_model_dir()), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, "--device", "cpu", "--log-level", "debug", *FLAGS], stdout=out, stderr=out, env=env
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"no answer on {base}/health after {STARTUP_S}s:\n{log.read_text()[-3000:]}"
            )
            try:
                if get(f"{base}/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        yield base, log
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def reference():
    """(model, processor): the bundled model loaded in this process with the server's ReaLB settings."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = bundled_model_dir()
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=realb_hf.RealbConfig(**KNOBS)
    ).eval()
    return model, AutoProcessor.from_pretrained(path)


def generate(reference, example) -> str:
    model, processor = reference
    inputs = processor.apply_chat_template(
        example.messages(), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def openai_content(example) -> list[dict]:
    """The example's message as OpenAI content parts; the image as a PNG data: URI."""
    parts = []
    if example.image is not None:
        png = io.BytesIO()
        example.image.save(png, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        parts.append({"type": "image_url", "image_url": {"url": uri}})
    return [*parts, {"type": "text", "text": example.question}]


_CLIENTS: dict[str, object] = {}


def client_for(base: str):
    """One OpenAI client per server, shared by the test's threads (the client is thread-safe)."""
    if base not in _CLIENTS:
        _CLIENTS[base] = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    return _CLIENTS[base]


def ask(base: str, example) -> str:
    reply = client_for(base).chat.completions.create(
        model=str(bundled_model_dir()),
        messages=[{"role": "user", "content": openai_content(example)}],
        max_tokens=8,
        temperature=0,
    )
    return reply.choices[0].message.content.strip()


def test_text_and_image_answers_equal_generate(server, reference):
    base, _ = server
    text = next(e for e in EXAMPLES if e.image is None)
    image = next(e for e in EXAMPLES if e.image is not None)
    for example in (text, image):
        expected = generate(reference, example)
        assert ask(base, example) == expected == example.answer  # the bundled model answers these right
    assert realb_hf.get_telemetry(reference[0]).summary()["lowered_token_fraction"] > 0  # ReaLB lowered pairs
    stream = client_for(base).chat.completions.create(
        model=str(bundled_model_dir()),
        messages=[{"role": "user", "content": openai_content(image)}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream).strip() == image.answer


def test_sixteen_concurrent_requests_equal_sequential_ones(server, reference):
    base, _ = server
    sequential = [ask(base, e) for e in EXAMPLES]
    with ThreadPoolExecutor(len(EXAMPLES)) as pool:
        concurrent = list(pool.map(lambda e: ask(base, e), EXAMPLES))
    assert concurrent == sequential
    assert sequential == [generate(reference, e) for e in EXAMPLES]


def metrics(base: str) -> dict[str, float]:
    status, text = get(f"{base}/metrics")
    assert status == 200
    return {
        f"{s.name}{dict(sorted(s.labels.items())) or ''}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_show_realb_series_and_per_request_telemetry(server):
    base, log = server
    before = metrics(base)
    example = next(e for e in EXAMPLES if e.image is not None)
    ask(base, example)
    after = metrics(base)
    assert after["realb_requests_total"] == before.get("realb_requests_total", 0) + 1
    assert after["realb_request_lowered_pair_share_count"] == after["realb_requests_total"]
    assert after["realb_request_lowered_pair_share_sum"] > before.get("realb_request_lowered_pair_share_sum", 0)
    assert after["realb_forwards_total"] > before.get("realb_forwards_total", 0)
    lowered = [k for k, v in after.items() if k.startswith("realb_lowered_token_pairs_total") and v > 0]
    assert lowered, "no layer counted lowered token-expert pairs"
    lines = [line for line in log.read_text().splitlines() if "realb_hf.serve: request" in line]
    assert lines and "% of token-expert pairs in low precision" in lines[-1]


def test_the_model_is_pinned(server):
    base, _ = server
    status, body = post(f"{base}/load_model", b'{"model": "gpt2"}')
    assert status == 403 and "--allow-model-loading" in body
    status, body = post(f"{base}/reset")
    assert status == 403 and "unload" in body
    status, body = get(f"{base}/v1/models")
    assert status == 200 and str(bundled_model_dir()) in body
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "3 + 4 ="}], max_tokens=2)
    assert "pinned" in refused.value.response.text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "--port: must be a whole number >= 1"),
        (["--port", "70000"], "--port: must be a TCP port between 1 and 65535"),
        (["--policy", "fast"], "--policy: invalid choice: 'fast'"),
        (["--log-level", "loud"], "--log-level: invalid choice: 'loud'"),
        (["--modality-threshold", "2"], "--modality-threshold: "),
        (["--ep-size", "3"], "--ep-size 3: ep_size=3 must divide the number of experts"),
        (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: not an address of this machine"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    assert exit_code(["serve", str(bundled_model_dir()), "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """main's return value, or the exit code of argparse's own error."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code


def test_a_busy_port_and_torchrun_are_refused(capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(bundled_model_dir()), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["serve", str(bundled_model_dir())]) == 2
    assert "integrations/torchrun/run_ep.py" in capsys.readouterr().err


def test_continuous_batching_is_refused_at_startup_for_the_vision_model(capsys):
    """transformers' continuous batching serves text-only models: the bundled VLM says so and falls back."""
    from realb_hf.serve import build_server

    served = build_server(str(bundled_model_dir()), realb_hf.RealbConfig(), device="cpu", continuous_batching=True)
    assert not served.continuous_batching
    assert served.startup_notes == [
        "continuous batching is not available for Qwen3VLMoeForConditionalGeneration (MULTIMODAL model: "
        "transformers' continuous batching serves text-only models); requests run one after another with model.generate"
    ]


def test_a_text_moe_with_realb_runs_in_continuous_batching(tmp_path):
    """A ReaLB text MoE in transformers' continuous batching (what `--continuous-batching` runs for text models):
    the same tokens as one-by-one generate, and telemetry records the batches it forms, prefill chunks mixed with
    other requests' decode steps."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    from realb_hf.tiny import build_tiny_model, tiny_qwen3_moe_config

    build_tiny_model(tiny_qwen3_moe_config()).save_pretrained(tmp_path)
    config = realb_hf.RealbConfig(ep_size=2, batch_threshold=0, modality_threshold=0.0, imbalance_threshold=0.0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, quantization_config=config).eval()
    prompts = [list(range(10 + i, 30 + 3 * i)) for i in range(4)]  # 20..29 tokens
    generation = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=1, pad_token_id=0)
    one_by_one = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
        one_by_one.append(out[0, len(prompt) :].tolist())
    telemetry = realb_hf.get_telemetry(model)
    telemetry.reset()
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=24)  # prefill in chunks
    results = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching)
    assert [results[f"req_{i}"].generated_tokens for i in range(len(prompts))] == one_by_one
    first_layer = [r for r in telemetry.records if r.layer == telemetry.records[0].layer]
    assert len(first_layer) == telemetry.forwards  # one record per forward CB ran
    sizes = [r.num_tokens for r in first_layer]
    total = sum(len(p) for p in prompts) + len(prompts) * (generation.max_new_tokens - 1)
    assert sum(sizes) == total and max(sizes) == 24 and len(sizes) < total / 4  # batches of several requests
    assert any(r.lowered_fraction > 0 for r in telemetry.records)  # ReaLB lowered ranks in those batches


def test_allow_model_loading_keeps_transformers_load_route_but_never_reset():
    from fastapi.testclient import TestClient

    from realb_hf.serve import build_server

    served = build_server(str(bundled_model_dir()), realb_hf.RealbConfig(), device="cpu", allow_model_loading=True)
    endpoints = {r.path: r.endpoint.__name__ for r in served.app.routes if hasattr(r, "endpoint")}
    assert endpoints["/load_model"] == "load_model"  # transformers' own: loads with these ReaLB settings
    reply = TestClient(served.app).post("/reset")
    assert reply.status_code == 403 and "unload" in reply.text


def test_the_bundled_tokenizer_declares_the_response_template_its_training_script_sets():
    """transformers' server finds the answer with the tokenizer's response template; the word-level tokenizer
    decodes `<|im_start|>assistant\\n` as `<|im_start|> assistant`, which Qwen's fallback template would miss."""
    from transformers import AutoTokenizer

    from demo import train

    assert AutoTokenizer.from_pretrained(bundled_model_dir()).response_template == train.RESPONSE_TEMPLATE
    assert train.build_tokenizer().response_template == train.RESPONSE_TEMPLATE
