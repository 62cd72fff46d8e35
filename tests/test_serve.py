"""`leantune serve` over real HTTP on 127.0.0.1: the official openai client, raw requests for the
malformed cases, dynamic adapters, a client that goes away, and SIGTERM."""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

import leantune as lt
from conftest import randomize_adapter
from leantune.eval.generation import generate
from leantune.serving.app import create_app
from leantune.serving.engine import Engine, Request
from leantune.serving.registry import AdapterRegistry, ServeError, attach_adapter

KEY = "secret"
PROMPTS = ["def add(a, b):", "The capital of", "import numpy as", "for i in range(", "# a test\n", "x = [1, 2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trained_adapter(folder: Path, config, seed: int) -> Path:
    model = lt.load_model("tiny-llama")
    torch.manual_seed(seed)  # LoRA's A starts from the global generator: the same adapter in any test order
    lt.attach(model, config)
    randomize_adapter(model, scale=0.15, seed=seed)
    lt.save_adapter(model, folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = trained_adapter(root / "a", lt.LoRA(r=4, alpha=8), 1)
    b = trained_adapter(root / "b", lt.DoRA(r=2, alpha=4), 2)
    c = trained_adapter(root / "sub" / "c", lt.IA3(), 3)
    trained_adapter(root / "sub" / "prompt", lt.PromptTuning(num_virtual_tokens=2), 4)
    return {"root": root, "a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def server(adapters):
    model, tokenizer = lt.load_model("tiny-llama"), lt.load_tokenizer("tiny-llama")
    paths = {"a": str(adapters["a"]), "b": str(adapters["b"])}
    for name, path in paths.items():
        attach_adapter(model, name, path)
    engine = Engine(model, tokenizer, max_batch=4, max_queue=64)
    registry = AdapterRegistry(engine, "tiny-llama", str(adapters["root"]), paths)
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(create_app(engine, registry, KEY), host="127.0.0.1", port=port,
                                         log_level="error"))
    engine.start()
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not http.started and time.time() < deadline:
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "engine": engine, "registry": registry, "tokenizer": tokenizer}
    http.should_exit = True
    thread.join(timeout=30)
    engine.stop()


@pytest.fixture(scope="module")
def reference(adapters):
    """Direct greedy generation, one adapter at a time, on a separate model."""
    model, tokenizer = lt.load_model("tiny-llama"), lt.load_tokenizer("tiny-llama")
    for name in ("a", "b"):
        attach_adapter(model, name, adapters[name])

    def run(adapter, prompt, max_tokens):
        lt.use(model, adapter)
        return generate(model, tokenizer, [prompt], max_new_tokens=max_tokens)[0]
    return run


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_completions_per_adapter_equal_direct_generation_also_when_requests_share_steps(server, reference):
    jobs = [(["a", "tiny-llama", "b"][i % 3], prompt) for i, prompt in enumerate(PROMPTS)]

    def ask(job):
        model, prompt = job
        return client(server).completions.create(model=model, prompt=prompt, max_tokens=10, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    for (model, prompt), answer in zip(jobs, answers):
        expected = reference(None if model == "tiny-llama" else model, prompt, 10)
        assert answer.choices[0].text == expected, (model, prompt)
        usage = answer.usage
        assert usage.prompt_tokens == len(server["tokenizer"](prompt)["input_ids"])
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > usage.prompt_tokens
    assert len({a.choices[0].text for a in answers}) > 1


def test_chat_and_streaming_through_the_openai_client(server, reference):
    messages = [{"role": "user", "content": "Write a test."}]
    chat = client(server).chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0)
    prompt = server["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.choices[0].message.content == reference("b", prompt, 8)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    stream = client(server).completions.create(model="a", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == reference("a", PROMPTS[0], 10)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and chunks[-1].usage.completion_tokens >= 1
    chat_stream = client(server).chat.completions.create(model="b", messages=messages, max_tokens=8, temperature=0,
                                                         stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat_stream) == chat.choices[0].message.content


def test_models_list_adapters_with_the_base_as_parent_and_stop_strings_and_seeds_work(server, reference):
    cards = {m.id: m for m in client(server).models.list().data}
    assert set(cards) == {"tiny-llama", "a", "b"} and cards["a"].parent == "tiny-llama"
    candidates = [f"{word} {i}" for i in range(4) for word in ("hello", "abc", "def", "x =", "print(")] + PROMPTS
    # a continuation with two distinct printable characters, the second of which becomes the stop string
    prompt, full = next((p, text) for p in candidates for text in [reference("a", p, 12)]
                        if len({c for c in text if c.isprintable() and c != "\ufffd"}) >= 2)
    stop = next(ch for ch in full[1:] if ch != full[0] and ch.isprintable() and ch != "\ufffd")
    answer = client(server).completions.create(model="a", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)] and answer.choices[0].finish_reason == "stop"
    sampled = [client(server).completions.create(model="a", prompt=PROMPTS[2], max_tokens=8, temperature=1.0,
                                                 top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"model": "a"}).encode(), 400, "prompt: Field required"),
    (json.dumps({"model": "a", "prompt": 3}).encode(), 400, "prompt"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model 'nope' does not exist"),
    (json.dumps({"model": "a", "prompt": "x", "max_tokens": 0}).encode(), 400, "max_tokens must be at least 1"),
    (json.dumps({"model": "a", "prompt": "x" * 300, "max_tokens": 400}).encode(), 400, "exceeds the model's context"),
    (json.dumps({"model": "a", "prompt": ""}).encode(), 400, "the prompt is empty"),
    (json.dumps({"model": "a", "prompt": "x", "n": 3}).encode(), 400, "n: not supported by this server"),
    (json.dumps({"model": "a", "prompt": "x", "logprobs": 0}).encode(), 400, "logprobs: not supported"),
    (json.dumps({"model": "a", "prompt": "x", "presence_penalty": 0.5}).encode(), 400, "presence_penalty: not"),
    (json.dumps({"model": "a", "prompt": "x", "echo": True}).encode(), 400, "echo: not supported"),
    (json.dumps({"model": "a", "prompt": "x", "max_tokens": True}).encode(), 400, "max_tokens"),  # not 1
    (json.dumps({"model": "a", "prompt": "x", "temperature": "0"}).encode(), 400, "temperature"),
])
def test_bad_requests_get_openai_error_json_and_the_server_keeps_serving(server, body, status, fragment):
    reply = httpx.post(server["url"] + "/v1/completions", content=body, timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert reply.status_code == status
    error = reply.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert client(server).completions.create(model="a", prompt="ok", max_tokens=2, temperature=0).choices


def test_openai_parameters_at_their_defaults_are_accepted_and_others_refused_by_name(server):
    """n, penalties, logprobs, tools...: the server does not implement them; a request that sets one
    to a value asking for more than the default is refused (400 naming it), never answered as if
    the parameter were not there."""
    plain = {"n": 1, "best_of": 1, "logprobs": None, "echo": False, "presence_penalty": 0.0, "frequency_penalty": 0,
             "logit_bias": {}, "suffix": None, "user": "someone", "stream_options": None}
    reply = client(server).completions.create(model="a", prompt="ok", max_tokens=2, temperature=0, **plain)
    assert reply.choices
    nulls = {"top_p": None, "stream": None, "ignore_eos": None}  # null is the default, as in OpenAI's API
    again = client(server).completions.create(model="a", prompt="ok", max_tokens=2, temperature=0, extra_body=nulls)
    assert again.choices[0].text == reply.choices[0].text
    chat = dict(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert client(server).chat.completions.create(**chat, logprobs=False, response_format={"type": "text"}).choices
    with pytest.raises(openai.BadRequestError) as refused:
        client(server).chat.completions.create(**chat, logprobs=True)
    assert refused.value.body["param"] == "logprobs" and refused.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError, match="tools: not supported"):
        client(server).chat.completions.create(**chat, tools=[{"type": "function", "function": {"name": "f"}}])


def test_chat_content_as_text_parts_equals_plain_text_and_other_parts_are_refused(server):
    chat = dict(model="a", max_tokens=4, temperature=0)
    plain = client(server).chat.completions.create(**chat, messages=[{"role": "user", "content": "say hi"}])
    parts = client(server).chat.completions.create(**chat, messages=[
        {"role": "user", "content": [{"type": "text", "text": "say "}, {"type": "text", "text": "hi"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="messages.0.content: only text is supported .* 'image_url'"):
        client(server).chat.completions.create(**chat, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])


def test_a_wrong_api_key_is_401(server):
    reply = httpx.get(server["url"] + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"


def test_adapters_load_and_unload_under_the_root_only(server, adapters):
    headers = {"Authorization": f"Bearer {KEY}"}
    post = lambda path, body: httpx.post(server["url"] + path, json=body, headers=headers, timeout=60)  # noqa: E731
    assert post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "../../etc"}).status_code == 403
    outside = adapters["root"].parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    (adapters["root"] / "link").symlink_to(outside)
    assert post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "link"}).status_code == 403
    assert post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(outside)}).status_code == 403
    # a real folder inside the root whose files link to an adapter outside it
    shutil.copytree(adapters["c"], outside / "c", dirs_exist_ok=True)
    (adapters["root"] / "links").mkdir(exist_ok=True)
    for file in (outside / "c").iterdir():
        (adapters["root"] / "links" / file.name).symlink_to(file)
    linked = post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "links"})
    assert linked.status_code == 403 and "a link that points outside the adapter root" in linked.json()["error"]["message"]
    for unusable in ("a\u0000b", "x" * 5000):
        assert post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": unusable}).status_code == 400
    assert post("/v1/load_lora_adapter", {"lora_name": "c ", "lora_path": "sub/c"}).status_code == 400
    refused = post("/v1/load_lora_adapter", {"lora_name": "p", "lora_path": "sub/prompt"})
    assert refused.status_code == 400 and "run it per row with model.generate" in refused.json()["error"]["message"]
    assert post("/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "sub/c"}).status_code == 200
    answer = client(server).completions.create(model="c", prompt="x = 1", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert post("/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    assert post("/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="c", prompt="x", max_tokens=2)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    with httpx.stream("POST", server["url"] + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "a", "prompt": "hello", "max_tokens": 400, "temperature": 0.8,
                            "stream": True}) as reply:
        next(reply.iter_lines())
    deadline = time.time() + 20
    while server["engine"].running and time.time() < deadline:
        time.sleep(0.1)
    assert not server["engine"].running


def test_a_full_queue_is_429_not_unbounded_memory():
    model, tokenizer = lt.load_model("tiny-llama"), lt.load_tokenizer("tiny-llama")
    engine = Engine(model, tokenizer, max_queue=1)  # not started: what is submitted stays queued
    engine.submit(Request([1, 2], None, 4))
    app = create_app(engine, AdapterRegistry(engine, "tiny-llama"))
    port = free_port()
    http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=http.run, daemon=True)
    thread.start()
    while not http.started:
        time.sleep(0.05)
    try:
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": "tiny-llama", "prompt": "x"},
                           timeout=30)
        assert reply.status_code == 429 and "--max-queue" in reply.json()["error"]["message"]
    finally:
        http.should_exit = True
        thread.join(timeout=30)


