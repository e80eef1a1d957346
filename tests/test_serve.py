"""The OpenAI-compatible Ray Serve app (jobs/serve.py, generalmodel/serve) on the session's local Ray
cluster, the model loaded from the real MLflow registry, talked to with the `openai` client and raw
HTTP: completions and chat completions equal our sampler's output, streamed or not (SSE ending in
`data: [DONE]`); stop strings; bad requests are 400s naming the field; concurrent streams share
decode steps and each still gets its own tokens; a client that goes away frees its row; retrieval
(the index's passages in the prompt, cited in the answer; a 400 without an index); tool calls
(a second app, a tiny model that learned to call the calculator): `tool_calls` out, the client's
tool result back in, streamed or not, a malformed call a `tool_call_error` in the answer. The
text side (TextStream: multi-byte characters, stop strings across tokens) is tested without a
server."""

import json
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from conftest import PLANTED, make_documents, tool_conversations, train_on_conversations

from generalmodel.cluster import free_port
from generalmodel.config import StorageConfig
from generalmodel.data.chat import ChatFormat, add_special_tokens
from generalmodel.data.tokenizer import EOS, train_bpe
from generalmodel.infer import SamplingParams, generate, load_model
from generalmodel.infer.export import export_files
from generalmodel.infer.tools import BUILTIN, call
from generalmodel.retrieval import Index, context
from generalmodel.serve.protocol import TextStream
from generalmodel.tokens import TOOL_TOKENS
from generalmodel.tracking.runs import log_model, register
from models import build_model
from models.llama import LlamaConfig

# long enough a context that a cancelled stream is cut well before its end
CFG = LlamaConfig(vocab_size=320, max_seq_len=1024, n_layers=4, n_heads=4, n_kv_heads=2, d_model=256)
NAME = "served-openai"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model(CFG)
    tokenizer = train_bpe(make_documents(30, seed=5), CFG.vocab_size)  # reserves the chat tokens
    directory = tmp_path_factory.mktemp("served")
    for name, data in export_files(CFG, model.state_dict(), tokenizer.to_str()).items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture(scope="module")
def local(export):
    return load_model(str(export))


def deploy(directory, name: str, tracking_uri: str, **options) -> str:
    """models:/NAME/1 registered from an export directory and served; its base URL."""
    from mlflow.tracking import MlflowClient

    from jobs.serve import ServeJobConfig, main

    client = MlflowClient(tracking_uri)
    run = client.create_run(client.create_experiment(f"serve-{name}-{time.time_ns()}"))
    log_model(client, run.info.run_id, str(directory))
    client.set_terminated(run.info.run_id)
    register(client, name, run.info.run_id)
    cfg = ServeJobConfig(model=f"models:/{name}/1", num_cpus=0.5, tracking={"uri": tracking_uri}, **options)
    return main(cfg, block=False)


@pytest.fixture(scope="module")
def server(export, mlflow_server, ray_cluster, planted_index):
    """The app deployed on the session's Ray cluster from models:/served-openai/1 (MLflow server),
    with the planted retrieval index."""
    from ray import serve

    yield deploy(export, NAME, mlflow_server.uri, port=free_port(), max_batch=8, index=planted_index)
    serve.shutdown()


@pytest.fixture(scope="module")
def tool_server(server, mlflow_server, tmp_path_factory):
    """A second app beside `server` (same proxy, route /tools): a tiny model that learned
    tool_conversations() by heart, its tokenizer with the tool tokens."""
    tokenizer = add_special_tokens(train_bpe(make_documents(30, seed=5), 320).to_str(), TOOL_TOKENS.values())[0]
    cfg = LlamaConfig(vocab_size=322, max_seq_len=256, n_layers=2, n_heads=4, n_kv_heads=2, d_model=128)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert train_on_conversations(model, tokenizer, tool_conversations(), steps=120) < 0.05
    directory = tmp_path_factory.mktemp("served-tools")
    for name, data in export_files(cfg, model.state_dict(), tokenizer).items():
        (directory / name).write_bytes(data)
    port = urlsplit(server).port
    return deploy(directory, "served-tools", mlflow_server.uri, port=port, app_name="tools", route_prefix="/tools")


def greedy_ids(local, prompt: str, n: int) -> list[int]:
    model, tokenizer = local
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    return list(generate(model, ids, SamplingParams(temperature=0, max_new_tokens=n), {eos(local)}))


def greedy_text(local, prompt: str, n: int) -> str:
    return local[1].decode(greedy_ids(local, prompt, n))


def eos(local) -> int:
    return local[1].token_to_id(EOS)


def openai_client(url):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="unused", max_retries=0)


PROMPTS = ["Fellow citizens,", "The state of the Union", "We", "In the year of our Lord"]


@pytest.mark.integration
def test_models_and_health(server):
    models = openai_client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    base = server.rsplit("/v1", 1)[0]
    assert httpx.get(f"{base}/health").json() == {"status": "ok", "model": NAME}


