import socket

import pytest
import torch

from realb_hf.tiny import build_tiny_model, qwen3_vl_image_batch, tiny_qwen3_vl_moe_config

LOOPBACK = {None, "", "localhost", "127.0.0.1", "::1", "0.0.0.0"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never use the network: a test that looks up any host but this machine fails, naming the host, even
    when the code under test catches the lookup's error. Names under `.invalid` never resolve (RFC 2606), so tests
    of bad host names use them and are answered here without asking a resolver."""
    lookups = []
    lookup = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in LOOPBACK:
            if not name.endswith(".invalid"):
                lookups.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"tests do not use the network (lookup of {name!r})")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    yield
    if lookups:
        pytest.fail(f"the test tried to reach the network: {sorted(set(lookups))}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """A tiny stock Qwen3-VL-MoE (8 experts, top-2) saved with save_pretrained."""
    config = tiny_qwen3_vl_moe_config()
    model = build_tiny_model(config)
    path = tmp_path_factory.mktemp("tiny_qwen3_vl_moe")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def qwen_batch():
    return qwen3_vl_image_batch(batch=2, config=tiny_qwen3_vl_moe_config())


def load_qwen(path, **realb_kwargs):
    """Load the tiny model; with ReaLB when any RealbConfig field is given (or `realb=True`)."""
    from transformers import AutoModelForImageTextToText

    import realb_hf

    use = realb_kwargs.pop("realb", bool(realb_kwargs))
    extra = {"quantization_config": realb_hf.RealbConfig(**realb_kwargs)} if use else {}
    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16, **extra).eval()