def test_sigterm_finishes_the_request_in_flight_and_exits_0(adapters):
    port = free_port()
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "leantune", "serve", "--model", "tiny-llama", "--port", str(port),
                                "--adapter", f"a={adapters['a']}"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"model": "a", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120) as reply:
            lines = (line for line in reply.iter_lines() if line.startswith("data: "))
            next(lines)  # the request is in flight: its first token is out
            process.send_signal(signal.SIGTERM)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]"
        usage = [json.loads(line[6:])["usage"] for line in rest[:-1] if json.loads(line[6:]).get("usage")]
        assert usage[-1]["completion_tokens"] == 200  # finished in full, not cut off by the shutdown
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_the_running_batch_equals_each_row_alone_across_joins_leaves_and_cache_growth(adapters, monkeypatch):
    """Rows join, leave and outgrow their cache's room (HEADROOM 3): every step's logits equal the
    row's whole sequence run alone with its adapter, without a cache."""
    import torch

    from leantune.serving.batch import GrowingLayer, RunningBatch

    monkeypatch.setattr(GrowingLayer, "HEADROOM", 3)
    model = lt.load_model("tiny-llama").eval()
    for name in ("a", "b"):
        attach_adapter(model, name, adapters[name])
    generator = torch.Generator().manual_seed(0)
    rows = [{"ids": torch.randint(3, 200, (n,), generator=generator).tolist(), "adapter": a}
            for n, a in ((7, "a"), (3, "b"), (20, None), (5, "a"))]

    def alone(row):
        lt.use(model, row["adapter"])
        with torch.no_grad():
            return model(input_ids=torch.tensor([row["ids"]])).logits[0, -1]

    batch, running = RunningBatch(model), []

    def check(logits, members):
        for row, got in zip(members, logits):
            torch.testing.assert_close(got, alone(row), rtol=1e-4, atol=1e-4)

    for joining in ([rows[0], rows[1]], [rows[2]], [], [rows[3]], [], []):
        if joining:
            check(batch.prefill([r["ids"] for r in joining], [r["adapter"] for r in joining]), joining)
            running += joining
        for _ in range(4):
            for row in running:
                row["ids"].append(int(torch.randint(3, 200, (1,), generator=generator)))
            check(batch.decode([r["ids"][-1] for r in running]), running)
        if any(r is rows[2] for r in running):  # the longest leaves: the front columns only it used are cut off
            width = batch.mask.shape[1]
            kept = [i for i, r in enumerate(running) if r is not rows[2]]
            batch.keep(kept)
            running = [running[i] for i in kept]
            assert batch.mask.shape[1] == width - (len(rows[2]["ids"]) - max(len(r["ids"]) for r in running)) < width
    assert isinstance(batch.cache.layers[0], GrowingLayer)


