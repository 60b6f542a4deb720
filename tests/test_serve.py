"""``reft-edge serve``: the official openai client against the server on a tiny bundle, each request
with its own patch; concurrent rows equal each request alone (greedy); hostile requests get
OpenAI-style errors and the server keeps serving. The slow test runs the default model.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest
from click.testing import CliRunner

from conftest import train_tiny_patches
from reft_edge.cli import main
from reft_edge.runtime import Patch, Runtime
from reft_edge.runtime.serve import serving

openai = pytest.importorskip("openai")

QUESTIONS = [
    "What is the weather like today?",
    "How do I bake a cake?",
    "Tell me about your weekend.",
    "hello world",
    "question answer",
    "The quick brown fox",
]
PROMPTS = ["What is the weather like today?", "Tell me about your weekend.", "hello"]
PENALTY = 10.0  # the tiny model repeats its input token without it (as in test_runtime)
GREEDY = dict(temperature=0, extra_body={"repetition_penalty": PENALTY})


@pytest.fixture(scope="module")
def patch_dir(tiny_backbone, tmp_path_factory):
    """fox, beach, steer (tiny patches), skills (steer's two rank rows as skills a and b) and a damaged file."""
    folder = tmp_path_factory.mktemp("serve-patches")
    paths = train_tiny_patches(
        tiny_backbone, tmp_path_factory.mktemp("serve-train"), QUESTIONS, ("fox", "beach", "steer")
    )
    for name, path in paths.items():
        shutil.copy(path, folder / f"{name}.reft")
    steer = Patch.load(paths["steer"])
    replace(steer, name="skills", skills=(("a", 1), ("b", 1))).to_file(folder / "skills.reft")
    (folder / "broken.reft").write_bytes(b"not a patch")
    return folder


@pytest.fixture(scope="module")
def rt(tiny_bundle):
    return Runtime.load(tiny_bundle, threads=2)


@pytest.fixture(scope="module")
def url(tiny_bundle, patch_dir):
    with serving(tiny_bundle, patch_dir, threads=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def alone(rt, patch_dir, prompt, names=(), weights=None, max_new_tokens=10, **options):
    patches = [Patch.load(patch_dir / f"{n}.reft") for n in names]
    return rt.generate(
        prompt, patches=patches, weights=weights, max_new_tokens=max_new_tokens, repetition_penalty=PENALTY, **options
    )


def chat(client, prompt, model="base", max_tokens=10, **options):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, **{**GREEDY, **options}
    )


# -- the openai client --------------------------------------------------------------------------


def test_models_list_base_and_each_loadable_patch(client, url):
    assert [m.id for m in client.models.list()] == ["base", "base+beach", "base+fox", "base+skills", "base+steer"]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["skipped_patches"] == ["broken"]
    with pytest.raises(openai.NotFoundError, match="could not be loaded"):
        chat(client, "hello", model="base+broken")


@pytest.mark.parametrize("names", [(), ("fox",), ("beach",), ("steer",), ("fox", "beach")])
def test_chat_answers_as_the_runtime_with_the_patch_named_in_the_model(client, rt, patch_dir, names):
    got = chat(client, PROMPTS[0], model="+".join(("base", *names)))
    expected = alone(rt, patch_dir, PROMPTS[0], names)
    assert got.choices[0].message.content == expected.text
    assert got.choices[0].finish_reason == "length" and got.model == "+".join(("base", *names))
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (expected.prompt_tokens, len(expected.token_ids))


def test_stream_with_the_patches_field_and_usage(client, rt, patch_dir):
    stream = client.chat.completions.create(
        model="base",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        extra_body={
            "repetition_penalty": PENALTY,
            "patches": [{"name": "steer", "weight": 1.0}, {"name": "beach", "weight": 0.5}],
        },
    )
    chunks = list(stream)
    expected = alone(rt, patch_dir, PROMPTS[1], ("steer", "beach"), [1.0, 0.5], max_new_tokens=12)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_skills_field_switches_skills_per_request(client, rt, patch_dir):
    skills = Patch.load(patch_dir / "skills.reft")
    for chosen in ({"a": 1.0}, {"b": 0.5}, {"a": 1.0, "b": 1.0}):
        got = chat(
            client, PROMPTS[0], model="base+skills", extra_body={"repetition_penalty": PENALTY, "skills": chosen}
        )
        expected = rt.generate(
            PROMPTS[0], patches=[skills.with_skills(chosen)], max_new_tokens=10, repetition_penalty=PENALTY
        )
        assert got.choices[0].message.content == expected.text
    with pytest.raises(openai.BadRequestError, match="skill 'c'"):
        chat(client, PROMPTS[0], model="base+skills", extra_body={"skills": {"c": 1}})


def test_text_completions_take_the_prompt_raw(client, rt, patch_dir):
    got = client.completions.create(model="base+fox", prompt="hello world", max_tokens=8, **GREEDY)
    expected = alone(rt, patch_dir, "hello world", ("fox",), max_new_tokens=8, raw=True)
    assert got.choices[0].text == expected.text and got.object == "text_completion"
    pieces = client.completions.create(model="base+fox", prompt="hello world", max_tokens=8, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in pieces) == expected.text


def test_sampling_fields(client):
    options = dict(temperature=0.9, top_p=0.9, seed=7, frequency_penalty=0.5, presence_penalty=0.5)
    first = chat(client, PROMPTS[2], max_tokens=12, **options).choices[0].message.content
    assert chat(client, PROMPTS[2], max_tokens=12, **options).choices[0].message.content == first
    stopped = chat(client, PROMPTS[2], max_tokens=12)
    text = stopped.choices[0].message.content
    if len(text) > 3:  # a stop string cuts the answer before it, finish_reason "stop"
        cut = chat(client, PROMPTS[2], max_tokens=12, stop=[text[2:4]])
        assert cut.choices[0].message.content == text[: text.index(text[2:4])]
        assert cut.choices[0].finish_reason == "stop"


# -- batching across people ---------------------------------------------------------------------


def test_concurrent_requests_share_steps_and_each_equals_its_answer_alone(client, url, rt, patch_dir):
    """Eight people at once, different patches, prompts and lengths (so rows join and leave
    between steps): each answer is the one its request gets alone."""
    requests = [
        (PROMPTS[0], ("fox",), 24),
        (PROMPTS[2], (), 16),
        (PROMPTS[1], ("fox", "beach"), 30),
        (PROMPTS[2], ("beach",), 20),
        (PROMPTS[0], ("steer",), 28),
        (PROMPTS[1], ("steer", "beach"), 12),
        (PROMPTS[1], ("fox",), 26),
        (PROMPTS[0], ("beach",), 18),
    ]
    before = httpx.get(f"{url}/health").json()["decode_steps"]
    answers: dict[int, str] = {}
    start = threading.Barrier(len(requests))

    def ask(i: int) -> None:
        prompt, names, n = requests[i]
        start.wait()
        answers[i] = chat(client, prompt, model="+".join(("base", *names)), max_tokens=n).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    steps = httpx.get(f"{url}/health").json()["decode_steps"] - before
    for i, (prompt, names, n) in enumerate(requests):
        assert answers[i] == alone(rt, patch_dir, prompt, names, max_new_tokens=n).text, requests[i]
    one_by_one = sum(n - 1 for *_, n in requests)  # decode steps the requests take one after another
    assert steps < one_by_one, (steps, one_by_one)


# -- hostile requests ---------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


CHAT_BODY = {"model": "base", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        (b"{not json", 400, "invalid_json", None),
        (b"[1, 2]", 400, "invalid_body", None),
        ({**CHAT_BODY, "frobnicate": 1}, 400, "unknown_field", "frobnicate"),
        ({**CHAT_BODY, "model": "base+nobody"}, 404, "model_not_found", "model"),
        ({**CHAT_BODY, "model": "gpt-4"}, 404, "model_not_found", "model"),
        ({**CHAT_BODY, "patches": [{"name": "nobody"}]}, 400, "patch_not_found", "patches"),
        ({**CHAT_BODY, "patches": "fox"}, 400, None, "patches"),
        ({**CHAT_BODY, "messages": []}, 400, None, "messages"),
        ({**CHAT_BODY, "messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages[0].role"),
        ({**CHAT_BODY, "temperature": 5}, 400, None, "temperature"),
        ({**CHAT_BODY, "max_tokens": 0}, 400, None, "max_tokens"),
        ({**CHAT_BODY, "max_tokens": 100000}, 400, "context_length_exceeded", "max_tokens"),
        ({**CHAT_BODY, "n": 2}, 400, None, "n"),
        ({**CHAT_BODY, "logprobs": True}, 400, None, "logprobs"),
        ({**CHAT_BODY, "stop": [1]}, 400, None, "stop"),
        ({**CHAT_BODY, "stream": "yes"}, 400, None, "stream"),
        (b"x" * (2 * 1024 * 1024), 413, "body_too_large", None),
    ],
)
def test_malformed_requests_get_openai_error_objects(url, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    error = error_of(response)
    assert (response.status_code, error["code"], error["param"]) == (status, code, param), error
    assert error["message"]


def test_unknown_routes_and_methods(url):
    assert error_of(httpx.get(f"{url}/v1/nothing"))["code"] == "not_found"
    assert httpx.get(f"{url}/v1/chat/completions").status_code == 405


def test_a_client_leaving_mid_stream_frees_its_row_at_once(url, caplog):
    body = {**CHAT_BODY, "max_tokens": 200, "stream": True, "repetition_penalty": PENALTY}
    with caplog.at_level("INFO", logger="reft_edge.serve"):
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.time() + 10
        while time.time() < deadline and not any("client disconnected" in r.message for r in caplog.records):
            time.sleep(0.01)
        line = next(r.message for r in caplog.records if "client disconnected" in r.message)
        tokens = int(line.split("tokens=")[1].split()[0])
        assert tokens < 200, line
        deadline = time.time() + 5
        while httpx.get(f"{url}/health").json()["running"] and time.time() < deadline:
            time.sleep(0.01)
        assert httpx.get(f"{url}/health").json()["running"] == 0
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT_BODY).status_code == 200  # still serving


def test_api_key_is_enforced(tiny_bundle, patch_dir):
    with serving(tiny_bundle, patch_dir, threads=2, api_key="secret") as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        with pytest.raises(openai.AuthenticationError):
            chat(wrong, "hello")
        assert error_of(httpx.post(f"{url}/v1/chat/completions", json=CHAT_BODY))["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert chat(right, "hello", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_full_queue_answers_429_and_a_slow_request_times_out(tiny_bundle, patch_dir):
    body = {**CHAT_BODY, "max_tokens": 200, "repetition_penalty": PENALTY}
    with serving(tiny_bundle, patch_dir, threads=2, max_batch=1, max_queue=1) as url:
        statuses: list[int] = []
        start = threading.Barrier(4)

        def ask() -> None:
            start.wait()
            statuses.append(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert statuses.count(200) >= 2 and 429 in statuses and set(statuses) <= {200, 429}, statuses
    with serving(tiny_bundle, patch_dir, threads=2, timeout=0.001) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=body)
        assert (response.status_code, error_of(response)["code"]) == (504, "timeout")
        assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_patches_reload_when_the_folder_changes(tiny_bundle, patch_dir, tmp_path, rt):
    folder = tmp_path / "patches"
    folder.mkdir()
    shutil.copy(patch_dir / "fox.reft", folder / "alice.reft")
    with serving(tiny_bundle, folder, threads=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert (
            chat(client, PROMPTS[0], model="base+alice").choices[0].message.content
            == alone(rt, patch_dir, PROMPTS[0], ("fox",)).text
        )
        shutil.copy(patch_dir / "beach.reft", folder / "bob.reft")
        shutil.copy(patch_dir / "beach.reft", folder / "alice.reft")  # alice's patch replaced
        assert [m.id for m in client.models.list()] == ["base", "base+alice", "base+bob"]
        assert (
            chat(client, PROMPTS[0], model="base+alice").choices[0].message.content
            == alone(rt, patch_dir, PROMPTS[0], ("beach",)).text
        )
        (folder / "bob.reft").unlink()
        with pytest.raises(openai.NotFoundError):
            chat(client, PROMPTS[0], model="base+bob")


# -- the command --------------------------------------------------------------------------------


def test_cli_serves_and_reports_bad_arguments_in_one_line(tiny_bundle, patch_dir, tmp_path):
    result = CliRunner().invoke(main, ["serve", str(tiny_bundle), "--patches", str(tmp_path / "none")])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--patches" in result.output
    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--patches", str(patch_dir)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "manifest" in result.output
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "reft_edge.cli",
            "serve",
            str(tiny_bundle),
            "--patches",
            str(patch_dir),
            "--port",
            "0",
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = ""
        while " at http://" not in line:
            line = server.stderr.readline()
            assert line, "the server did not start"
        url = line.split(" at ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        answer = httpx.post(f"{url}/chat/completions", json=CHAT_BODY, timeout=60).json()
        assert answer["usage"]["completion_tokens"] == 4
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_imports_without_torch():
    code = (
        "import sys, reft_edge.runtime.serve, starlette, uvicorn; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the default model --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_through_the_openai_client(default_int4_bundle, emoji_patch_path, tmp_path):
    """The emoji patch on the default model: served concurrently with the base, each answer the
    runtime's alone."""
    folder = tmp_path / "patches"
    folder.mkdir()
    shutil.copy(emoji_patch_path, folder / "emoji.reft")
    runtime = Runtime.load(default_int4_bundle, threads=2)
    prompts = ["How do I learn to swim?", "Describe a rainy day."]
    models = ["base+emoji", "base"]
    with serving(default_int4_bundle, folder, threads=2) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            stream = client.chat.completions.create(
                model=models[i],
                messages=[{"role": "user", "content": prompts[i]}],
                max_tokens=24,
                temperature=0,
                stream=True,
                extra_body={"repetition_penalty": 1.0},
            )
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    emoji = Patch.load(emoji_patch_path)
    assert answers[0] == runtime.generate(prompts[0], patches=[emoji], max_new_tokens=24).text
    assert answers[1] == runtime.generate(prompts[1], max_new_tokens=24).text
    assert answers[0] != answers[1] and answers[1].strip()