@pytest.mark.integration
def test_completions_equal_our_sampler_streamed_or_not(server, local):
    client = openai_client(server)
    for prompt in PROMPTS[:2]:
        expected = greedy_text(local, prompt, 12)
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12
        assert out.usage.prompt_tokens == len(local[1].encode(prompt, add_special_tokens=False).ids)
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 2
    # the raw event stream ends with [DONE]
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert json.loads(events[0][6:])["object"] == "text_completion"


@pytest.mark.integration
def test_chat_completions_use_the_chat_template(server, local):
    model, tokenizer = local
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who spoke in 1862?"}]
    fmt = ChatFormat.from_json(tokenizer.to_str())
    params = SamplingParams(temperature=0, max_new_tokens=10)
    expected = tokenizer.decode(list(generate(model, fmt.prompt_ids(messages), params, {fmt.end_id, eos(local)})))
    client = openai_client(server)
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == expected
    chunks = list(
        client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


@pytest.mark.integration
def test_a_stop_string_ends_the_text_before_it(server, local):
    full = greedy_text(local, PROMPTS[0], 16)
    stop = full[5:8]
    cut = full[: full.index(stop)]
    client = openai_client(server)
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == cut


@pytest.mark.integration
@pytest.mark.parametrize(
    "body, param, message",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens: Input should be greater than 0"),
        ({"prompt": "x", "temperature": 2.5}, "temperature", "temperature: Input should be less than or equal to 2"),
        ({"prompt": "x", "top_p": 0}, "top_p", "top_p: Input should be greater than 0"),
        ({"prompt": "x", "n": 3}, "n", "n: Input should be less than or equal to 1"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop takes up to 4 non-empty strings"),
        ({"max_tokens": 3}, "prompt", "prompt: Field required"),
        ({"prompt": "x", "logprobs": 2}, "logprobs", "logprobs and echo are not supported"),
        ({"prompt": "x", "model": "gpt-4"}, "model", "unknown model 'gpt-4'; this server serves 'served-openai'"),
        ({"prompt": "word " * 1100}, "prompt", "the model's context is 1024, which leaves no room"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(server, body, param, message):
    response = httpx.post(f"{server}/completions", json={"model": NAME, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error


@pytest.mark.integration
def test_chat_with_a_bad_role_is_a_400(server):
    body = {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}
    response = httpx.post(f"{server}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"


@pytest.mark.integration
def test_concurrent_streams_share_decode_steps_and_keep_their_own_tokens(server, local):
    base = server.rsplit("/v1", 1)[0]
    before = httpx.get(f"{base}/stats").json()
    client = openai_client(server)
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS]  # 8 streams
    results: dict[str, str] = {}

    def one(prompt):
        chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True)
        results[prompt] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {p: greedy_text(local, p, 24) for p in prompts}
    after = httpx.get(f"{base}/stats").json()
    tokens, steps = after["tokens"] - before["tokens"], after["steps"] - before["steps"]
    assert tokens == sum(len(greedy_ids(local, p, 24)) for p in prompts)  # some end at EOS
    assert steps < tokens / 2, (steps, tokens)  # several rows per decode step, not one request at a time


@pytest.mark.integration
def test_a_client_that_goes_away_frees_its_row(server):
    base = server.rsplit("/v1", 1)[0]
    before = httpx.get(f"{base}/stats").json()
    body = {"model": NAME, "prompt": "Fellow", "max_tokens": 1000, "temperature": 0.8, "seed": 1, "stream": True}
    with httpx.stream("POST", f"{server}/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = httpx.get(f"{base}/stats").json()
        if stats["cancelled"] > before["cancelled"] and stats["active"] == 0:
            break
        time.sleep(0.2)
    assert stats["cancelled"] == before["cancelled"] + 1 and stats["active"] == 0, stats
    assert stats["tokens"] - before["tokens"] < 1000  # stopped before its end


class ByteTokenizer:
    """One token per UTF-8 byte: multi-byte characters span tokens."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(text: str, stops: list[str]) -> tuple[list[str], bool]:
    stream = TextStream(ByteTokenizer(), stops)
    pieces = []
    for b in text.encode():
        pieces.append(stream.add(b))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream.stopped


def test_text_stream_waits_for_whole_characters_and_ends_at_stop_strings():
    pieces, stopped = stream_text("héllo wörld", [])
    assert "".join(pieces) == "héllo wörld" and not stopped and all("\ufffd" not in p for p in pieces)
    pieces, stopped = stream_text("one two<|stop|> three", ["<|stop|>"])
    assert "".join(pieces) == "one two" and stopped
    assert "<" not in "".join(pieces[:-1])  # a possible stop's start is held back, not shown then retracted
    pieces, stopped = stream_text("a <b a <c", ["<c"])  # a false start is released
    assert "".join(pieces) == "a <b a " and stopped
    pieces, stopped = stream_text("ends with <", ["<c"])  # held back to the end, then shown
    assert "".join(pieces) == "ends with <" and not stopped
    pieces, stopped = stream_text("x ü stop", ["ü s", "top"])  # the earliest stop wins
    assert "".join(pieces) == "x " and stopped


def test_the_server_job_refuses_what_cannot_serve_before_deploying(tmp_path):
    from generalmodel import UserError
    from jobs.serve import ServeJobConfig, check_model

    db = {"uri": f"sqlite:///{tmp_path}/mlflow.db"}
    with pytest.raises(UserError, match="cannot find models:/nope/1 in MLflow"):
        check_model(ServeJobConfig(model="models:/nope/1", tracking=db))
    with pytest.raises(UserError, match="--quant=int4-weight needs a CUDA card"):
        check_model(ServeJobConfig(model="models:/nope/1", quant="int4-weight", tracking=db))
    with pytest.raises(UserError, match=r"/no-index is not a published retrieval_index: it holds nothing"):
        check_model(ServeJobConfig(model=str(tmp_path), index=str(tmp_path / "no-index"), tracking=db))


CALCULATOR = BUILTIN["calculator"].spec


@pytest.mark.integration
def test_tool_calls_go_out_and_their_results_come_back(tool_server):
    client = openai_client(tool_server)
    asked = [{"role": "user", "content": "What is 345 + 78?"}]
    out = client.chat.completions.create(
        model="served-tools", messages=asked, tools=[CALCULATOR], temperature=0, max_tokens=100
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (made,) = choice.message.tool_calls
    assert made.type == "function" and made.function.name == "calculator"
    arguments = json.loads(made.function.arguments)
    assert arguments == {"expression": "345 + 78"}
    # the client runs the tool and sends its result back: the model answers with it
    result = call(made.function.name, arguments)
    follow = [
        *asked,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": made.id, "content": result},
    ]
    answer = client.chat.completions.create(
        model="served-tools", messages=follow, tools=[CALCULATOR], temperature=0, max_tokens=100
    ).choices[0]
    assert answer.message.content == "The answer is 423." and answer.finish_reason == "stop"
    assert not answer.message.tool_calls
    # streamed: the call comes whole in one delta, then the finish reason
    chunks = list(
        client.chat.completions.create(
            model="served-tools", messages=asked, tools=[CALCULATOR], temperature=0, max_tokens=100, stream=True
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and json.loads(deltas[0][0].function.arguments) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.integration
def test_a_malformed_call_is_an_error_in_the_answer_not_a_crash(tool_server, server):
    """Told of a tool it never saw, the model still writes a call (garbled, or to the calculator):
    either way a 200 whose choice names what is wrong, with the text as generated."""
    search = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}
    body = {
        "model": "served-tools",
        "messages": [{"role": "user", "content": "What is 12 + 7?"}],
        "tools": [search],
        "temperature": 0,
        "max_tokens": 100,
    }
    response = httpx.post(f"{tool_server}/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    error = choice["tool_call_error"]
    assert error["type"] == "tool_call_parse_error" and error["message"].startswith("tool call 1 of 1: "), error
    assert "not JSON" in error["message"] or "which is not a declared tool (search)" in error["message"]
    assert "<|tool_call|>" in choice["message"]["content"] and "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "stop"
    # a model without the tool tokens cannot be given tools: a 400 naming them
    plain = {**body, "model": NAME, "tools": [CALCULATOR]}
    response = httpx.post(f"{server}/chat/completions", json=plain, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools"
    assert "data.tools=true" in response.json()["error"]["message"]


@pytest.mark.integration
def test_retrieval_puts_the_passages_in_the_prompt_and_cites_them(server, local, planted_index, tool_server):
    model, tokenizer = local
    question = [{"role": "user", "content": "How many whales did the lighthouse keeper count?"}]
    body = {"model": NAME, "messages": question, "max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{server}/chat/completions", json={**body, "retrieval": {"k": 2, "words": 12}}, timeout=60)
    assert response.status_code == 200, response.text
    cited = response.json()["retrieval"]
    assert cited["index"] == planted_index and [p["rank"] for p in cited["passages"]] == [1, 2]
    assert cited["passages"][0]["title"] == "planted" and PLANTED in cited["passages"][0]["text"]
    # what the model answered is what our sampler writes after the passages' system turn
    hits = Index.load(planted_index, StorageConfig()).search([question[0]["content"]], 2)[0]
    assert [h.id for h in hits] == [p["id"] for p in cited["passages"]]
    fmt = ChatFormat.from_json(tokenizer.to_str())
    prompt = fmt.prompt_ids([{"role": "system", "content": context(hits, 12)}, *question])
    expected = tokenizer.decode(
        list(generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=8), {fmt.end_id, eos(local)}))
    )
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
    # streamed: the citations come in the first chunk
    with httpx.stream(
        "POST", f"{server}/chat/completions", json={**body, "stream": True, "retrieval": {"k": 1}}, timeout=60
    ) as streamed:
        first = json.loads(next(line for line in streamed.iter_lines() if line)[6:])
    assert first["retrieval"]["passages"][0]["title"] == "planted"
    # a server without an index, or a bad option: 400s naming retrieval
    refused = httpx.post(f"{tool_server}/chat/completions", json={**body, "model": "served-tools", "retrieval": {}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "retrieval"
    assert "no retrieval index" in refused.json()["error"]["message"]
    bad = httpx.post(f"{server}/chat/completions", json={**body, "retrieval": {"k": 0}}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "retrieval"