def test_an_unexpected_failure_answers_without_its_internals_and_the_server_goes_on(server, monkeypatch, caplog):
    batch = server["engine"].batch
    real_decode = batch.decode

    def failing_decode(tokens):
        raise RuntimeError("/home/someone/secret/path.bin is gone")

    monkeypatch.setattr(batch, "decode", failing_decode)
    with caplog.at_level("ERROR", logger="leantune.serve"):
        reply = httpx.post(server["url"] + "/v1/completions", timeout=60, headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "a", "prompt": "hello", "max_tokens": 5, "temperature": 0})
    monkeypatch.setattr(batch, "decode", real_decode)
    assert reply.status_code == 500 and reply.json()["error"]["type"] == "server_error"
    assert "secret" not in reply.text and "RuntimeError" in reply.json()["error"]["message"]
    assert any("secret/path.bin" in str(record.exc_info[1]) for record in caplog.records if record.exc_info)
    answer = client(server).completions.create(model="a", prompt="hello", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason in ("length", "stop")


# -- prompts as the registry encodes them ---------------------------------------------------------

def registry_with(tokenizer) -> AdapterRegistry:
    return AdapterRegistry(Engine(lt.load_model("tiny-llama"), tokenizer, max_batch=1, max_queue=1), "tiny-llama")


def test_a_chat_prompt_is_the_templates_tokens_with_no_second_bos():
    """A tokenizer that adds BOS under a template that writes it too (Llama, Mistral, Gemma): once."""
    from helpers import bos_adding_tokenizer

    tokenizer, bos = bos_adding_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    registry = registry_with(tokenizer)
    messages = [{"role": "user", "content": "Write a test."}]
    request = registry.request("tiny-llama", registry.chat_prompt(messages), 4, 0.0, 1.0, (), None, chat=True)
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert request.prompt_ids == list(expected) and request.prompt_ids.count(bos) == 1
    completion = registry.request("tiny-llama", "hi", 4, 0.0, 1.0, (), None)
    assert completion.prompt_ids[0] == bos  # a completion prompt is text: the tokenizer's own BOS stays


def test_a_template_that_refuses_the_messages_is_a_400_with_its_sentence():
    tokenizer = lt.load_tokenizer("tiny-llama")
    tokenizer.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                               "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                               "{{ m['content'] }}{% endfor %}")
    with pytest.raises(ServeError, match="chat template refuses them: Conversation roles must alternate") as caught:
        registry_with(tokenizer).chat_prompt([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert caught.value.status == 400


def test_a_prompt_far_beyond_the_context_is_refused_without_tokenizing_it(monkeypatch):
    registry = registry_with(lt.load_tokenizer("tiny-llama"))
    registry.request("tiny-llama", "warm", 4, 0.0, 1.0, (), None)  # reads the vocabulary's longest token
    monkeypatch.setattr(registry.engine, "tokenizer", None)  # tokenizing now would fail loudly
    with pytest.raises(ServeError, match=r"the prompt \(.* characters\) exceeds the model's context of 512 tokens"):
        registry.request("tiny-llama", "word " * 1_000_000, 4, 0.0, 1.0, (), None)


def test_usage_counts_the_end_token_as_a_completion_token():
    from leantune.serving.app import _usage

    request = Request([1, 2, 3], None, 8)
    request.generated = [5, 6]
    assert _usage(request)["completion_tokens"] == 2
    request.ended_on_eos = True
    assert _usage(request) == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_a_busy_port_and_a_missing_adapter_root_are_one_sentence_before_loading(capsys):
    from helpers import assert_one_line_user_error
    from leantune import cli

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy = holder.getsockname()[1]
        assert cli.main(["serve", "--model", "tiny-llama", "--port", str(busy)]) == 2
        assert_one_line_user_error(capsys.readouterr().err, "serve",
                                   rf"cannot listen on 127.0.0.1:{busy} \(.*\); choose another --port or --host")
    assert cli.main(["serve", "--model", "tiny-llama", "--adapter-root", "no-such-root"]) == 2
    assert_one_line_user_error(capsys.readouterr().err, "serve", r"--adapter-root 'no-such-root' is not a directory")
